#include "support/dist.hpp"

#include <torch/torch.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>

#include "lockstep/core/error.hpp"

namespace lockstep::testing {
namespace {
Runtime* g_runtime = nullptr;
std::filesystem::path g_temp_root;  // rank 0's pid, agreed on by the first shared_temp_dir
}
Runtime& runtime() {
  LOCKSTEP_CHECK(g_runtime != nullptr, "the multi-rank test main has not created the Runtime");
  return *g_runtime;
}
void set_runtime(Runtime* runtime) { g_runtime = runtime; }

void remove_shared_temp_dirs(bool keep) {
  if (g_temp_root.empty() || runtime().rank() != 0) return;
  if (keep) {
    std::fprintf(stderr, "the tests' files are kept in %s\n", g_temp_root.c_str());
    return;
  }
  std::error_code ignored;
  std::filesystem::remove_all(g_temp_root, ignored);
}

std::string shared_temp_dir(const std::string& name) {
  namespace fs = std::filesystem;
  if (g_temp_root.empty()) {
    at::Tensor pid = torch::full({1}, static_cast<double>(::getpid()), torch::kFloat64);
    comm().broadcast(pid)->wait();
    g_temp_root =
        fs::temp_directory_path() / ("lockstep_tests_" + std::to_string(static_cast<long long>(pid.item<double>())));
  }
  const fs::path dir = g_temp_root / name;
  if (comm().rank() == 0) {
    fs::remove_all(dir);
    fs::create_directories(dir);
  }
  comm().barrier()->wait();
  return dir.string();
}

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

int ranks_equal_to_rank0(const at::Tensor& tensor) {
  at::Tensor mine = tensor.detach().contiguous();
  if (mine.scalar_type() == at::kBool) mine = mine.to(at::kByte);  // not a communicator dtype
  at::Tensor root = mine.clone();
  comm().broadcast(root)->wait();
  at::Tensor count = torch::full({1}, torch::equal(root, mine) ? 1 : 0, torch::kInt);
  comm().allreduce(count)->wait();
  return count.item<int>();
}

bool communicator_healthy() {
  torch::Tensor t = torch::full({3}, static_cast<double>(comm().rank() + 1), torch::kFloat64);
  comm().allreduce(t)->wait();
  const int n = comm().size();
  return (t == n * (n + 1) / 2.0).all().item<bool>();
}
}  // namespace lockstep::testing
