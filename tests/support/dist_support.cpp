#include "support/dist.hpp"

#include <torch/torch.h>

#include "lockstep/core/error.hpp"

namespace lockstep::testing {
namespace {
Runtime* g_runtime = nullptr;
}
Runtime& runtime() {
  LOCKSTEP_CHECK(g_runtime != nullptr, "the multi-rank test main has not created the Runtime");
  return *g_runtime;
}
void set_runtime(Runtime* runtime) { g_runtime = runtime; }

bool identical_across_ranks(torch::nn::Module& model) {
  std::vector<torch::Tensor> flat;
  for (const auto& p : model.parameters()) flat.push_back(p.detach().reshape({-1}));
  torch::Tensor mine = torch::cat(flat);
  torch::Tensor all = torch::empty({comm().size() * mine.numel()}, mine.options());
  comm().allgather(mine, all)->wait();
  bool same = true;
  for (int r = 1; r < comm().size(); ++r) {
    same = same && torch::equal(all.narrow(0, r * mine.numel(), mine.numel()), all.narrow(0, 0, mine.numel()));
  }
  return same;
}
}  // namespace lockstep::testing
