#pragma once
// Module::parameters() lists a tied weight (one tensor registered under two names) once per name.
// An optimizer, a gradient scaler or a norm given such a list would step, unscale or count that
// tensor twice; PyTorch's Python parameters() lists it once, and so does this.

#include <ATen/core/Tensor.h>

#include <unordered_set>
#include <vector>

namespace lockstep::detail {

// Each tensor once, in first-seen order. Undefined tensors are kept (callers name them in errors).
inline std::vector<at::Tensor> unique_tensors(std::vector<at::Tensor> tensors) {
  std::vector<at::Tensor> unique;
  unique.reserve(tensors.size());
  std::unordered_set<const void*> seen;
  for (auto& t : tensors) {
    if (!t.defined() || seen.insert(t.unsafeGetTensorImpl()).second) unique.push_back(std::move(t));
  }
  return unique;
}

}  // namespace lockstep::detail
