// Is training held back by data loading? DistributedTrainer throughput on real Fashion-MNIST (read
// from the Debian package's gzip files, normalised, augmented with crop + flip, prefetched) against
// the same training on in-memory tensors of the same shape that cost nothing to load, in one run.
//
//   mpirun -np 2 build/benchmarks/input_bench [--width 16] [--batch 64] [--steps 40] [--repeats 3]
//       [--dir /usr/share/datasets/fashion-mnist] [--json FILE]
//
// The two ways take turns (real, free, real, free, ...) so that a noisy phase of the machine hits
// both; the table gives the median images/s (all ranks) of each and their ratio. The loader alone
// (no training, one rank's shard) is timed too, to show how far ahead of training it runs.
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "bench_cli.hpp"
#include "bench_report.hpp"
#include "lockstep/data/augment.hpp"
#include "lockstep/data/loader.hpp"
#include "lockstep/data/mnist.hpp"
#include "lockstep/data/sharded_sampler.hpp"
#include "lockstep/models/resnet.hpp"
#include "lockstep/runtime.hpp"
#include "lockstep/train/trainer.hpp"

namespace {

struct Options {
  int64_t width = 16;
  size_t batch = 64;
  int64_t steps = 40;
  int repeats = 3;
  std::string dir = lockstep::data::kFashionMnistRoot;
  std::string json;
};

const char* const kDescription =
    "Is training held back by data loading? DistributedTrainer images/s on real Fashion-MNIST (gzip IDX, "
    "augmented, prefetched) against the same training on free in-memory tensors, in one run.";

// Declares the command line on `app`, bound to `o` (parsed before MPI: Note [Parse before MPI] in bench_cli.hpp).
void add_options(CLI::App& app, Options& o) {
  app.add_option("--width", o.width, "ResNet-18 width")->capture_default_str()->check(bench::at_least<int64_t>(1));
  app.add_option("--batch", o.batch, "images per rank and step")
      ->capture_default_str()
      ->check(bench::at_least<size_t>(1));
  app.add_option("--steps", o.steps, "training steps per run")
      ->capture_default_str()
      ->check(bench::at_least<int64_t>(1));
  app.add_option("--repeats", o.repeats, "runs of each way; the median is reported")
      ->capture_default_str()
      ->check(bench::at_least(1));
  // No ExistingDirectory check: checks must depend on argv alone (Note [Parse before MPI]); the data set
  // reports a missing directory itself, with the rank.
  app.add_option("--dir", o.dir, "Fashion-MNIST directory (the gzip IDX files)")->capture_default_str();
  app.add_option("--json", o.json, "also write the results to FILE (rank 0)")->type_name("FILE");
}

// Samples that are already tensors in memory: get_batch is one index_select, the cheapest a data
// set can be.
class InMemory final : public lockstep::data::Dataset {
 public:
  InMemory(at::Tensor images, at::Tensor labels, lockstep::data::DatasetInfo info)
      : images_(std::move(images)), labels_(std::move(labels)), info_(std::move(info)) {}
  size_t size() const override { return static_cast<size_t>(images_.size(0)); }
  lockstep::data::DatasetInfo info() const override { return info_; }
  lockstep::data::Example get_batch(const std::vector<int64_t>& indices) const override {
    at::Tensor index = torch::tensor(indices, torch::kLong);
    return {images_.index_select(0, index), labels_.index_select(0, index)};
  }
  std::string description() const override { return "in-memory tensors"; }

 private:
  at::Tensor images_, labels_;
  lockstep::data::DatasetInfo info_;
};

double train_images_per_s(const Options& o, const lockstep::data::DatasetPtr& data, lockstep::Runtime& runtime) {
  lockstep::models::ResNet18Options ro;
  ro.width = o.width;
  ro.stem = lockstep::models::Stem::Small;
  ro.in_channels = 1;
  ro.num_classes = 10;
  torch::manual_seed(1);
  lockstep::models::ResNet18 model(ro);
  auto optimizer = std::make_shared<torch::optim::SGD>(model->parameters(),
                                                       torch::optim::SGDOptions(0.05).momentum(0.9));
  lockstep::train::TrainerOptions t;
  t.epochs = 1;
  t.batch_size = o.batch;
  t.progress = false;
  t.checkpoints = false;
  t.stop_after_steps = o.steps;
  lockstep::train::DistributedTrainer trainer(model, optimizer, runtime.communicator(), t);
  const auto metrics = trainer.fit(data, nullptr);
  return metrics.at("images_per_s");
}

double loader_images_per_s(const Options& o, const lockstep::data::DatasetPtr& data, lockstep::Runtime& runtime) {
  auto sampler = std::make_shared<lockstep::data::ShardedSampler>(data->size(), runtime.size(), runtime.rank());
  lockstep::data::LoaderOptions lo;
  lo.batch_size = o.batch;
  lockstep::data::Loader loader(data, sampler, lo);
  loader.start_epoch(0);
  const auto start = std::chrono::steady_clock::now();
  int64_t images = 0;
  while (auto batch = loader.next()) images += batch->target.size(0);
  return images / std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app(kDescription, "input_bench");
  add_options(app, o);
  if (const std::optional<int> exit_code = bench::parse(app, argc, argv)) return *exit_code;

  lockstep::Runtime runtime(argc, argv);
  const bool root = runtime.rank() == 0;

  lockstep::data::FashionMnistOptions fo;
  fo.root = o.dir;
  fo.split = lockstep::data::Split::Train;
  auto fashion = std::make_shared<lockstep::data::FashionMnist>(fo);
  lockstep::data::AugmentOptions ao;
  ao.pad = 2;
  ao.hflip = true;
  ao.seed = 1;
  lockstep::data::DatasetPtr real = std::make_shared<lockstep::data::Augment>(fashion, ao);
  // Free: the same shape and number of samples, generated once up front.
  const auto n = static_cast<int64_t>(fashion->size());
  torch::manual_seed(2);
  lockstep::data::DatasetPtr free_data = std::make_shared<InMemory>(
      torch::randn({n, 1, 28, 28}), torch::randint(10, {n}, torch::kLong), fashion->info());

  if (root) {
    std::printf("# input pipeline: ResNet-18 width %lld, %d ranks x %zu images per step, %lld steps per run, "
                "median of %d\n",
                static_cast<long long>(o.width), runtime.size(), o.batch, static_cast<long long>(o.steps), o.repeats);
    std::printf("# real = %s\n", real->description().c_str());
    std::fflush(stdout);
  }
  std::vector<double> real_runs, free_runs;
  train_images_per_s(o, free_data, runtime);  // warm-up (allocator, thread pools)
  for (int r = 0; r < o.repeats; ++r) {
    real_runs.push_back(train_images_per_s(o, real, runtime));
    free_runs.push_back(train_images_per_s(o, free_data, runtime));
  }
  const double loader_real = loader_images_per_s(o, real, runtime);
  const double real_median = bench::median(real_runs), free_median = bench::median(free_runs);
  int exit_code = 0;
  if (root) {
    std::printf("%-28s %14s\n", "way", "images/s");
    std::printf("%-28s %14.1f\n", "train, real Fashion-MNIST", real_median);
    std::printf("%-28s %14.1f\n", "train, in-memory tensors", free_median);
    std::printf("%-28s %14.3f\n", "ratio real / in-memory", real_median / free_median);
    std::printf("%-28s %14.1f\n", "loader alone, real (1 rank)", loader_real);
    if (!o.json.empty()) {
      nlohmann::json doc = {{"benchmark", "input"},       {"ranks", runtime.size()},
                            {"width", o.width},           {"batch_per_rank", o.batch},
                            {"steps", o.steps},           {"real_images_per_s", real_median},
                            {"in_memory_images_per_s", free_median},
                            {"real_images_per_s_runs", real_runs},
                            {"in_memory_images_per_s_runs", free_runs},
                            {"ratio", real_median / free_median},
                            {"loader_images_per_s", loader_real}};
      if (bench::write_json("input_bench", o.json, doc)) std::printf("# wrote %s\n", o.json.c_str());
      else exit_code = 1;
    }
  }
  return exit_code;
}
