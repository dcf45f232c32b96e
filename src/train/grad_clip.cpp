#include "lockstep/train/grad_clip.hpp"

#include <ATen/ATen.h>

#include <cmath>

#include "core/torch_compat.hpp"
#include "core/unique_tensors.hpp"
#include "lockstep/core/error.hpp"

namespace lockstep::train {

at::Tensor clip_grad_norm(const std::vector<at::Tensor>& parameters, double max_norm, double norm_type) {
  LOCKSTEP_CHECK(max_norm > 0 && std::isfinite(max_norm), "clip_grad_norm: max_norm must be positive and finite, got ",
                 max_norm);
  LOCKSTEP_CHECK(norm_type > 0, "clip_grad_norm: norm_type must be positive (or infinity), got ", norm_type);
  std::vector<at::Tensor> grads;
  grads.reserve(parameters.size());
  // A tied weight (listed once per name by Module::parameters()) is counted and scaled once.
  for (const at::Tensor& parameter : detail::unique_tensors(parameters)) {
    const at::Tensor& grad = parameter.grad();
    if (!grad.defined()) continue;
    LOCKSTEP_CHECK(!grad.is_sparse(), "clip_grad_norm: sparse gradients are not supported (a parameter of shape ",
                   parameter.sizes(), ")");
    LOCKSTEP_CHECK(grads.empty() || grad.device() == grads.front().device(),
                   "clip_grad_norm: the gradients are on several devices (", grads.front().device(), " and ",
                   grad.device(), "); clip each device's parameters separately");
    grads.push_back(grad);
  }
  if (grads.empty()) return at::zeros({}, at::kFloat);

  // One multi-tensor kernel for the per-tensor norms (each in its gradient's dtype, where the dtypes
  // agree), then the norm of the norms in float32.
  const at::Tensor norms = at::stack(at::_foreach_norm(grads, norm_type)).to(at::kFloat);
  const at::Tensor total = at::linalg_vector_norm(norms, norm_type);
  // min(1, max_norm / (total + eps)) stays on the device; scaling by 1 leaves a gradient unchanged.
  const at::Tensor factor = at::clamp_max(max_norm / (total + 1e-6), 1.0);
  compat::foreach_mul_(grads, factor);
  return total;
}

}  // namespace lockstep::train
