#include "lockstep/compress/masks.hpp"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "lockstep/core/error.hpp"

namespace lockstep::compress {
namespace {

void check_sparsity(double sparsity, const char* what) {
  LOCKSTEP_CHECK(sparsity >= 0.0 && sparsity <= 1.0, what, ": sparsity must be in [0, 1], got ", sparsity);
}

void check_weight(const at::Tensor& weight, const char* what) {
  LOCKSTEP_CHECK(weight.defined() && weight.is_floating_point(), what, ": needs a floating-point weight, got ",
                 weight.defined() ? std::string(c10::toString(weight.scalar_type())) : std::string("undefined"));
}

// Indices of `scores` in ascending order, ties by position (a stable sort), as int64 on the CPU.
at::Tensor ascending_order(const at::Tensor& scores) {
  return std::get<1>(at::sort(scores.detach().to(at::kCPU, at::kFloat).contiguous(), /*stable=*/true, 0, false));
}

// A keep-mask over `numel` positions with the first `k` of `order` pruned.
at::Tensor mask_from_order(const at::Tensor& order, int64_t k, int64_t numel) {
  at::Tensor keep = at::ones({numel}, at::kBool);
  if (k > 0) keep.index_fill_(0, order.narrow(0, 0, k), false);
  return keep;
}

// L2 norm of each output channel (dim 0) of `weight`.
at::Tensor channel_norms(const at::Tensor& weight) {
  return weight.detach().to(at::kCPU, at::kFloat).reshape({weight.size(0), -1}).norm(2, {1});
}

}  // namespace

PruneGranularity parse_prune_granularity(const std::string& name) {
  if (name == "unstructured") return PruneGranularity::Unstructured;
  if (name == "structured") return PruneGranularity::Structured;
  if (name == "n:m") return PruneGranularity::NM;
  LOCKSTEP_FAIL("unknown pruning granularity '", name, "' (expected unstructured, structured or n:m)");
}

std::string to_string(PruneGranularity granularity) {
  switch (granularity) {
    case PruneGranularity::Unstructured: return "unstructured";
    case PruneGranularity::Structured: return "structured";
    case PruneGranularity::NM: return "n:m";
  }
  return "?";
}

PruneScope parse_prune_scope(const std::string& name) {
  if (name == "layer") return PruneScope::Layer;
  if (name == "global") return PruneScope::Global;
  LOCKSTEP_FAIL("unknown pruning scope '", name, "' (expected layer or global)");
}

std::string to_string(PruneScope scope) { return scope == PruneScope::Layer ? "layer" : "global"; }

int64_t prune_count(int64_t count, double sparsity) {
  check_sparsity(sparsity, "prune_count");
  return std::min<int64_t>(count, std::llround(sparsity * static_cast<double>(count)));
}

at::Tensor unstructured_mask(const at::Tensor& weight, double sparsity) {
  check_weight(weight, "unstructured_mask");
  const int64_t numel = weight.numel();
  // A sparsity below 1 keeps at least one weight: rounding would prune all of a small layer (5
  // weights at 0.9 round to 5), disconnecting its outputs, as channel_mask keeps one channel.
  const int64_t count = prune_count(numel, sparsity);  // checks the sparsity
  const int64_t k = sparsity < 1.0 ? std::min(count, numel - 1) : count;
  if (k == 0) return at::ones(weight.sizes(), at::kBool);
  return mask_from_order(ascending_order(weight.detach().abs().reshape({-1})), k, numel).view(weight.sizes());
}

std::vector<at::Tensor> global_unstructured_masks(const std::vector<at::Tensor>& weights, double sparsity) {
  LOCKSTEP_CHECK(!weights.empty(), "global_unstructured_masks: no weights");
  std::vector<at::Tensor> flat;
  for (const auto& w : weights) {
    check_weight(w, "global_unstructured_masks");
    flat.push_back(w.detach().to(at::kCPU, at::kFloat).abs().reshape({-1}));
  }
  at::Tensor all = at::cat(flat);
  const int64_t total = all.numel();
  int64_t k = prune_count(total, sparsity);  // checks the sparsity
  if (sparsity < 1.0) {
    // Every layer keeps its largest weight, as unstructured_mask and global_channel_masks keep one:
    // a layer of small weights (a classifier initialised at a smaller scale) would otherwise be
    // emptied at a high target, disconnecting everything behind it. Ranked last, those weights are
    // never among the k pruned; only a layer that would have lost every weight changes.
    int64_t offset = 0, kept = 0;
    for (const auto& f : flat) {
      if (f.numel() > 0) {
        // The last of its largest ties (the stable order puts it last): argmax takes the first.
        const int64_t largest = f.numel() - 1 - f.flip({0}).argmax().item<int64_t>();
        all[offset + largest] = std::numeric_limits<float>::infinity();
        ++kept;
      }
      offset += f.numel();
    }
    k = std::min(k, total - kept);
  }
  at::Tensor keep = k == 0 ? at::ones({total}, at::kBool) : mask_from_order(ascending_order(all), k, total);
  std::vector<at::Tensor> masks;
  int64_t offset = 0;
  for (const auto& w : weights) {
    masks.push_back(keep.narrow(0, offset, w.numel()).clone().view(w.sizes()));
    offset += w.numel();
  }
  return masks;
}

at::Tensor channel_mask(const at::Tensor& weight, double sparsity) {
  check_weight(weight, "channel_mask");
  LOCKSTEP_CHECK(weight.dim() >= 2, "structured pruning needs a weight with output channels (2+ dims), got shape ",
                 weight.sizes());
  const int64_t channels = weight.size(0);
  const int64_t k = std::min(prune_count(channels, sparsity), channels - 1);
  at::Tensor keep_channels = mask_from_order(ascending_order(channel_norms(weight)), k, channels);
  std::vector<int64_t> shape(weight.dim(), 1);
  shape[0] = channels;
  return keep_channels.view(shape).expand(weight.sizes()).clone();
}

std::vector<at::Tensor> global_channel_masks(const std::vector<at::Tensor>& weights, double sparsity) {
  LOCKSTEP_CHECK(!weights.empty(), "global_channel_masks: no weights");
  check_sparsity(sparsity, "global_channel_masks");
  std::vector<at::Tensor> scores;
  std::vector<int64_t> layer_of, channel_of, size_of;
  int64_t total = 0;
  for (size_t l = 0; l < weights.size(); ++l) {
    const at::Tensor& w = weights[l];
    check_weight(w, "global_channel_masks");
    LOCKSTEP_CHECK(w.dim() >= 2, "structured pruning needs weights with output channels, got shape ", w.sizes());
    const int64_t per_channel = w.numel() / w.size(0);
    scores.push_back(channel_norms(w) / std::sqrt(static_cast<double>(per_channel)));
    for (int64_t c = 0; c < w.size(0); ++c) {
      layer_of.push_back(static_cast<int64_t>(l));
      channel_of.push_back(c);
      size_of.push_back(per_channel);
    }
    total += w.numel();
  }
  const at::Tensor order = ascending_order(at::cat(scores));
  const int64_t budget = prune_count(total, sparsity);
  std::vector<at::Tensor> keep;
  std::vector<int64_t> remaining;
  for (const auto& w : weights) {
    keep.push_back(at::ones({w.size(0)}, at::kBool));
    remaining.push_back(w.size(0));
  }
  const int64_t* index = order.data_ptr<int64_t>();
  int64_t pruned = 0;
  for (int64_t i = 0; i < order.numel(); ++i) {
    const int64_t j = index[i];
    const int64_t l = layer_of[j];
    if (remaining[l] == 1) continue;         // never empty a layer
    if (pruned + size_of[j] > budget) break;  // stop at the first channel that would overshoot
    keep[l][channel_of[j]] = false;
    --remaining[l];
    pruned += size_of[j];
  }
  std::vector<at::Tensor> masks;
  for (size_t l = 0; l < weights.size(); ++l) {
    std::vector<int64_t> shape(weights[l].dim(), 1);
    shape[0] = weights[l].size(0);
    masks.push_back(keep[l].view(shape).expand(weights[l].sizes()).clone());
  }
  return masks;
}

bool nm_applies(const at::Tensor& weight, int64_t m) {
  return weight.dim() >= 2 && m > 0 && (weight.numel() / weight.size(0)) % m == 0;
}

at::Tensor nm_mask(const at::Tensor& weight, int64_t n, int64_t m) {
  check_weight(weight, "nm_mask");
  LOCKSTEP_CHECK(m >= 1 && n >= 0 && n <= m, "N:M pruning needs 0 <= N <= M and M >= 1, got ", n, ":", m);
  LOCKSTEP_CHECK(nm_applies(weight, m), "N:M pruning with M = ", m, " needs rows (weight[o] flattened) whose length is a ",
                 "multiple of M; weight of shape ", weight.sizes(), " has rows of ",
                 weight.dim() >= 2 ? weight.numel() / weight.size(0) : weight.numel());
  at::Tensor groups = weight.detach().to(at::kCPU, at::kFloat).abs().reshape({-1, m});
  // Descending and stable: the N largest of each group, ties to the earlier position.
  at::Tensor order = std::get<1>(at::sort(groups, /*stable=*/true, 1, /*descending=*/true));
  at::Tensor keep = at::zeros(groups.sizes(), at::kBool);
  if (n > 0) keep.scatter_(1, order.narrow(1, 0, n), true);
  return keep.view(weight.sizes());
}

double sparsity_of(const at::Tensor& tensor) {
  if (tensor.numel() == 0) return 0.0;
  const int64_t zeros = tensor.numel() - tensor.count_nonzero().item<int64_t>();
  return static_cast<double>(zeros) / static_cast<double>(tensor.numel());
}

int64_t zero_channels(const at::Tensor& weight) {
  if (weight.dim() < 1 || weight.numel() == 0) return 0;
  return weight.detach().reshape({weight.size(0), -1}).ne(0).any(1).logical_not().sum().item<int64_t>();
}

}  // namespace lockstep::compress
