// Loader: batches follow the sampler exactly, the saved state counts consumed (not prefetched) samples,
// errors from the background thread reach next(), and it stops cleanly.
#include <torch/torch.h>
#include <catch2/catch.hpp>

#include <atomic>
#include <filesystem>
#include <chrono>
#include <thread>

#include "lockstep/core/error.hpp"
#include "lockstep/data/augment.hpp"
#include "lockstep/data/loader.hpp"
#include "lockstep/data/mnist.hpp"

using Catch::Matchers::Contains;
using namespace lockstep::data;

namespace {

// Sample i is the image filled with i and target i; fails on `poison`; records set_epoch calls.
class IndexDataset : public Dataset {
 public:
  explicit IndexDataset(size_t size, int64_t poison = -1) : size_(size), poison_(poison) {}
  size_t size() const override { return size_; }
  DatasetInfo info() const override { return {1, 2, 2, 1000, {}}; }
  std::string description() const override { return "index dataset"; }
  void set_epoch(int64_t epoch) override { epochs.push_back(epoch); }
  Example get_batch(const std::vector<int64_t>& indices) const override {
    check_indices(indices);
    ++calls;
    for (int64_t i : indices) {
      if (i != poison_) continue;
      if (transient) poison_ = -1;  // fails once, reads the next time (a transient I/O error)
      LOCKSTEP_FAIL("poisoned sample ", i);
    }
    torch::Tensor target = torch::tensor(indices, torch::kLong);
    return {target.to(torch::kFloat).view({-1, 1, 1, 1}).expand({-1, 1, 2, 2}).contiguous(), target};
  }
  std::vector<int64_t> epochs;
  mutable std::atomic<int> calls{0};
  bool transient = false;

 private:
  size_t size_;
  mutable int64_t poison_;
};

std::vector<int64_t> to_vector(const torch::Tensor& t) {
  return std::vector<int64_t>(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + t.numel());
}

}  // namespace

TEST_CASE("Loader: yields exactly the sampler's indices in order, for any prefetch depth", "[data]") {
  for (size_t prefetch : {0, 1, 2, 5}) {
    for (bool drop_last_batch : {false, true}) {
      CAPTURE(prefetch, drop_last_batch);
      auto dataset = std::make_shared<IndexDataset>(103);
      ShardedSamplerOptions sampler_options;
      sampler_options.seed = 9;
      auto sampler = std::make_shared<ShardedSampler>(103, 3, 1, sampler_options);  // 35 per rank
      Loader loader(dataset, sampler, {8, prefetch, drop_last_batch});
      CHECK(loader.batches_per_epoch() == (drop_last_batch ? 4u : 5u));
      for (int64_t epoch : {0, 1}) {
        loader.start_epoch(epoch);
        ShardedSampler oracle(103, 3, 1, sampler_options);  // an independent copy
        oracle.set_epoch(epoch);
        std::vector<int64_t> expected = oracle.indices();
        if (drop_last_batch) expected.resize(32);
        std::vector<int64_t> seen;
        size_t batches = 0;
        while (auto batch = loader.next()) {
          ++batches;
          CHECK(batch->data.sizes()[0] == batch->target.sizes()[0]);
          CHECK(batch->data[0][0][1][1].item<float>() == static_cast<float>(batch->target[0].item<int64_t>()));
          if (drop_last_batch) CHECK(batch->target.size(0) == 8);
          const auto targets = to_vector(batch->target);
          seen.insert(seen.end(), targets.begin(), targets.end());
        }
        CHECK(batches == loader.batches_per_epoch());
        CHECK(seen == expected);
        CHECK_FALSE(loader.next().has_value());  // stays ended until start_epoch
        CHECK(dataset->epochs.back() == epoch);
      }
    }
  }
}

TEST_CASE("Loader: state counts consumed samples, not prefetched ones, and resumes exactly", "[data]") {
  auto dataset = std::make_shared<IndexDataset>(50);
  auto sampler = std::make_shared<ShardedSampler>(50, 2, 0);
  Loader loader(dataset, sampler, {4, 3, false});
  loader.start_epoch(3);
  loader.next();
  loader.next();
  // Give the thread time to fill its queue: it is now several batches ahead of the consumer.
  for (int i = 0; i < 200 && dataset->calls < 5; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  CHECK(dataset->calls == 5);  // 2 consumed + 3 prefetched
  const SamplerState saved = loader.state();
  CHECK(saved.epoch == 3);
  CHECK(saved.position == 8);
  CHECK(sampler->position() == 8);

  std::vector<int64_t> rest;
  while (auto batch = loader.next()) {
    const auto t = to_vector(batch->target);
    rest.insert(rest.end(), t.begin(), t.end());
  }
  CHECK(rest.size() == 25 - 8);
  CHECK(loader.state().position == 25);

  // A new loader and sampler, as after a restart from a checkpoint.
  auto sampler2 = std::make_shared<ShardedSampler>(50, 2, 0);
  Loader resumed(dataset, sampler2, {4, 2, false});
  resumed.load_state(saved);
  std::vector<int64_t> replay;
  for (auto& batch : resumed) {  // range-for over the rest of the epoch
    const auto t = to_vector(batch.target);
    replay.insert(replay.end(), t.begin(), t.end());
  }
  CHECK(replay == rest);
  CHECK(dataset->epochs.back() == 3);
}

TEST_CASE("Loader: continues from the sampler's state when next() comes before start_epoch", "[data]") {
  auto dataset = std::make_shared<IndexDataset>(20);
  auto sampler = std::make_shared<ShardedSampler>(20, 1, 0);
  sampler->load_state({2, 15});
  Loader loader(dataset, sampler, {4, 2, false});
  auto batch = loader.next();
  REQUIRE(batch);
  CHECK(to_vector(batch->target) == std::vector<int64_t>(sampler->indices().begin() + 15, sampler->indices().begin() + 19));
  CHECK(loader.next()->target.size(0) == 1);
  CHECK_FALSE(loader.next());
  CHECK(dataset->epochs == std::vector<int64_t>{2});
}

TEST_CASE("Loader: errors in the background thread are rethrown by next()", "[data]") {
  for (size_t prefetch : {0, 2}) {
    CAPTURE(prefetch);
    ShardedSamplerOptions in_order;
    in_order.shuffle = false;
    auto dataset = std::make_shared<IndexDataset>(40, /*poison=*/13);
    auto sampler = std::make_shared<ShardedSampler>(40, 1, 0, in_order);
    Loader loader(dataset, sampler, {5, prefetch, false});
    loader.start_epoch(0);
    CHECK(loader.next()->target[0].item<int64_t>() == 0);
    CHECK(loader.next()->target[0].item<int64_t>() == 5);
    CHECK_THROWS_WITH(loader.next(), Contains("poisoned sample 13"));
    CHECK_THROWS_WITH(loader.next(), Contains("poisoned sample 13"));  // it stays failed
    CHECK(loader.state().position == 10);  // the failed batch was not consumed
    loader.start_epoch(1);  // a new epoch starts afresh
    CHECK(loader.next()->target[0].item<int64_t>() == 0);

    // A failure that would not repeat (the read succeeds the second time) still fails every later
    // next(): assembled again, the epoch would go on as if nothing had happened.
    auto flaky = std::make_shared<IndexDataset>(40, /*poison=*/7);
    flaky->transient = true;
    Loader flaky_loader(flaky, std::make_shared<ShardedSampler>(40, 1, 0, in_order), {5, prefetch, false});
    flaky_loader.start_epoch(0);
    CHECK(flaky_loader.next()->target[0].item<int64_t>() == 0);
    CHECK_THROWS_WITH(flaky_loader.next(), Contains("poisoned sample 7"));
    CHECK_THROWS_WITH(flaky_loader.next(), Contains("poisoned sample 7"));
    flaky_loader.start_epoch(0);  // until the epoch is started again
    CHECK(flaky_loader.next()->target[0].item<int64_t>() == 0);
    CHECK(flaky_loader.next()->target[0].item<int64_t>() == 5);
  }
}

TEST_CASE("Loader: pin_memory pins host tensors only, and a dataset's device tensors pass through", "[data]") {
  // Batches on a device other than the CPU (data kept on the GPU; here the meta device, the one a
  // CPU-only LibTorch has): pin_memory() would throw for them.
  class DeviceDataset : public Dataset {
   public:
    size_t size() const override { return 12; }
    DatasetInfo info() const override { return {1, 2, 2, 10, {}}; }
    std::string description() const override { return "device dataset"; }
    Example get_batch(const std::vector<int64_t>& indices) const override {
      check_indices(indices);
      const auto n = static_cast<int64_t>(indices.size());
      return {torch::empty({n, 1, 2, 2}, torch::device(torch::kMeta)),
              torch::empty({n}, torch::device(torch::kMeta).dtype(torch::kLong))};
    }
  };
  for (size_t prefetch : {0, 2}) {
    CAPTURE(prefetch);
    Loader loader(std::make_shared<DeviceDataset>(), std::make_shared<ShardedSampler>(12, 1, 0),
                  {5, prefetch, false, /*pin_memory=*/true});
    loader.start_epoch(0);
    int batches = 0;
    int64_t samples = 0;
    while (auto batch = loader.next()) {
      CHECK(batch->data.device().type() == torch::kMeta);
      CHECK(batch->target.device().type() == torch::kMeta);
      samples += batch->data.size(0);
      ++batches;
    }
    CHECK(batches == 3);
    CHECK(samples == 12);
  }
  // The pinning thread's device must be a GPU, with its index (cpu would fail in the thread).
  LoaderOptions on_cpu{5, 2, false, true};
  on_cpu.pin_device = torch::Device(torch::kCPU);
  CHECK_THROWS_WITH(Loader(std::make_shared<DeviceDataset>(), std::make_shared<ShardedSampler>(12, 1, 0), on_cpu),
                    Contains("pin_device must be a CUDA device cuda:N, got cpu"));
}

TEST_CASE("Loader: stops cleanly mid-epoch and rejects misuse", "[data]") {
  auto dataset = std::make_shared<IndexDataset>(1000);
  auto sampler = std::make_shared<ShardedSampler>(1000, 1, 0);
  {
    Loader never_started(dataset, sampler, {});
  }
  {
    Loader blocked(dataset, sampler, {2, 1, false});
    blocked.start_epoch(0);
    blocked.next();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // the thread now waits on a full queue
  }  // the destructor must not hang
  {
    Loader loader(dataset, sampler, {2, 2, false});
    loader.start_epoch(0);
    loader.next();
    sampler->set_epoch(5);  // moved behind the loader's back
    CHECK_THROWS_WITH(loader.next(), Contains("behind the loader's back"));
  }
  CHECK_THROWS_WITH(Loader(dataset, std::make_shared<ShardedSampler>(999, 1, 0), {}),
                    Contains("sampler was built for 999 samples but the dataset has 1000"));
  CHECK_THROWS_WITH(Loader(dataset, sampler, {0, 2, false}), Contains("batch size must be positive"));
  CHECK_THROWS_WITH(Loader(nullptr, sampler, {}), Contains("dataset is null"));
}

// Hidden: run with "[throughput]". Reports images/s of the Fashion-MNIST loader with augmentation.
TEST_CASE("Loader throughput: Fashion-MNIST + crop/flip augmentation", "[.][throughput]") {
  if (!std::filesystem::exists(std::string(kFashionMnistRoot) + "/train-images-idx3-ubyte.gz")) {
    WARN("skipped: Fashion-MNIST not installed");
    return;
  }
  torch::set_num_threads(1);
  auto base = std::make_shared<FashionMnist>();
  AugmentOptions augment_options;
  augment_options.pad = 4;
  augment_options.hflip = true;
  auto dataset = std::make_shared<Augment>(base, augment_options);
  auto sampler = std::make_shared<ShardedSampler>(dataset->size(), 1, 0);
  for (size_t prefetch : {0, 2}) {
    for (size_t batch_size : {32, 128}) {
      Loader loader(dataset, sampler, {batch_size, prefetch, false});
      loader.start_epoch(0);
      const auto start = std::chrono::steady_clock::now();
      size_t images = 0;
      while (auto batch = loader.next()) images += static_cast<size_t>(batch->target.size(0));
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      WARN("prefetch " << prefetch << ", batch " << batch_size << ": " << images << " images in " << seconds
                       << " s = " << images / seconds << " images/s");
      CHECK(images == 60000);
    }
  }
}
