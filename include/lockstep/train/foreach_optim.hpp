#pragma once
// LibTorch's SGD, Adam and AdamW with each step done by a few multi-tensor ("foreach") kernels over all
// parameters of a group, instead of a handful of kernels per parameter. LibTorch's C++ optimizers loop
// over parameters; PyTorch's Python optimizers have used the foreach kernels by default on CUDA since
// 2.0. On a GPU the per-parameter loop is launch-bound: ResNet-18's 62 tensors cost SGD ~250 launches a
// step, and Adam about twice that.
//
// Each class derives from the LibTorch optimizer it replaces and overrides only step(): same options,
// the same arithmetic per element in the same order (bitwise LibTorch's own on the CPU, where the
// foreach kernels loop over the tensors; on CUDA equal to a few ulps, since a fused kernel may contract
// a multiply and an add), and the same state, saved and loaded by the base class's serialisation, so
// checkpoints move between the two. config::make_optimizer builds them for `sgd`, `adam` and `adamw`.
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>

namespace lockstep::train {

class ForeachSGD : public torch::optim::SGD {
 public:
  using torch::optim::SGD::SGD;
  torch::Tensor step(LossClosure closure = nullptr) override;
};

// amsgrad's running maximum is taken per tensor (no in-place foreach maximum in LibTorch 1.13).
class ForeachAdam : public torch::optim::Adam {
 public:
  using torch::optim::Adam::Adam;
  torch::Tensor step(LossClosure closure = nullptr) override;
};

class ForeachAdamW : public torch::optim::AdamW {
 public:
  using torch::optim::AdamW::AdamW;
  torch::Tensor step(LossClosure closure = nullptr) override;
};

}  // namespace lockstep::train
