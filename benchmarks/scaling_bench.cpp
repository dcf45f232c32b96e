// Strong scaling of data-parallel training: a fixed global batch per step, trained by one worker and then
// split over all n ranks, in one run. Prints T1 (one worker, the whole global batch, no communication),
// Tn (n ranks under DataParallel, global batch / n each, the slowest rank's step), the ideal T1/n, the
// speedup T1/Tn and the efficiency speedup/n.
//
//   mpirun -np 4 build/benchmarks/scaling_bench [--model resnet|mlp] [--global-batch 64] [--steps 10]
//       [--warmup 2] [--resnet-width 32] [--mlp-width 1024] [--json [FILE]]
//
// "One worker" is one rank's share of the machine: the Runtime gives each of the n ranks on a node its
// share of the cores (lockstep::Runtime), and T1 runs on rank 0 with that share, as one GPU of n would.
// While rank 0 measures T1 the other ranks wait in a barrier, on their own cores. Run it once per rank
// count (-np 1, 2, 4, ...) for a curve; each run measures its own T1, so the ratios come from one run.
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "bench_cli.hpp"
#include "bench_report.hpp"
#include "bench_workloads.hpp"
#include "lockstep/comm/work.hpp"
#include "lockstep/ddp/data_parallel.hpp"
#include "lockstep/runtime.hpp"

namespace {

using Clock = std::chrono::steady_clock;

struct Options {
  std::string model = "resnet";
  std::int64_t global_batch = 64;
  int steps = 10;
  int warmup = 2;
  std::int64_t resnet_width = 32;
  std::int64_t mlp_width = 1024;
  bool json = false;
  std::string json_file;
};

const char* const kDescription =
    "Strong scaling of data-parallel training: one worker trains a fixed global batch per step, then all ranks "
    "split it under DataParallel; prints T1, Tn, the ideal T1/n, the speedup T1/Tn and the efficiency "
    "speedup/n (MPI, CPU tensors).";

void add_options(CLI::App& app, Options& o) {
  app.add_option("--model", o.model, "the workload: ResNet-18 on 28x28 images, or an MLP of 4 hidden layers")
      ->capture_default_str()
      ->check(CLI::IsMember({"resnet", "mlp"}));
  app.add_option("--global-batch", o.global_batch, "images per step over all ranks (a multiple of the rank count)")
      ->capture_default_str()
      ->check(bench::at_least<std::int64_t>(1));
  app.add_option("--steps", o.steps, "timed steps, each way")->capture_default_str()->check(bench::at_least(1));
  app.add_option("--warmup", o.warmup, "untimed steps first, each way")
      ->capture_default_str()
      ->check(bench::at_least(0));
  app.add_option("--resnet-width", o.resnet_width, "ResNet-18 width (64: the standard one)")
      ->capture_default_str()
      ->check(bench::at_least<std::int64_t>(1));
  app.add_option("--mlp-width", o.mlp_width, "MLP hidden width")
      ->capture_default_str()
      ->check(bench::at_least<std::int64_t>(1));
  // Optional value: bare --json prints the JSON on stdout instead of the table, --json FILE writes it there.
  CLI::Option* json = app.add_option("--json", o.json_file, "JSON instead of the table: on stdout, or into FILE")
                          ->expected(0, 1);
  app.callback([&o, json] { o.json = json->count() > 0; });
}

// Seconds per step of `warmup` + `steps` SGD steps on (x, y); `dp` (if any) reduces the gradients.
std::vector<double> time_steps(const bench::Model& w, torch::nn::Module& model, const torch::Tensor& x,
                               const torch::Tensor& y, const Options& o, lockstep::ddp::DataParallel* dp) {
  torch::optim::SGD optimizer(model.parameters(), torch::optim::SGDOptions(0.01).momentum(0.9));
  std::vector<double> seconds;
  for (int s = 0; s < o.warmup + o.steps; ++s) {
    const auto start = Clock::now();
    optimizer.zero_grad();
    if (dp != nullptr) dp->before_forward();
    torch::Tensor loss = torch::nn::functional::cross_entropy(w.forward(model, x), y);
    if (dp != nullptr) dp->before_backward();
    loss.backward();
    optimizer.step();
    if (s >= o.warmup) seconds.push_back(std::chrono::duration<double>(Clock::now() - start).count());
  }
  return seconds;
}

struct Result {
  std::string model;
  std::int64_t global_batch = 0;
  int ranks = 0;
  double t1_s = 0, tn_s = 0;
  double speedup() const { return t1_s / tn_s; }
  double efficiency() const { return speedup() / ranks; }
};

nlohmann::json to_json(const Result& r, int threads, const Options& o) {
  return {{"benchmark", "scaling"},
          {"model", r.model},
          {"global_batch", r.global_batch},
          {"ranks", r.ranks},
          {"threads_per_rank", threads},
          {"steps", o.steps},
          {"warmup", o.warmup},
          {"t1_ms", r.t1_s * 1e3},
          {"tn_ms", r.tn_s * 1e3},
          {"ideal_tn_ms", r.t1_s * 1e3 / r.ranks},
          {"t1_images_per_s", r.global_batch / r.t1_s},
          {"tn_images_per_s", r.global_batch / r.tn_s},
          {"speedup", r.speedup()},
          {"efficiency", r.efficiency()}};
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app(kDescription, "scaling_bench");
  add_options(app, o);
  if (const std::optional<int> exit_code = bench::parse(app, argc, argv)) return *exit_code;

  lockstep::RuntimeOptions runtime_options;
  runtime_options.device = "cpu";
  lockstep::Runtime runtime(argc, argv, runtime_options);
  auto comm = runtime.communicator();
  const int rank = runtime.rank();
  const int n = runtime.size();
  if (o.global_batch % n != 0) {  // every rank knows n: every rank leaves alike
    if (rank == 0) {
      std::fprintf(stderr, "scaling_bench: --global-batch %lld does not split over %d ranks; give a multiple of %d\n",
                   static_cast<long long>(o.global_batch), n, n);
    }
    return bench::kUsageError;
  }
  bench::Model w = o.model == "resnet" ? bench::resnet_model(o.resnet_width) : bench::mlp_model(o.mlp_width);
  w.make = [make = std::move(w.make)] {  // the same initial weights on every rank and for both ways
    torch::manual_seed(1);
    return make();
  };
  torch::manual_seed(7);  // the same global batch on every rank
  const torch::Tensor x = torch::randn({o.global_batch, 1, 28, 28});
  const torch::Tensor y = torch::randint(10, {o.global_batch}, torch::kLong);

  // T1: one worker, the whole global batch; the others wait in the barrier.
  double t1 = 0;
  if (rank == 0) {
    auto model = w.make();
    t1 = bench::median(time_steps(w, *model, x, y, o, nullptr));
    std::fprintf(stderr, "done: T1 on rank 0\n");  // stderr: in --json mode too
  }
  // Unbounded: T1 is one worker's share of the cores on the whole global batch, and may well take longer
  // than the communicator's timeout (600 s unless LOCKSTEP_TIMEOUT_S), which is for a peer that died.
  comm->barrier()->wait(lockstep::comm::kMaxTimeout);

  // Tn: every rank its slice, under DataParallel; a step takes as long as its slowest rank.
  auto model = w.make();
  lockstep::ddp::DataParallel dp(model, comm);
  const std::int64_t slice = o.global_batch / n;
  std::vector<double> steps =
      time_steps(w, *model, x.narrow(0, rank * slice, slice), y.narrow(0, rank * slice, slice), o, &dp);
  torch::Tensor slowest = torch::tensor(steps, torch::kFloat64);
  comm->allreduce(slowest, {lockstep::comm::ReduceOp::Max})->wait();
  steps.assign(slowest.data_ptr<double>(), slowest.data_ptr<double>() + slowest.numel());

  Result r;
  r.model = w.name;
  r.global_batch = o.global_batch;
  r.ranks = n;
  r.t1_s = t1;
  r.tn_s = bench::median(steps);
  if (rank != 0) return 0;
  const nlohmann::json doc = to_json(r, torch::get_num_threads(), o);
  if (o.json) {
    if (o.json_file.empty()) {
      std::cout << doc.dump(2) << "\n";
      return 0;
    }
    return bench::write_json("scaling_bench", o.json_file, doc) ? 0 : 1;
  }
  std::printf("strong scaling, %d ranks, %d intra-op thread(s) per rank, %d steps after %d warm-up, medians "
              "(Tn: the slowest rank's step)\n",
              n, torch::get_num_threads(), o.steps, o.warmup);
  std::printf("%-22s %12s %6s %10s %10s %12s %12s %8s %10s\n", "model", "global batch", "ranks", "T1 ms", "Tn ms",
              "ideal T1/n", "Tn images/s", "speedup", "efficiency");
  std::printf("%-22s %12lld %6d %10.2f %10.2f %12.2f %12.1f %8.2f %9.0f%%\n", r.model.c_str(),
              static_cast<long long>(r.global_batch), r.ranks, r.t1_s * 1e3, r.tn_s * 1e3, r.t1_s * 1e3 / r.ranks,
              r.global_batch / r.tn_s, r.speedup(), 100 * r.efficiency());
  return 0;
}
