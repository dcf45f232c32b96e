// Int8 inference: the int8 ResNet-18 that quantization-aware training exported, run on LibTorch's
// quantized kernels (each engine this LibTorch has), against the same model in float32 (its weights
// at their int8 values, activations fake-quantized: what the trainer's last evaluation measured), on
// the test set (or its first --limit images), in one run.
//
//   build/benchmarks/int8_bench --config configs/demo_qat.yaml [--int8 FILE] [--batch 250] [--limit N]
//       [--threads 1] [--repeats 3] [--engines all] [--json FILE]
//
// Rows: the plain float32 network with the same weights (the speed baseline; activations not
// quantized), the float32 network with fake quantization (what QAT evaluated), and the int8 kernels.
// Columns: test accuracy, median images/s over the repeats, the speed-up over plain float32, and how
// many test images get the same prediction as the fake-quantized model. The runs take turns (float, each engine,
// float, ...) so that a noisy phase of the machine hits all of them.
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "bench_cli.hpp"
#include "bench_report.hpp"
#include "lockstep/compress/quantization.hpp"
#include "lockstep/config/config.hpp"
#include "lockstep/core/error.hpp"
#include "lockstep/models/int8_resnet.hpp"
#include "lockstep/models/resnet.hpp"
#include "lockstep/runtime.hpp"

namespace {

struct Options {
  std::string config;
  std::vector<std::string> overrides;  // --set key.path=value, as train_resnet's
  std::string int8;  // default: the config's quantization.export_path
  int64_t batch = 250;
  int64_t limit = 0;  // the first N test images; 0 = all
  int threads = 1;
  int repeats = 3;
  std::vector<std::string> engines{"all"};
  std::string json;
};

void add_options(CLI::App& app, Options& o) {
  app.add_option("--config", o.config, "the training config (model options, test data)")->required();
  app.add_option("--set", o.overrides, "key.path=value on top of the config, as train_resnet's --set (the "
                 "model options must be those the file was trained with)")
      ->type_name("KEY=VALUE");
  app.add_option("--int8", o.int8, "the int8 model file (default: the config's quantization.export_path)")
      ->type_name("FILE");
  app.add_option("--batch", o.batch, "images per forward pass")->capture_default_str()->check(bench::at_least<int64_t>(1));
  app.add_option("--limit", o.limit, "only the first N test images (0: all)")
      ->capture_default_str()
      ->check(bench::at_least<int64_t>(0));
  app.add_option("--threads", o.threads, "intra-op threads")->capture_default_str()->check(bench::at_least(1));
  app.add_option("--repeats", o.repeats, "passes over the test set per way; the median is reported")
      ->capture_default_str()
      ->check(bench::at_least(1));
  app.add_option("--engines", o.engines, "quantized engines: all (every one this LibTorch has), onednn, x86, fbgemm, qnnpack")
      ->delimiter(',')
      ->capture_default_str();
  app.add_option("--json", o.json, "also write the results to FILE")->type_name("FILE");
}

struct Way {
  std::string name;
  std::function<at::Tensor(const at::Tensor&)> forward;
  std::vector<double> images_per_s;
  at::Tensor predictions;
};

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app("Int8 ResNet-18 on LibTorch's quantized kernels against the same model in float32, on the test set.",
               "int8_bench");
  add_options(app, o);
  if (const std::optional<int> exit_code = bench::parse(app, argc, argv)) return *exit_code;
  try {
    lockstep::tune_malloc();
    at::set_num_threads(o.threads);
    lockstep::config::ExperimentConfig cfg = lockstep::config::load_config(o.config, o.overrides);
    const std::string path = o.int8.empty() ? cfg.quantization.options.export_path : o.int8;
    LOCKSTEP_CHECK(!path.empty(), "int8_bench: no --int8 FILE and the config has no quantization.export_path");
    LOCKSTEP_CHECK(std::filesystem::exists(path), "int8_bench: '", path,
                   "' does not exist; train with the config first (train_resnet writes it at the end)");
    // The int8 kernels run whole-model int8 only (Int8ResNet18): a weight-only file has nothing to measure.
    LOCKSTEP_CHECK(!lockstep::compress::read_int8(path).activations.empty(), "int8_bench: '", path,
                   "' is a weight-only export (trained with quantization.activations false): the int8 kernels run "
                   "the whole model in int8 and need its activation ranges; train with activations true");
    cfg.model.quantize_activations = true;
    auto [train_set, test_set] = lockstep::config::make_datasets(cfg.data, cfg.trainer.seed);
    const size_t count = o.limit > 0 ? std::min(test_set->size(), static_cast<size_t>(o.limit)) : test_set->size();
    std::vector<int64_t> all(count);
    for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<int64_t>(i);
    const lockstep::data::Example data = test_set->get_batch(all);

    lockstep::models::ResNet18 reference(cfg.model);
    lockstep::compress::load_int8(*reference, path);
    reference->eval();
    // The speed baseline: the plain float32 network (no fake-quant points) with the same weights.
    lockstep::models::ResNet18Options plain_options = cfg.model;
    plain_options.quantize_activations = false;
    lockstep::models::ResNet18 plain(plain_options);
    {
      torch::NoGradGuard no_grad;
      auto source = reference->named_parameters();
      for (auto& p : plain->named_parameters()) p.value().copy_(source[p.key()]);
      auto buffers = reference->named_buffers();
      for (auto& b : plain->named_buffers()) b.value().copy_(buffers[b.key()]);
    }
    plain->eval();
    std::vector<Way> ways;
    ways.push_back({"float32 plain", [&](const at::Tensor& x) { return plain->forward(x); }, {}, {}});
    ways.push_back({"float32 fake-quant", [&](const at::Tensor& x) { return reference->forward(x); }, {}, {}});
    // "all" is the engines this LibTorch has; any other failure (a weight-only export, a file whose
    // quantization never began) is the file's and ends the run, rather than leaving the float rows alone.
    std::vector<std::string> engines = o.engines;
    if (engines == std::vector<std::string>{"all"}) engines = lockstep::models::int8_engines();
    LOCKSTEP_CHECK(!engines.empty(), "int8_bench: this LibTorch has no quantized engine (x86, onednn, fbgemm or "
                   "qnnpack)");
    std::vector<std::shared_ptr<lockstep::models::Int8ResNet18>> models;
    for (const auto& engine : engines) {
      lockstep::models::Int8Options int8;
      int8.engine = engine;
      models.push_back(std::make_shared<lockstep::models::Int8ResNet18>(path, cfg.model, int8));
      auto model = models.back();
      ways.push_back({"int8 " + model->engine(), [model](const at::Tensor& x) { return model->forward(x); }, {}, {}});
    }

    const int64_t n = data.data.size(0);
    std::printf("# %s: %lld test images, batch %lld, %d thread(s), median of %d; file %.2f MB\n", path.c_str(),
                static_cast<long long>(n), static_cast<long long>(o.batch), o.threads, o.repeats,
                static_cast<double>(std::filesystem::file_size(path)) / 1e6);
    std::fflush(stdout);
    torch::NoGradGuard no_grad;
    for (int r = 0; r <= o.repeats; ++r) {  // pass 0 warms up (allocator, prepacking caches)
      for (auto& way : ways) {
        std::vector<at::Tensor> predictions;
        const auto start = std::chrono::steady_clock::now();
        for (int64_t begin = 0; begin < n; begin += o.batch) {
          const int64_t size = std::min(o.batch, n - begin);
          predictions.push_back(way.forward(data.data.narrow(0, begin, size)).argmax(1));
        }
        const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        if (r > 0) way.images_per_s.push_back(static_cast<double>(n) / seconds);
        way.predictions = torch::cat(predictions);
      }
    }
    const double float_speed = bench::median(ways.front().images_per_s);
    std::printf("%-24s %10s %12s %9s %16s\n", "way", "test acc", "images/s", "speed-up", "same as fake-q");
    nlohmann::json rows = nlohmann::json::array();
    for (const auto& way : ways) {
      const double accuracy = way.predictions.eq(data.target).sum().item<double>() / static_cast<double>(n);
      const double agreement = way.predictions.eq(ways[1].predictions).sum().item<double>() / static_cast<double>(n);
      const double speed = bench::median(way.images_per_s);
      std::printf("%-24s %9.2f%% %12.1f %8.2fx %15.2f%%\n", way.name.c_str(), 100 * accuracy, speed, speed / float_speed,
                  100 * agreement);
      rows.push_back({{"way", way.name},
                      {"test_acc", accuracy},
                      {"images_per_s", speed},  // the median the table shows, as the other benchmarks
                      {"images_per_s_runs", way.images_per_s},
                      {"speedup", speed / float_speed},
                      {"agreement", agreement}});
    }
    if (!o.json.empty()) {
      nlohmann::json doc = {{"benchmark", "int8"}, {"file", path}, {"file_bytes", std::filesystem::file_size(path)},
                            {"images", n},         {"batch", o.batch}, {"threads", o.threads}, {"rows", rows}};
      if (!bench::write_json("int8_bench", o.json, doc)) return 1;
      std::printf("# wrote %s\n", o.json.c_str());
    }
  } catch (const lockstep::Error& e) {
    std::fprintf(stderr, "int8_bench: %s\n", e.message().c_str());
    return 1;
  }
  return 0;
}
