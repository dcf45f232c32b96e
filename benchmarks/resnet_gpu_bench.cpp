// Single-GPU ResNet-18 training throughput (224x224 synthetic images, ImageNet stem, 1000 classes):
// Lockstep's path (DataParallel over the runtime's communicator, SGD with momentum, autocast for bf16)
// in images/s, per precision. benchmarks/resnet_torch_bench.py measures the same model and loop in
// PyTorch; scripts/gpu-check.sh runs both on the same GPU and compares them.
// Three rows per precision: "lockstep" (DataParallel + train::ForeachSGD, what Lockstep's programs
// run), "foreach" (ForeachSGD without DataParallel) and "libtorch" (LibTorch's own per-parameter
// torch::optim::SGD, no DataParallel): lockstep against foreach is what DataParallel costs, foreach
// against libtorch what the optimizer's kernel launches cost.
//
// --channels-last stores the model and the batch channels_last (Note [Channels last],
// train/model_tensors.hpp), as the Python side's flag of the same name does.
//
//   build/benchmarks/resnet_gpu_bench [--batch 64] [--steps 50] [--warmup 10] [--precision fp32,bf16]
//                                     [--channels-last] [--json FILE]
// Exits 77 with a message where no CUDA device is usable (the CPU build compiles it too).
#include <ATen/Context.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "bench_cli.hpp"
#include "bench_report.hpp"
#include "lockstep/ddp/data_parallel.hpp"
#include "lockstep/models/resnet.hpp"
#include "lockstep/runtime.hpp"
#include "lockstep/train/foreach_optim.hpp"
#include "lockstep/train/model_tensors.hpp"
#include "lockstep/train/precision.hpp"

namespace {

struct Options {
  int64_t batch = 64;
  int steps = 50;
  int warmup = 10;
  std::vector<std::string> precisions = {"fp32", "bf16"};
  bool channels_last = false;
  std::string json;
};

const char* const kDescription =
    "Single-GPU ResNet-18 training throughput (224x224 synthetic images, ImageNet stem, 1000 classes) through "
    "Lockstep's DataParallel, per precision; benchmarks/resnet_torch_bench.py measures the same in PyTorch.";

// Declares the command line on `app`, bound to `o` (parsed before MPI and CUDA: Note [Parse before MPI] in
// bench_cli.hpp).
void add_options(CLI::App& app, Options& o) {
  app.add_option("--batch", o.batch, "images per GPU and step")
      ->capture_default_str()
      ->check(bench::at_least<int64_t>(1));
  app.add_option("--steps", o.steps, "timed steps per precision")->capture_default_str()->check(bench::at_least(1));
  app.add_option("--warmup", o.warmup, "untimed steps first")->capture_default_str()->check(bench::at_least(0));
  app.add_option("--precision", o.precisions, "precisions to measure, comma-separated")
      ->type_name("P[,P...]")
      ->delimiter(',')
      ->default_str("fp32,bf16")
      ->check(CLI::IsMember({"fp32", "bf16", "fp16"}));
  app.add_flag("--channels-last", o.channels_last, "store the model's weights and the batch channels_last (NHWC)");
  app.add_option("--json", o.json, "also write the results to FILE (rank 0)")->type_name("FILE");
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  CLI::App app(kDescription, "resnet_gpu_bench");
  add_options(app, options);
  if (const std::optional<int> exit_code = bench::parse(app, argc, argv)) return *exit_code;

  if (!torch::cuda::is_available()) {
    std::printf("resnet_gpu_bench: no usable CUDA device (a CPU-only LibTorch, no GPU or no driver); nothing to "
                "measure\n");
    return 77;
  }
  lockstep::RuntimeOptions runtime_options;
  runtime_options.device = "cuda";
  lockstep::Runtime runtime(argc, argv, runtime_options);
  const torch::Device device = runtime.world().device;
  auto comm = runtime.communicator();
  // As the Python side: let cuDNN pick the fastest convolution algorithms for these shapes.
  at::globalContext().setBenchmarkCuDNN(true);

  const char* const layout = options.channels_last ? "channels_last" : "nchw";
  nlohmann::json rows = nlohmann::json::array();
  if (runtime.rank() == 0) {
    std::printf("# ResNet-18 training, 224x224 synthetic, batch %lld per GPU, %s, %d ranks, backend %s, device %s\n",
                static_cast<long long>(options.batch), layout, comm->size(), comm->backend().c_str(),
                device.str().c_str());
    std::printf("%-10s %-10s %12s %12s\n", "precision", "impl", "images/s", "ms/step");
  }
  for (const std::string& precision : options.precisions) {
    for (const std::string impl : {"lockstep", "foreach", "libtorch"}) {
      torch::manual_seed(0);
      lockstep::models::ResNet18 model(lockstep::models::ResNet18Options{});
      model->to(device);
      model->train();
      if (options.channels_last) lockstep::train::to_channels_last(*model);  // before DataParallel
      const auto sgd = torch::optim::SGDOptions(0.1).momentum(0.9).weight_decay(1e-4);
      std::optional<lockstep::ddp::DataParallel> dp;
      std::unique_ptr<torch::optim::Optimizer> optimizer;
      if (impl == "lockstep") dp.emplace(model, comm);
      if (impl != "libtorch") {
        optimizer = std::make_unique<lockstep::train::ForeachSGD>(model->parameters(), sgd);
      } else {
        optimizer = std::make_unique<torch::optim::SGD>(model->parameters(), sgd);
      }
      auto x = torch::randn({options.batch, 3, 224, 224}, torch::TensorOptions().device(device));
      if (options.channels_last) x = x.contiguous(at::MemoryFormat::ChannelsLast);
      auto y = torch::randint(0, 1000, {options.batch}, torch::TensorOptions().dtype(torch::kLong).device(device));
      auto step = [&] {
        optimizer->zero_grad();
        torch::Tensor loss;
        {
          lockstep::train::AutocastGuard autocast(device, precision);
          loss = torch::nn::functional::cross_entropy(model->forward(x), y);
        }
        loss.backward();
        optimizer->step();
      };
      for (int i = 0; i < options.warmup; ++i) step();
      torch::cuda::synchronize(device.index());
      const auto start = std::chrono::steady_clock::now();
      for (int i = 0; i < options.steps; ++i) step();
      torch::cuda::synchronize(device.index());
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      const double images = static_cast<double>(options.batch) * options.steps / seconds;
      if (runtime.rank() == 0) {
        std::printf("%-10s %-10s %12.1f %12.2f\n", precision.c_str(), impl.c_str(), images, 1e3 * seconds / options.steps);
        std::fflush(stdout);
      }
      rows.push_back({{"impl", impl}, {"precision", precision}, {"layout", layout}, {"images_per_s", images},
                      {"ms_per_step", 1e3 * seconds / options.steps}, {"batch", options.batch}});
    }
  }
  if (runtime.rank() == 0 && !options.json.empty()) {
    nlohmann::json doc = {{"benchmark", "resnet18_gpu"}, {"ranks", comm->size()}, {"backend", comm->backend()},
                          {"device", device.str()}, {"results", rows}};
    if (!bench::write_json("resnet_gpu_bench", options.json, doc)) return 1;
  }
  return 0;
}
