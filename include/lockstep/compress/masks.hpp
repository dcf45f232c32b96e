#pragma once
// Magnitude pruning masks: pure functions from weights to boolean keep-masks (true = keep), exact
// in the number of pruned elements and deterministic (stable sorts; ties broken by position), so
// that ranks holding identical weights compute identical masks.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

namespace lockstep::compress {

enum class PruneGranularity {
  Unstructured,  // single weights by |w|
  Structured,    // whole output channels (dim 0: conv filters, linear rows) by their L2 norm
  NM,            // N:M: in every group of M consecutive weights of a row, the N largest |w| stay
};
enum class PruneScope {
  Layer,   // every layer reaches the sparsity on its own
  Global,  // one ranking across all layers; layers end up with different sparsities
};

// "unstructured", "structured", "n:m" / "layer", "global"; anything else throws naming the choices.
PruneGranularity parse_prune_granularity(const std::string& name);
std::string to_string(PruneGranularity granularity);
PruneScope parse_prune_scope(const std::string& name);
std::string to_string(PruneScope scope);

// The number of elements (unstructured) or channels (structured) that a fraction `sparsity` of
// `count` prunes: round to nearest, so the achieved sparsity is within half an element of the target.
int64_t prune_count(int64_t count, double sparsity);

// Unstructured, per layer: exactly prune_count(numel, sparsity) smallest |w| pruned, but at least one
// weight kept where sparsity < 1 (a small layer: 5 weights at 0.9 prune 4, not all 5).
at::Tensor unstructured_mask(const at::Tensor& weight, double sparsity);
// Unstructured, global: exactly prune_count(total, sparsity) smallest |w| over all weights pruned, but
// where sparsity < 1 every layer keeps its largest weight (a layer that would be emptied keeps one, and
// the next smallest weight elsewhere goes in its place).
std::vector<at::Tensor> global_unstructured_masks(const std::vector<at::Tensor>& weights, double sparsity);

// Structured, per layer: prune_count(out_channels, sparsity) output channels with the smallest L2
// norm pruned whole (at least one channel always stays).
at::Tensor channel_mask(const at::Tensor& weight, double sparsity);
// Structured, global: channels ranked across layers by their RMS (the L2 norm / sqrt(channel size), so
// layers of different fan-in compare fairly) and pruned in that order while the pruned elements stay
// within the target (so the achieved sparsity is below the target by less than one channel of the
// layer where it stopped); every layer keeps at least one channel.
std::vector<at::Tensor> global_channel_masks(const std::vector<at::Tensor>& weights, double sparsity);

// N:M: rows are weight[o] flattened (conv: in_channels x kh x kw); in every group of M consecutive
// weights the N largest |w| stay. Requires the row length to be a multiple of M (nm_applies).
at::Tensor nm_mask(const at::Tensor& weight, int64_t n, int64_t m);
bool nm_applies(const at::Tensor& weight, int64_t m);

// Fraction of zeros in `mask` (or of zero elements in a weight).
double sparsity_of(const at::Tensor& tensor);
// Output channels of `weight` whose weights are all zero.
int64_t zero_channels(const at::Tensor& weight);

}  // namespace lockstep::compress
