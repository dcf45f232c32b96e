#pragma once
// ZeroRedundancyOptimizer: optimizer state sharded over ranks (ZeRO stage 1, Rajbhandari et al. 2020),
// as PyTorch's torch.distributed.optim.ZeroRedundancyOptimizer. Data parallelism keeps a full copy of
// the optimizer's state on every rank (SGD momentum: 1x the parameters, Adam: 2x); here each rank keeps
// the state of only its share of the parameters, about 1/N of it, and updates only that share. After
// each step every rank's share is all-gathered, so every rank ends the step with the same parameters,
// bitwise the ones the wrapped optimizer would have computed unsharded (tested).
//
//   auto opt = std::make_shared<lockstep::ddp::ZeroRedundancyOptimizer>(
//       model->parameters(), comm,
//       [](std::vector<at::Tensor> shard) {
//         return std::make_unique<torch::optim::Adam>(shard, torch::optim::AdamOptions(1e-3));
//       });
//   // use it like any torch::optim::Optimizer, e.g. in a DistributedTrainer (config: optimizer.zero: true)
//
// Gradients are still averaged over all ranks by DataParallel (ZeRO-1 shards the optimizer state only);
// each step then costs one all-gather of the parameters. Construction is collective (it checks that the
// ranks hold the same parameter list), and so are step(), consolidate_state() and a Checkpointer's save.
// Options set on this optimizer's parameter group (the learning rate a trainer schedules, weight decay,
// ...) are handed to the wrapped optimizer at every step.

#include <torch/optim/optimizer.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "lockstep/comm/communicator.hpp"

namespace lockstep::ddp {

class ZeroRedundancyOptimizer : public torch::optim::Optimizer {
 public:
  // Builds the wrapped optimizer over the parameters this rank owns (possibly none).
  using Factory = std::function<std::unique_ptr<torch::optim::Optimizer>(std::vector<at::Tensor>)>;

  // Collective. `parameters`: the model's, in the same order on every rank, one dtype and device; a
  // tensor listed twice (tied weights) counts once.
  ZeroRedundancyOptimizer(std::vector<at::Tensor> parameters, comm::CommunicatorPtr comm, Factory factory);
  ~ZeroRedundancyOptimizer() override;

  // Collective: updates this rank's share with the wrapped optimizer, then all-gathers every share.
  // Closures are not supported (the loss would have to be evaluated on every rank alike).
  at::Tensor step(LossClosure closure = nullptr) override;

  // Collective: gathers every rank's serialised shard of the state onto rank `to` (as PyTorch's
  // consolidate_state_dict(to=0)), so that save() there can write them all; a Checkpointer calls it
  // on every rank and saves on rank 0. Only rank `to` holds the whole state, and only until save().
  void consolidate_state(int to = 0);
  // On the rank the last consolidate_state() gathered onto: writes every rank's shard, then releases
  // the gathered copy (the whole state, which would otherwise stay in memory beside this rank's
  // shard). An error on any other rank, without a consolidate_state() since the last step (a stale
  // state would be silently wrong after resume), or for a second save() of one consolidation.
  void save(torch::serialize::OutputArchive& archive) const override;
  // Reads this rank's shard. The file must come from the same world size and parameter list.
  void load(torch::serialize::InputArchive& archive) override;

  // Which rank owns (updates, keeps the state of) each parameter, in the order given.
  const std::vector<int>& owners() const { return owner_; }
  // The wrapped optimizer over this rank's share.
  torch::optim::Optimizer& local() { return *local_; }

 private:
  struct Parts;
  static Parts make_parts(std::vector<at::Tensor> parameters, comm::CommunicatorPtr comm, const Factory& factory);
  explicit ZeroRedundancyOptimizer(Parts parts);
  void gather_parameters();

  comm::CommunicatorPtr comm_;
  std::unique_ptr<torch::optim::Optimizer> local_;
  std::vector<at::Tensor> all_;  // every parameter, in the given order
  std::vector<int> owner_;
  std::vector<std::vector<int64_t>> shards_;  // per rank: indices into all_
  int64_t slot_numel_ = 0;                    // the largest share: each rank's slot in the gathered buffer
  at::Tensor gathered_;                       // [world * slot_numel_]
  // Per rank: serialised shard, from consolidate_state(), on rank consolidated_to_ until save().
  mutable std::vector<std::string> consolidated_;
  int64_t steps_ = 0;
  int64_t consolidated_at_ = -1;
  int consolidated_to_ = 0;
};

// The partition: parameters in decreasing size (ties in the given order), each to the rank holding the
// fewest elements so far (ties to the lower rank). Pure; the same on every rank. Returns the owner of
// each parameter.
std::vector<int> partition_parameters(const std::vector<int64_t>& numels, int world_size);

}  // namespace lockstep::ddp
