#pragma once
// Which weights a compression callback works on (pruning, quantization): ECMAScript regular
// expressions searched in parameter names. An empty include list selects the weight of every
// Conv1d/2d/3d and Linear module; exclude wins over include. A pattern that matches no parameter is
// an error, so a misspelling never silently compresses nothing.

#include <ATen/core/Tensor.h>

#include <string>
#include <utility>
#include <vector>

namespace torch::nn {
class Module;
}

namespace lockstep::compress {

// The selected (name, parameter) pairs in model order. `who` names the caller in errors
// ("MagnitudePruning"); floating-point parameters only (others are an error naming them).
std::vector<std::pair<std::string, at::Tensor>> select_weights(torch::nn::Module& model,
                                                               const std::vector<std::string>& include,
                                                               const std::vector<std::string>& exclude,
                                                               const std::string& who);

}  // namespace lockstep::compress
