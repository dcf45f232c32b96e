#include "lockstep/ddp/zero_optimizer.hpp"

#include <ATen/ATen.h>
#include <torch/serialize/archive.h>

#include <algorithm>
#include <numeric>
#include <utility>

#include "lockstep/comm/agree.hpp"
#include "lockstep/comm/work.hpp"
#include "core/unique_tensors.hpp"
#include "lockstep/core/error.hpp"

// Note [ZeRO shards]
// Every rank derives the same partition from the same parameter list (checked at construction), so
// the owner of a parameter needs no communication. A step: the wrapped optimizer updates this rank's
// share (its state exists only for that share), then one all-gather of a [world x slot] buffer, each
// rank's slot holding its share back to back, brings every other share. The owner's values are the
// wrapped optimizer's exactly, and everyone copies them, so the parameters are bitwise equal on every
// rank and bitwise those of the unsharded optimizer (the same float operations on the same gradients).
//
// Note [ZeRO checkpoints]
// A checkpoint holds every rank's shard, each the wrapped optimizer's own archive serialised to bytes,
// plus the world size and the owners. consolidate_state() (collective) gathers the bytes; save() refuses
// to write a state older than the last step, since a stale shard would resume silently wrong. Loading
// reads only this rank's shard, so it needs the same world size and parameter list, which load() checks.

namespace lockstep::ddp {

struct ZeroRedundancyOptimizer::Parts {
  std::vector<at::Tensor> all;
  comm::CommunicatorPtr comm;
  std::unique_ptr<torch::optim::Optimizer> local;
  std::vector<int> owner;
};

namespace {

// FNV-1a over the shapes, as a fingerprint of the parameter list.
int64_t fingerprint(const std::vector<at::Tensor>& parameters) {
  uint64_t hash = 1469598103934665603ULL;
  auto mix = [&hash](uint64_t value) {
    for (int byte = 0; byte < 8; ++byte) {
      hash ^= (value >> (8 * byte)) & 0xff;
      hash *= 1099511628211ULL;
    }
  };
  for (const auto& p : parameters) {
    mix(static_cast<uint64_t>(p.dim()));
    for (int64_t size : p.sizes()) mix(static_cast<uint64_t>(size));
  }
  return static_cast<int64_t>(hash >> 1);
}

std::string serialise(const torch::optim::Optimizer& optimizer) {
  torch::serialize::OutputArchive archive;
  optimizer.save(archive);
  std::string bytes;
  archive.save_to([&bytes](const void* data, size_t size) {
    bytes.append(static_cast<const char*>(data), size);
    return size;
  });
  return bytes;
}

}  // namespace

std::vector<int> partition_parameters(const std::vector<int64_t>& numels, int world_size) {
  LOCKSTEP_CHECK(world_size >= 1, "partition_parameters: world size must be >= 1, got ", world_size);
  std::vector<size_t> order(numels.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return numels[a] > numels[b]; });
  std::vector<int64_t> load(static_cast<size_t>(world_size), 0);
  std::vector<int> owner(numels.size(), 0);
  for (size_t i : order) {
    const auto lightest = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
    owner[i] = lightest;
    load[static_cast<size_t>(lightest)] += numels[i];
  }
  return owner;
}

ZeroRedundancyOptimizer::Parts ZeroRedundancyOptimizer::make_parts(std::vector<at::Tensor> parameters,
                                                                   comm::CommunicatorPtr comm, const Factory& factory) {
  LOCKSTEP_CHECK(comm != nullptr, "ZeroRedundancyOptimizer needs a communicator");
  LOCKSTEP_CHECK(static_cast<bool>(factory), "ZeroRedundancyOptimizer needs a factory for the wrapped optimizer");
  const int rank = comm->rank();
  // A tensor listed twice (tied weights) is one parameter: one owner, one update.
  parameters = detail::unique_tensors(std::move(parameters));
  // Collective, as the all-gather below: a list one rank alone refuses fails every rank here, instead
  // of leaving the others in the all-gather until the timeout.
  comm::run_on_every_rank(
      *comm,
      [&parameters] {
        LOCKSTEP_CHECK(!parameters.empty(), "ZeroRedundancyOptimizer: no parameters");
        for (size_t i = 0; i < parameters.size(); ++i) {
          const at::Tensor& p = parameters[i];
          LOCKSTEP_CHECK(p.defined(), "ZeroRedundancyOptimizer: parameter ", i, " is undefined");
          LOCKSTEP_CHECK(p.scalar_type() == parameters[0].scalar_type() && p.device() == parameters[0].device(),
                         "ZeroRedundancyOptimizer needs one dtype and device for all parameters: parameter 0 is ",
                         parameters[0].scalar_type(), " on ", parameters[0].device(), ", parameter ", i, " is ",
                         p.scalar_type(), " on ", p.device());
        }
      },
      "ZeroRedundancyOptimizer");
  // Collective: the partition is derived locally, so the ranks must hold the same list.
  int64_t total = 0;
  for (const auto& p : parameters) total += p.numel();
  const at::Tensor mine = at::tensor({static_cast<int64_t>(parameters.size()), total, fingerprint(parameters)},
                                     at::TensorOptions().dtype(at::kLong));
  const at::Tensor all = at::empty({comm->size() * 3}, mine.options());
  comm->allgather(mine, all)->wait();
  const auto* v = all.data_ptr<int64_t>();
  for (int r = 0; r < comm->size(); ++r) {
    LOCKSTEP_CHECK(v[3 * r] == v[0] && v[3 * r + 1] == v[1] && v[3 * r + 2] == v[2],
                   "ZeroRedundancyOptimizer needs the same parameters on every rank: rank 0 has ", v[0],
                   " parameters (", v[1], " elements), rank ", r, " has ", v[3 * r], " (", v[3 * r + 1],
                   " elements)", v[3 * r] == v[0] && v[3 * r + 1] == v[1] ? " of other shapes" : "", " (this is rank ",
                   rank, ")");
  }

  Parts parts;
  std::vector<int64_t> numels;
  for (const auto& p : parameters) numels.push_back(p.numel());
  parts.owner = partition_parameters(numels, comm->size());
  std::vector<at::Tensor> owned;
  for (size_t i = 0; i < parameters.size(); ++i) {
    if (parts.owner[i] == rank) owned.push_back(parameters[i]);
  }
  parts.local = factory(owned);
  LOCKSTEP_CHECK(parts.local != nullptr, "ZeroRedundancyOptimizer: the factory returned no optimizer");
  // Counted over the groups: Optimizer::parameters() is deprecated (LibTorch 2.x warns at every call).
  std::size_t built = 0;
  for (const auto& group : parts.local->param_groups()) built += group.params().size();
  LOCKSTEP_CHECK(parts.local->param_groups().size() == 1 && built == owned.size(),
                 "ZeroRedundancyOptimizer: the factory must build one parameter group over exactly the ",
                 owned.size(), " parameters it is given; it built ", parts.local->param_groups().size(),
                 " group(s) with ", built, " parameters");
  parts.all = std::move(parameters);
  parts.comm = std::move(comm);
  return parts;
}

ZeroRedundancyOptimizer::ZeroRedundancyOptimizer(std::vector<at::Tensor> parameters, comm::CommunicatorPtr comm,
                                                 Factory factory)
    : ZeroRedundancyOptimizer(make_parts(std::move(parameters), std::move(comm), factory)) {}

ZeroRedundancyOptimizer::ZeroRedundancyOptimizer(Parts parts)
    : torch::optim::Optimizer(parts.all, parts.local->defaults().clone()),
      comm_(std::move(parts.comm)),
      local_(std::move(parts.local)),
      all_(std::move(parts.all)),
      owner_(std::move(parts.owner)) {
  const int world = comm_->size();
  shards_.resize(static_cast<size_t>(world));
  std::vector<int64_t> load(static_cast<size_t>(world), 0);
  for (size_t i = 0; i < all_.size(); ++i) {
    shards_[static_cast<size_t>(owner_[i])].push_back(static_cast<int64_t>(i));
    load[static_cast<size_t>(owner_[i])] += all_[i].numel();
  }
  slot_numel_ = *std::max_element(load.begin(), load.end());
}

ZeroRedundancyOptimizer::~ZeroRedundancyOptimizer() = default;

at::Tensor ZeroRedundancyOptimizer::step(LossClosure closure) {
  LOCKSTEP_CHECK(!closure, "ZeroRedundancyOptimizer::step does not take a closure (rank ", comm_->rank(), ")");
  // Only the one group over every parameter is sharded: one added since (add_param_group) would be
  // stepped by no rank.
  LOCKSTEP_CHECK(param_groups_.size() == 1 && param_groups_[0].params().size() == all_.size(),
                 "ZeroRedundancyOptimizer: it shards the one parameter group it was built with (", all_.size(),
                 " parameters); it now has ", param_groups_.size(), " group(s) (add_param_group?), whose ",
                 "parameters no rank would step. Build it over every parameter instead (rank ", comm_->rank(), ")");
  // The options a trainer or user set on this optimizer's group (lr, weight decay...) go to the wrapped one.
  local_->param_groups()[0].set_options(param_groups_[0].options().clone());
  {
    at::NoGradGuard no_grad;
    local_->step();
    gather_parameters();
  }
  ++steps_;
  return {};
}

void ZeroRedundancyOptimizer::gather_parameters() {
  const int world = comm_->size();
  if (world == 1) return;
  const int rank = comm_->rank();
  // Allocated at the first step, where the parameters are (a trainer moves the model after the
  // optimizer is built).
  const at::TensorOptions options = all_[0].options().requires_grad(false);
  if (!gathered_.defined() || gathered_.device() != options.device() || gathered_.scalar_type() != all_[0].scalar_type()) {
    gathered_ = at::empty({world * slot_numel_}, options);
  }
  at::Tensor slot = gathered_.narrow(0, rank * slot_numel_, slot_numel_);
  int64_t offset = 0;
  for (int64_t i : shards_[static_cast<size_t>(rank)]) {
    const at::Tensor& p = all_[static_cast<size_t>(i)];
    slot.narrow(0, offset, p.numel()).view(p.sizes()).copy_(p);  // logical order, whatever p's strides
    offset += p.numel();
  }
  comm_->allgather(slot, gathered_)->wait();  // in place: `slot` is this rank's slice
  for (int r = 0; r < world; ++r) {
    if (r == rank) continue;
    offset = 0;
    for (int64_t i : shards_[static_cast<size_t>(r)]) {
      at::Tensor& p = all_[static_cast<size_t>(i)];
      // The slot holds the parameter in logical (row-major) order, whatever its strides here: a
      // channels_last weight (Note [Channels last]) cannot be viewed flat, so the copy goes through
      // a view of the slot in the parameter's shape and copy_ writes it through the strides.
      p.copy_(gathered_.narrow(0, r * slot_numel_ + offset, p.numel()).view(p.sizes()));
      offset += p.numel();
    }
  }
}

void ZeroRedundancyOptimizer::consolidate_state(int to) {
  const int world = comm_->size();
  LOCKSTEP_CHECK(to >= 0 && to < world, "ZeroRedundancyOptimizer::consolidate_state: rank ", to,
                 " is not a rank of a world of ", world);
  // Note [ZeRO checkpoints]: onto one rank, the writer. Every rank holding every shard would keep
  // the whole state in memory on each, the very thing sharding saves.
  std::vector<std::string> gathered = comm::gather_strings(*comm_, serialise(*local_), to);
  consolidated_ = comm_->rank() == to ? std::move(gathered) : std::vector<std::string>{};
  consolidated_at_ = steps_;
  consolidated_to_ = to;
}

void ZeroRedundancyOptimizer::save(torch::serialize::OutputArchive& archive) const {
  const int rank = comm_->rank();
  LOCKSTEP_CHECK(consolidated_at_ == steps_,
                 "ZeroRedundancyOptimizer::save: each rank holds only its shard of the state; call "
                 "consolidate_state() on every rank after the last step, then save on the rank it gathered onto "
                 "(a Checkpointer does both). Rank ",
                 rank, ", ", steps_, " steps taken, state consolidated ",
                 consolidated_at_ < 0 ? std::string("never") : "after step " + std::to_string(consolidated_at_));
  LOCKSTEP_CHECK(rank == consolidated_to_, "ZeroRedundancyOptimizer::save: the state was consolidated onto rank ",
                 consolidated_to_, ", not this rank (", rank, "): save there, or consolidate_state(", rank, ")");
  LOCKSTEP_CHECK(!consolidated_.empty(), "ZeroRedundancyOptimizer::save: the state consolidated after step ",
                 consolidated_at_, " was saved already and released; call consolidate_state() again (rank ", rank,
                 ")");
  archive.write("zero_world_size", c10::IValue(static_cast<int64_t>(consolidated_.size())));
  archive.write("zero_owners", at::tensor(std::vector<int64_t>(owner_.begin(), owner_.end())));
  archive.write("zero_shapes", c10::IValue(fingerprint(all_)));
  for (size_t r = 0; r < consolidated_.size(); ++r) {
    const std::string& bytes = consolidated_[r];
    at::Tensor t = at::empty({static_cast<int64_t>(bytes.size())}, at::TensorOptions().dtype(at::kByte));
    std::copy(bytes.begin(), bytes.end(), reinterpret_cast<char*>(t.data_ptr<uint8_t>()));
    archive.write("zero_shard_" + std::to_string(r), t);
  }
  consolidated_.clear();
  consolidated_.shrink_to_fit();
}

void ZeroRedundancyOptimizer::load(torch::serialize::InputArchive& archive) {
  const int rank = comm_->rank();
  c10::IValue world;
  LOCKSTEP_CHECK(archive.try_read("zero_world_size", world),
                 "ZeroRedundancyOptimizer::load: this state was not written by a ZeroRedundancyOptimizer (no "
                 "zero_world_size entry; rank ",
                 rank, ")");
  LOCKSTEP_CHECK(world.toInt() == comm_->size(), "ZeroRedundancyOptimizer::load: the state was sharded over ",
                 world.toInt(), " ranks but this job has ", comm_->size(), " (rank ", rank, ")");
  at::Tensor owners;
  archive.read("zero_owners", owners);
  const std::vector<int64_t> mine(owner_.begin(), owner_.end());
  LOCKSTEP_CHECK(owners.numel() == static_cast<int64_t>(mine.size()) &&
                     torch::equal(owners.cpu(), at::tensor(mine)),
                 "ZeroRedundancyOptimizer::load: the state was written for another parameter list (",
                 owners.numel(), " parameters against ", mine.size(), " here; rank ", rank, ")");
  // The same count and owners, but other shapes: the state's buffers would fail the first step, in
  // LibTorch's words. Files written before the fingerprint have none.
  c10::IValue shapes;
  LOCKSTEP_CHECK(!archive.try_read("zero_shapes", shapes) || shapes.toInt() == fingerprint(all_),
                 "ZeroRedundancyOptimizer::load: the state was written for parameters of other shapes (the same ",
                 mine.size(), " parameters and owners; rank ", rank, ")");
  at::Tensor bytes;
  archive.read("zero_shard_" + std::to_string(rank), bytes);
  bytes = bytes.cpu().contiguous();
  torch::serialize::InputArchive shard;
  shard.load_from(reinterpret_cast<const char*>(bytes.data_ptr<uint8_t>()), static_cast<size_t>(bytes.numel()),
                  all_[0].device());
  local_->load(shard);
  consolidated_.clear();
  consolidated_at_ = -1;
}

}  // namespace lockstep::ddp
