// Measures the two speed traps of ../shared/PLATFORM.md in one process, so that the remedies can be
// compared by running this program under each (scripts/measure-platform.sh does):
//   - BLAS: GFLOP/s of a 1024x1024 float matmul (LibTorch's Linear layers go through libblas.so.3);
//   - allocator: a ResNet-18 (small stem, 28x28x1, batch 32) SGD step: median time and minor page
//     faults per step (freshly mapped memory costs a fault per page on these microVMs).
//   platform_bench [--width 64] [--batch 32] [--steps 6] [--threads 1] [--no-tuning] [--json FILE]
#include <sys/resource.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "bench_cli.hpp"
#include "bench_report.hpp"
#include "lockstep/models/resnet.hpp"
#include "lockstep/runtime.hpp"

namespace {

long minor_faults() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_minflt;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

int main(int argc, char** argv) {
  int width = 64, batch = 32, steps = 6, threads = 1;
  bool no_tuning = false;
  std::string json;
  CLI::App app("Measures BLAS (a 1024x1024 float matmul) and the allocator (a ResNet-18 SGD step: time and minor "
               "page faults) in one process; scripts/measure-platform.sh runs it under each remedy.",
               "platform_bench");
  app.add_option("--width", width, "ResNet-18 width")->capture_default_str()->check(bench::at_least(1));
  app.add_option("--batch", batch, "images per step")->capture_default_str()->check(bench::at_least(1));
  app.add_option("--steps", steps, "timed steps (after one warm-up step)")
      ->capture_default_str()
      ->check(bench::at_least(1));
  app.add_option("--threads", threads, "LibTorch intra-op threads")->capture_default_str()->check(bench::at_least(1));
  app.add_flag("--no-tuning", no_tuning, "leave glibc malloc's thresholds as they are (no lockstep::tune_malloc)");
  app.add_option("--json", json, "also write the results to FILE")->type_name("FILE");
  if (const std::optional<int> exit_code = bench::parse(app, argc, argv)) return *exit_code;
  const bool tuning = !no_tuning;
  if (tuning) lockstep::tune_malloc();
  torch::set_num_threads(threads);
  torch::manual_seed(0);

  // BLAS: best of a few 1024^3 matmuls.
  auto a = torch::randn({1024, 1024}), b = torch::randn({1024, 1024});
  double best = 1e9;
  for (int i = 0; i < 5; ++i) {
    const auto start = std::chrono::steady_clock::now();
    auto c = torch::mm(a, b);
    best = std::min(best, seconds_since(start));
  }
  const double gflops = 2.0 * 1024 * 1024 * 1024 / best / 1e9;

  lockstep::models::ResNet18Options options;
  options.num_classes = 10;
  options.in_channels = 1;
  options.stem = lockstep::models::Stem::Small;
  options.width = width;
  lockstep::models::ResNet18 model(options);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9));
  auto images = torch::randn({batch, 1, 28, 28});
  auto labels = torch::randint(0, 10, {batch}, torch::kLong);
  std::vector<double> times, faults;
  for (int s = 0; s < steps + 1; ++s) {  // the first step warms up and is not counted
    const long faults_before = minor_faults();
    const auto start = std::chrono::steady_clock::now();
    optimizer.zero_grad();
    auto loss = torch::nn::functional::cross_entropy(model->forward(images), labels);
    loss.backward();
    optimizer.step();
    if (s > 0) {
      times.push_back(seconds_since(start));
      faults.push_back(static_cast<double>(minor_faults() - faults_before));
    }
  }
  const double step = bench::median(times);
  const double step_faults = bench::median(faults);
  const char* preload = std::getenv("LD_PRELOAD");
  std::printf("matmul 1024: %7.1f GFLOP/s | resnet18 width %d batch %d, %d thread(s): step %.4f s, %.0f minor faults/step"
              " | malloc tuning %s, LD_PRELOAD=%s\n",
              gflops, width, batch, threads, step, step_faults, tuning ? "on" : "off", preload ? preload : "");
  if (!json.empty()) {
    nlohmann::json doc = {{"matmul_gflops", gflops}, {"width", width}, {"batch", batch}, {"threads", threads},
                          {"step_s", step}, {"minor_faults_per_step", step_faults}, {"malloc_tuning", tuning},
                          {"ld_preload", preload ? preload : ""}};
    if (!bench::write_json("platform_bench", json, doc)) return 1;
  }
  return 0;
}
