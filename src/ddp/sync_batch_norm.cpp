#include "lockstep/ddp/sync_batch_norm.hpp"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/nn/functional/batchnorm.h>

#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "lockstep/comm/work.hpp"
#include "core/autograd_compat.hpp"
#include "lockstep/core/error.hpp"

// Note [SyncBatchNorm statistics]
// Forward: each rank sends (count n_r, mean_r, M2_r = sum of squared deviations from mean_r) per
// channel; every rank then combines all ranks' triples in the same way from the same gathered data:
//   N = sum n_r,  mean = sum n_r mean_r / N,  M2 = sum M2_r + sum n_r (mean_r - mean)^2
// (Chan et al.'s pairwise update, summed over ranks at once). Deviations are taken from each rank's own
// mean, so there is none of the cancellation of E[x^2] - E[x]^2, and the combination runs in float64.
// Normalisation uses the biased variance M2 / N, the running variance the unbiased M2 / (N - 1), as
// a single process on the N samples would. Every rank gets bitwise the same mean and variance, so the
// running statistics stay bitwise equal on every rank without a broadcast.
// Backward: with xhat = (x - mean) * invstd, the single-process gradient is
//   dx = w * invstd * (dy - sum(dy) / N - xhat * sum(dy * xhat) / N)
// where the sums run over the global batch: one more all-gather of the per-rank sums (added in rank
// order, so bitwise equal everywhere). Both passes that touch whole activations per channel use
// LibTorch's fused kernels where they exist (inference batch_norm with the global statistics forward,
// native_batch_norm_backward for the per-rank sums), so synchronising costs little beyond the collectives. dweight and dbias stay this rank's sums; DataParallel averages
// them with the other parameters. Each rank's loss is its own mean, N/b times the global loss's share,
// and the average over ranks divides that back out: the result is the single process's gradient.
//
// Note [SyncBatchNorm collectives]
// Collectives match by issue order. A synchronised layer issues one all-gather in forward and one in
// backward, from the thread that runs them, on the same communicator as DataParallel's buckets; so
// every rank must run the same synchronised layers in the same order (the same model in training
// mode everywhere: DataParallel's model check covers the first half). Each payload starts with a tag,
// 2 x layer index + (0 forward, 1 backward), and every rank checks all ranks' tags (on CPU, where
// reading them is free): a rank out of step is an error on every rank naming both layers, not wrong
// statistics. On CUDA the tags travel but are not read (that would cost a host synchronisation per
// layer). Backward's all-gather queues behind any bucket all-reduce DataParallel launched before it,
// so overlap suffers while layers with SyncBatchNorm remain in backward; as with PyTorch's.

namespace lockstep::ddp {

struct SyncBatchNormGroup {
  comm::CommunicatorPtr comm;
  std::vector<std::string> names;  // layer index -> module name, the same on every rank
};

namespace {

constexpr double kForwardPhase = 0.0;
constexpr double kBackwardPhase = 1.0;

std::vector<int64_t> reduction_dims(const at::Tensor& input) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < input.dim(); ++d) dims.push_back(d);
  return dims;
}

// [C] -> [1, C, 1, ...] to broadcast against the input.
at::Tensor per_channel(const at::Tensor& values, const at::Tensor& input) {
  std::vector<int64_t> shape(static_cast<std::size_t>(input.dim()), 1);
  shape[1] = values.size(0);
  return values.view(shape);
}

at::ScalarType compute_type(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::string describe_layer(const SyncBatchNormGroup& group, double tag) {
  const auto index = static_cast<std::size_t>(tag / 2);
  const bool backward = static_cast<int64_t>(tag) % 2 == 1;
  std::ostringstream out;
  out << "layer #" << index;
  if (index < group.names.size()) out << " '" << group.names[index] << "'";
  out << (backward ? " (backward)" : " (forward)");
  return out.str();
}

// All-gathers this rank's payload ([tag, ...] in float64) and returns [world, payload size]. On CPU,
// checks that every rank sent the same tag (Note [SyncBatchNorm collectives]).
at::Tensor gather_checked(const SyncBatchNormGroup& group, const at::Tensor& payload, double tag) {
  comm::Communicator& comm = *group.comm;
  at::Tensor gathered = at::empty({comm.size(), payload.numel()}, payload.options());
  comm.allgather(payload, gathered)->wait();
  if (!gathered.is_cuda()) {
    const at::Tensor tags = gathered.select(1, 0).contiguous();
    const double* t = tags.data_ptr<double>();
    for (int r = 0; r < comm.size(); ++r) {
      if (t[r] == tag) continue;
      std::ostringstream ranks;
      for (int q = 0; q < comm.size(); ++q) ranks << "\n  rank " << q << ": " << describe_layer(group, t[q]);
      LOCKSTEP_FAIL("SyncBatchNorm: the ranks are out of step; every rank must run the same synchronised layers ",
                    "in the same order (the same model, in training mode). This collective found:", ranks.str(),
                    "\nThis is rank ", comm.rank(), ".");
    }
  }
  return gathered;
}

// [tag, count, a..., b...] in float64 on a's device. The head is filled there (two fill kernels, the
// values passed as kernel arguments): copying a host-made tensor in (.to(device), a blocking copy from
// pageable memory) would make the host wait for all the work queued on the GPU, in every forward and
// backward of every layer (Note [No host sync per step]).
at::Tensor payload_of(double tag, double count, const at::Tensor& a, const at::Tensor& b) {
  const auto options = at::TensorOptions().dtype(at::kDouble).device(a.device());
  return at::cat({at::full({1}, tag, options), at::full({1}, count, options), a.to(at::kDouble), b.to(at::kDouble)});
}

// Backward of the synchronised forward (Note [SyncBatchNorm statistics]).
struct SyncBatchNormBackward : public torch::autograd::Node {
  std::shared_ptr<const SyncBatchNormGroup> group;
  double tag = 0;
  torch::autograd::SavedVariable input_;
  torch::autograd::SavedVariable weight_;
  at::Tensor mean;    // [C], compute type
  at::Tensor invstd;  // [C], compute type
  at::Tensor total;   // scalar, float64: the global sample count N
  bool affine = false;

  std::string name() const override { return "lockstep::ddp::SyncBatchNormBackward"; }

  void release_variables() override {
    input_.reset_data();
    weight_.reset_data();
  }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    // The engine enables grad mode here only for create_graph: the collectives are not differentiable.
    LOCKSTEP_CHECK(!at::GradMode::is_enabled(), "SyncBatchNorm (", describe_layer(*group, tag),
                   ") has no double backward: backward with create_graph = true is not supported");
    const at::Tensor input = input_.unpack(compat::owning_node_ptr(this));
    const at::Tensor weight = affine ? weight_.unpack(compat::owning_node_ptr(this)) : at::Tensor();
    const at::ScalarType type = compute_type(input);
    const int64_t channels = mean.size(0);
    const at::Tensor x = input.to(type);
    // An unused output still takes part, with a zero gradient, so the ranks' collectives stay in step.
    const at::Tensor dy = grads[0].defined() ? grads[0].to(type) : at::zeros_like(x);
    const at::Tensor w = affine ? weight.to(type) : at::ones({channels}, x.options());
    // This rank's sum(dy) and sum(dy * xhat) per channel, in one pass of LibTorch's fused kernel
    // (they are also this rank's bias and weight gradients).
    // A rank without samples contributes zeros (the kernel would divide by its count of zero).
    at::Tensor sum_dy_xhat = at::zeros({channels}, x.options());
    at::Tensor sum_dy = at::zeros({channels}, x.options());
    if (x.numel() > 0) {
      std::tie(std::ignore, sum_dy_xhat, sum_dy) = at::native_batch_norm_backward(
          dy, x, w, {}, {}, mean, invstd, /*train=*/true, 0.0, {false, true, true});
    }

    torch::autograd::variable_list result(3);
    if (should_compute_output(0)) {
      const at::Tensor gathered = gather_checked(*group, payload_of(tag, 0.0, sum_dy, sum_dy_xhat), tag);
      const at::Tensor sums = gathered.sum(0);
      const at::Tensor mean_dy = (sums.narrow(0, 2, channels) / total).to(type);
      const at::Tensor mean_dy_xhat = (sums.narrow(0, 2 + channels, channels) / total).to(type);
      // dx = s * (dy - mean_dy - xhat * mean_dy_xhat) with s = w * invstd and xhat = (x - mean) * invstd,
      // rearranged to dy * s + x * k + c: two passes over the activations.
      const at::Tensor scale = w * invstd;
      const at::Tensor slope = invstd * mean_dy_xhat;  // per unit of (x - mean)
      const at::Tensor k = -(slope * scale);
      const at::Tensor c = (mean * slope - mean_dy) * scale;
      at::Tensor dx = at::addcmul(per_channel(c, x), x, per_channel(k, x));
      dx.addcmul_(dy, per_channel(scale, x));
      result[0] = dx.to(input.scalar_type());
    }
    if (affine && should_compute_output(1)) result[1] = sum_dy_xhat.to(weight.scalar_type());
    if (affine && should_compute_output(2)) result[2] = sum_dy.to(weight.scalar_type());
    return result;
  }
};

}  // namespace

SyncBatchNormImpl::SyncBatchNormImpl(const torch::nn::BatchNormOptions& options)
    : NormImplBase<2, SyncBatchNormImpl, torch::nn::BatchNormOptions>(options) {}

// Up to some LibTorch 2.x, torch::nn::Module is a virtual base (of Cloneable), which the most derived
// class must copy (or it is default-constructed); later it is an ordinary base, which only the direct
// base may name. Assigning it in the body is right in both (Note [LibTorch versions]).
SyncBatchNormImpl::SyncBatchNormImpl(const SyncBatchNormImpl& other)
    : NormImplBase<2, SyncBatchNormImpl, torch::nn::BatchNormOptions>(other) {
  torch::nn::Module::operator=(other);
}

SyncBatchNormImpl& SyncBatchNormImpl::operator=(const SyncBatchNormImpl& other) {
  NormImplBase<2, SyncBatchNormImpl, torch::nn::BatchNormOptions>::operator=(other);
  group_ = nullptr;
  index_ = 0;
  return *this;
}

SyncBatchNormImpl::~SyncBatchNormImpl() = default;

bool SyncBatchNormImpl::synchronised() const { return group_ != nullptr && group_->comm->size() > 1; }

void SyncBatchNormImpl::_check_input_dim(const torch::Tensor& input) {
  LOCKSTEP_CHECK(input.dim() >= 2 && input.size(1) == options.num_features(), "SyncBatchNorm(",
                 options.num_features(), "): expected input [N, ", options.num_features(), ", *], got ", input.sizes());
}

torch::Tensor SyncBatchNormImpl::forward(const torch::Tensor& input) {
  _check_input_dim(input);
  // As torch::nn::BatchNorm2d: a momentum of nullopt is a cumulative average.
  double momentum = options.momentum().value_or(0.0);
  if (is_training() && options.track_running_stats() && num_batches_tracked.defined()) {
    num_batches_tracked += 1;
    if (!options.momentum().has_value()) momentum = 1.0 / num_batches_tracked.item<double>();
  }
  if (is_training() && synchronised()) return forward_synchronised(input, momentum);
  return torch::nn::functional::detail::batch_norm(input, running_mean, running_var, weight, bias,
                                                   is_training() || !options.track_running_stats(), momentum,
                                                   options.eps());
}

torch::Tensor SyncBatchNormImpl::forward_synchronised(const torch::Tensor& input, double momentum) {
  const SyncBatchNormGroup& group = *group_;
  const double tag = 2.0 * static_cast<double>(index_) + kForwardPhase;
  const at::ScalarType type = compute_type(input);
  const int64_t channels = options.num_features();
  const std::vector<int64_t> dims = reduction_dims(input);

  at::Tensor mean;
  at::Tensor invstd;
  at::Tensor total;
  at::Tensor output;
  {
    at::NoGradGuard no_grad;
    const at::Tensor x = input.to(type);
    const int64_t count = x.numel() / channels;
    at::Tensor local_mean = at::zeros({channels}, x.options());
    at::Tensor local_m2 = at::zeros({channels}, x.options());
    if (count > 0) {
      // Two passes on purpose: at::var_mean's one-pass (Welford) CPU kernel over dims {0, 2, 3} made a
      // width-16 ResNet-18 step 42 -> 60 ms in LibTorch 1.13.
      local_mean = x.mean(dims);
      local_m2 = (x - per_channel(local_mean, x)).square().sum(dims);
    }
    const at::Tensor gathered =
        gather_checked(group, payload_of(tag, static_cast<double>(count), local_mean, local_m2), tag);
    const at::Tensor counts = gathered.select(1, 1).unsqueeze(1);  // [world, 1]
    const at::Tensor means = gathered.narrow(1, 2, channels);
    const at::Tensor m2s = gathered.narrow(1, 2 + channels, channels);
    total = counts.sum();
    if (!total.is_cuda()) {
      LOCKSTEP_CHECK(total.item<double>() > 1, "SyncBatchNorm: expected more than 1 value per channel over all ranks ",
                     "when training, got input ", input.sizes(), " on rank ", group.comm->rank(), " and ",
                     total.item<double>(), " in all");
    }
    const at::Tensor global_mean = (counts * means).sum(0) / total;
    const at::Tensor m2 = m2s.sum(0) + (counts * (means - global_mean).square()).sum(0);
    mean = global_mean.to(type);
    invstd = (m2 / total + options.eps()).rsqrt().to(type);
    if (options.track_running_stats()) {
      // On a GPU the count stays on the device (reading it would synchronise every layer): a step with
      // at most one value per channel over all ranks, which the CPU path refuses above, leaves the
      // running statistics as they were instead of pulling the variance to 0 (one value) or writing
      // nan (none).
      const at::Tensor kept_mean = total.is_cuda() ? running_mean.clone() : at::Tensor();
      const at::Tensor kept_var = total.is_cuda() ? running_var.clone() : at::Tensor();
      running_mean.mul_(1.0 - momentum).add_(global_mean.to(running_mean.scalar_type()), momentum);
      const at::Tensor unbiased = m2 / (total - 1).clamp_min(1);
      running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.scalar_type()), momentum);
      if (total.is_cuda()) {
        const at::Tensor enough = total.gt(1);
        running_mean.copy_(at::where(enough, running_mean, kept_mean));
        running_var.copy_(at::where(enough, running_var, kept_var));
      }
    }
    if (input.scalar_type() == type && (!options.affine() || weight.scalar_type() == type)) {
      // LibTorch's fused inference kernel with the global statistics: one pass instead of four.
      output = at::batch_norm(input, weight, bias, mean, (m2 / total).to(type), /*training=*/false, 0.0,
                              options.eps(), at::globalContext().userEnabledCuDNN());
    } else {
      at::Tensor y = (x - per_channel(mean, x)) * per_channel(invstd, x);
      if (options.affine()) y = y * per_channel(weight.to(type), x) + per_channel(bias.to(type), x);
      output = y.to(input.scalar_type());
    }
  }

  const bool affine = options.affine();
  if (torch::autograd::compute_requires_grad(input, affine ? weight : at::Tensor(), affine ? bias : at::Tensor())) {
    auto node = compat::make_autograd_node<SyncBatchNormBackward>();
    node->group = group_;
    node->tag = 2.0 * static_cast<double>(index_) + kBackwardPhase;
    node->input_ = torch::autograd::SavedVariable(input, /*is_output=*/false);
    if (affine) node->weight_ = torch::autograd::SavedVariable(weight, /*is_output=*/false);
    node->mean = mean;
    node->invstd = invstd;
    node->total = total;
    node->affine = affine;
    node->set_next_edges(torch::autograd::collect_next_edges(input, affine ? weight : at::Tensor(),
                                                             affine ? bias : at::Tensor()));
    torch::autograd::set_history(output, node);
  }
  return output;
}

void SyncBatchNormImpl::pretty_print(std::ostream& stream) const {
  stream << "lockstep::ddp::SyncBatchNorm(" << options.num_features() << ", eps=" << options.eps() << ", momentum=";
  if (options.momentum().has_value()) stream << *options.momentum();
  else stream << "None";
  stream << ", affine=" << std::boolalpha << options.affine()
         << ", track_running_stats=" << options.track_running_stats() << ", synchronised=" << synchronised() << ")";
}

std::size_t attach_sync_batch_norm(torch::nn::Module& module, comm::CommunicatorPtr comm) {
  return SyncBatchNormAttachment(module, std::move(comm)).release();
}

std::size_t SyncBatchNormAttachment::release() {
  const std::size_t count = layers_.size();
  layers_.clear();
  return count;
}

SyncBatchNormAttachment::SyncBatchNormAttachment(torch::nn::Module& module, comm::CommunicatorPtr comm) {
  LOCKSTEP_CHECK(comm != nullptr, "attach_sync_batch_norm needs a communicator");
  auto group = std::make_shared<SyncBatchNormGroup>();
  group->comm = std::move(comm);
  for (const auto& item : module.named_modules(/*name_prefix=*/"", /*include_self=*/true)) {
    if (auto layer = std::dynamic_pointer_cast<SyncBatchNormImpl>(item.value())) {
      layers_.push_back(std::move(layer));
      group->names.push_back(item.key().empty() ? std::string("(the model itself)") : item.key());
    }
  }
  for (std::size_t i = 0; i < layers_.size(); ++i) {
    layers_[i]->group_ = group;
    layers_[i]->index_ = i;
  }
  group_ = std::move(group);
}

SyncBatchNormAttachment::~SyncBatchNormAttachment() {
  for (const auto& layer : layers_) {
    if (layer->group_ != group_) continue;  // attached again since, to another group
    layer->group_ = nullptr;
    layer->index_ = 0;
  }
}

std::size_t detach_sync_batch_norm(torch::nn::Module& module) {
  std::size_t attached = 0;
  for (const auto& item : module.modules(/*include_self=*/true)) {
    if (auto* layer = dynamic_cast<SyncBatchNormImpl*>(item.get())) {
      if (layer->group_ != nullptr) ++attached;
      layer->group_ = nullptr;
      layer->index_ = 0;
    }
  }
  return attached;
}

}  // namespace lockstep::ddp
