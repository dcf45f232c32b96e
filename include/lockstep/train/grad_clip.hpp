#pragma once
// Gradient clipping by the global norm, without a host synchronisation: the norm stays a tensor on the
// gradients' device. LibTorch's torch::nn::utils::clip_grad_norm_ returns a double, so every call
// waits for the GPU (the host cannot queue the next step while this one runs), and it takes two or
// three kernels per parameter. This one takes one multi-tensor (foreach) kernel for the per-tensor
// norms, a few for the total and the factor, and one (LibTorch 2.1+; one per tensor in 1.13) to scale.
// PyTorch's Python clip_grad_norm_ does the same. The trainer clips with it (TrainerOptions::
// clip_grad_norm) and reads the norms once per epoch (Note [No host sync per step], trainer.cpp).
//
//   at::Tensor norm = lockstep::train::clip_grad_norm(model->parameters(), 1.0);  // 0-dim float32
#include <ATen/core/Tensor.h>

#include <vector>

namespace lockstep::train {

// Scales the defined gradients of `parameters` in place by min(1, max_norm / (total + 1e-6)), where
// total is their `norm_type`-norm taken over all of them as one vector (norm_type > 0, or infinity
// for the largest magnitude), as LibTorch's and PyTorch's clip_grad_norm_ do. Returns total before
// clipping as a 0-dim float32 tensor on the first gradient's device (0 on the CPU when no parameter
// has a gradient). Non-finite gradients give a non-finite total and are left non-finite. Throws for
// max_norm <= 0 or not finite, norm_type <= 0 or NaN, sparse gradients, or gradients on several devices.
at::Tensor clip_grad_norm(const std::vector<at::Tensor>& parameters, double max_norm, double norm_type = 2.0);

}  // namespace lockstep::train
