#pragma once
// SyncBatchNorm: batch normalisation over the global batch. In training mode, once attached to a
// communicator, it normalises with the mean and variance of all ranks' samples together (as PyTorch's
// torch.nn.SyncBatchNorm and Horovod's hvd.SyncBatchNorm), so N ranks with b samples each train like one
// process with N x b: the forward output, the running statistics and (after DataParallel averages the
// parameter gradients) every gradient match that single process. Without an attachment (or at world
// size 1, or in eval mode) it is torch::nn::BatchNorm2d exactly, bitwise: the same parameters, buffers
// and names (weight, bias, running_mean, running_var, num_batches_tracked), so checkpoints interchange.
//
// LibTorch cannot swap a module a model holds in a typed member (as PyTorch's convert_sync_batchnorm
// does), so a model builds SyncBatchNorm where it wants one; models::ResNet18 always does. Then either
//   DataParallelOptions::sync_batch_norm = true      (attaches them all; detaches when DataParallel dies)
// or, in a loop without DataParallel,
//   ddp::attach_sync_batch_norm(*model, comm);
//
// Each synchronised forward issues one all-gather of 2C + 2 doubles per layer (C channels), and its
// backward one more: small, but latency-bound; see Note [SyncBatchNorm collectives] in the source for
// the ordering rules and the check that names a layer the ranks disagree on.
// Inputs are [N, C, *] (any rank >= 2); a rank may contribute zero samples. float16 and bfloat16
// inputs are normalised in float32 and returned in their own dtype.

#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/options/batchnorm.h>
#include <torch/nn/pimpl.h>

#include <cstddef>
#include <memory>
#include <ostream>

#include "lockstep/comm/communicator.hpp"

namespace lockstep::ddp {

struct SyncBatchNormGroup;  // the communicator and the layer names that attached layers share

class SyncBatchNormImpl : public torch::nn::NormImplBase<2, SyncBatchNormImpl, torch::nn::BatchNormOptions> {
 public:
  explicit SyncBatchNormImpl(int64_t num_features)
      : SyncBatchNormImpl(torch::nn::BatchNormOptions(num_features)) {}
  explicit SyncBatchNormImpl(const torch::nn::BatchNormOptions& options);
  // A copy (clone()) has the same values but is not attached.
  SyncBatchNormImpl(const SyncBatchNormImpl& other);
  SyncBatchNormImpl& operator=(const SyncBatchNormImpl& other);
  ~SyncBatchNormImpl() override;

  // [N, C, *] -> same shape and dtype. Collective in training mode while attached at world size > 1:
  // every rank must call it (and its backward) for the same layers in the same order.
  torch::Tensor forward(const torch::Tensor& input);

  // True while attached to a communicator of more than one rank.
  bool synchronised() const;
  // This layer's position among the model's attached SyncBatchNorm layers, and its module name.
  std::size_t layer_index() const { return index_; }

  void pretty_print(std::ostream& stream) const override;

 protected:
  void _check_input_dim(const torch::Tensor& input) override;

 private:
  friend std::size_t attach_sync_batch_norm(torch::nn::Module&, comm::CommunicatorPtr);
  friend std::size_t detach_sync_batch_norm(torch::nn::Module&);
  friend class SyncBatchNormAttachment;
  torch::Tensor forward_synchronised(const torch::Tensor& input, double momentum);

  std::shared_ptr<const SyncBatchNormGroup> group_;
  std::size_t index_ = 0;
};
TORCH_MODULE(SyncBatchNorm);

// Attaches every SyncBatchNorm in `module` (itself included), numbered in registration order, to
// `comm`, replacing any earlier attachment. Not collective; call it on every rank for the same model.
// Returns how many layers were attached.
std::size_t attach_sync_batch_norm(torch::nn::Module& module, comm::CommunicatorPtr comm);
// Detaches every SyncBatchNorm in `module`; they normalise per rank again. Returns how many were attached.
std::size_t detach_sync_batch_norm(torch::nn::Module& module);

// Attaches as attach_sync_batch_norm does, and on destruction detaches those of the layers that are
// still attached to it: a layer a later attachment took over (a second DataParallel over the same
// model, built before this one dies) stays with that one. What DataParallel holds; not copyable.
class SyncBatchNormAttachment {
 public:
  SyncBatchNormAttachment(torch::nn::Module& module, comm::CommunicatorPtr comm);
  ~SyncBatchNormAttachment();
  SyncBatchNormAttachment(const SyncBatchNormAttachment&) = delete;
  SyncBatchNormAttachment& operator=(const SyncBatchNormAttachment&) = delete;

  // How many layers it attached.
  std::size_t layers() const { return layers_.size(); }
  // Leaves the layers attached for good (this then detaches nothing); returns how many there are.
  std::size_t release();

 private:
  std::shared_ptr<const SyncBatchNormGroup> group_;
  std::vector<std::shared_ptr<SyncBatchNormImpl>> layers_;
};

}  // namespace lockstep::ddp
