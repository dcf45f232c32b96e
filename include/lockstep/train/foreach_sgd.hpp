#pragma once
// ForeachSGD: torch::optim::SGD whose step runs as a few multi-tensor ("foreach") kernels over all
// parameters of a group instead of three or four kernels per parameter. LibTorch's C++ optimizers loop
// over parameters; PyTorch's Python SGD has used the foreach kernels by default on CUDA since 2.0. On a
// GPU the per-parameter loop is launch-bound: for ResNet-18 (62 parameters) it is ~250 kernel launches
// a step. Same options (SGDOptions), same arithmetic per element, same state (SGDParamState's
// momentum_buffer, saved and loaded by SGD's serialisation), so it drops in for torch::optim::SGD,
// checkpoints included. config::make_optimizer builds it for `optimizer.name: sgd`.
#include <torch/optim/sgd.h>

namespace lockstep::train {

class ForeachSGD : public torch::optim::SGD {
 public:
  using torch::optim::SGD::SGD;
  torch::Tensor step(LossClosure closure = nullptr) override;
};

}  // namespace lockstep::train
