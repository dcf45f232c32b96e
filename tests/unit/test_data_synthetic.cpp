// SyntheticDataset, Augment and Subset: determinism per index, shapes, and augmentation checked against
// an independent construction (torch padding + narrowing + flipping).
#include <torch/torch.h>
#include <catch2/catch.hpp>

#include <cmath>
#include <functional>
#include <map>
#include <numeric>
#include <set>
#include <vector>

#include "lockstep/core/error.hpp"
#include "lockstep/data/augment.hpp"
#include "lockstep/data/image_dataset.hpp"
#include "lockstep/data/subset.hpp"
#include "lockstep/data/synthetic_dataset.hpp"

using Catch::Matchers::Contains;
using namespace lockstep::data;

TEST_CASE("SyntheticDataset: any shape, each sample fixed by (seed, index) alone", "[data]") {
  SyntheticOptions options;
  options.channels = 2;
  options.height = 5;
  options.width = 7;
  options.num_classes = 4;
  options.size = 50;
  options.seed = 3;
  SyntheticDataset a(options), b(options);
  CHECK(a.size() == 50);
  CHECK(a.info().channels == 2);
  CHECK(a.info().height == 5);
  CHECK(a.info().width == 7);
  CHECK(a.info().num_classes == 4);

  const Example one = a.get_batch({9, 4, 9, 49});
  REQUIRE(one.data.sizes() == torch::IntArrayRef({4, 2, 5, 7}));
  CHECK(one.data.scalar_type() == torch::kFloat);
  CHECK(one.target.scalar_type() == torch::kLong);
  CHECK(torch::equal(one.data[0], one.data[2]));  // the same index twice in one batch
  // Another object, another batch composition: sample 4 is the same.
  const Example other = b.get_batch({4});
  CHECK(torch::equal(other.data[0], one.data[1]));
  CHECK(other.target[0].item<int64_t>() == one.target[1].item<int64_t>());
  CHECK(a.label(4) == one.target[1].item<int64_t>());
  CHECK_FALSE(torch::equal(one.data[0], one.data[1]));

  options.seed = 4;
  SyntheticDataset c(options);
  CHECK_FALSE(torch::equal(c.get_batch({4}).data[0], other.data[0]));
  CHECK_THROWS_WITH(a.get_batch({50}), Contains("index 50") && Contains("< 50"));
  CHECK_THROWS_WITH(a.get_batch({-1}), Contains("index -1"));
}

TEST_CASE("SyntheticDataset: labels cover the classes, pixels have unit noise around a class pattern", "[data]") {
  SyntheticOptions options;
  options.channels = 1;
  options.height = 16;
  options.width = 16;
  options.num_classes = 3;
  options.size = 600;
  options.signal = 0.0;
  SyntheticDataset noise(options);
  std::vector<int64_t> all(600);
  std::iota(all.begin(), all.end(), int64_t{0});
  const Example batch = noise.get_batch(all);
  const auto counts = torch::bincount(batch.target, {}, 3);
  CHECK(counts.min().item<int64_t>() > 150);  // about 200 each
  CHECK(batch.data.mean().item<double>() == Approx(0.0).margin(0.01));
  CHECK(batch.data.std().item<double>() == Approx(1.0).margin(0.01));

  // With signal, the per-class mean image is +-signal: learnable.
  options.signal = 1.0;
  SyntheticDataset learnable(options);
  const Example with_signal = learnable.get_batch(all);
  const torch::Tensor mask = with_signal.target.eq(0);
  const torch::Tensor class_mean = with_signal.data.index({mask}).mean(0);
  CHECK(class_mean.abs().mean().item<double>() == Approx(1.0).margin(0.1));

  options.size = 0;
  CHECK_THROWS_WITH(SyntheticDataset(options), Contains("size must be positive"));
  options.size = 5;
  options.height = 0;
  CHECK_THROWS_WITH(SyntheticDataset(options), Contains("must be positive in every dimension"));
}

namespace {

// A dataset whose pixels are distinct, so any crop offset or flip is identifiable.
std::shared_ptr<ImageDataset> ramp_dataset(int64_t count, int64_t channels, int64_t side) {
  ImageData data;
  data.images = (torch::arange(count * channels * side * side) % 251).to(torch::kUInt8).view({count, channels, side, side});
  data.labels = torch::arange(count) % 10;
  data.num_classes = 10;
  data.mean = {0.25};
  data.std = {0.5};
  return std::make_shared<ImageDataset>(data);
}

// A data set over another, of its size and shape: the tests' wrappers change a batch or its description.
class Over : public Dataset {
 public:
  explicit Over(DatasetPtr base) : base_(std::move(base)) {}
  size_t size() const override { return base_->size(); }
  DatasetInfo info() const override { return base_->info(); }

 protected:
  DatasetPtr base_;
};

// Which (dy, dx, flip) reproduces `out` from `in` (torchvision's order: pad with fill, crop, then flip)?
// Counts all matches; exactly one is expected for distinct pixels.
int count_explanations(const torch::Tensor& in, const torch::Tensor& out, int64_t pad, float fill, bool* flipped) {
  const int64_t h = in.size(1), w = in.size(2);
  const torch::Tensor padded = torch::constant_pad_nd(in, {pad, pad, pad, pad}, fill);
  int matches = 0;
  for (int64_t oy = 0; oy <= 2 * pad; ++oy) {
    for (int64_t ox = 0; ox <= 2 * pad; ++ox) {
      const torch::Tensor crop = padded.narrow(1, oy, h).narrow(2, ox, w);
      for (bool flip : {false, true}) {
        if (torch::equal(flip ? crop.flip({2}) : crop, out)) {
          ++matches;
          *flipped = flip;
        }
      }
    }
  }
  return matches;
}

}  // namespace

TEST_CASE("Augment: every sample is a padded crop, maybe flipped, and deterministic in (seed, epoch, index)",
          "[data]") {
  auto base = ramp_dataset(64, 2, 8);
  AugmentOptions options;
  options.pad = 2;
  options.hflip = true;
  options.seed = 5;
  Augment augment(base, options);
  CHECK(augment.size() == 64);
  CHECK(augment.info().height == 8);

  std::vector<int64_t> all(64);
  std::iota(all.begin(), all.end(), int64_t{0});
  augment.set_epoch(1);
  const Example plain = base->get_batch(all);
  const Example out = augment.get_batch(all);
  REQUIRE(out.data.sizes() == plain.data.sizes());
  CHECK(torch::equal(out.target, plain.target));
  const float fill = static_cast<float>(-0.25 / 0.5);
  int flips = 0, unchanged = 0;
  for (int64_t i = 0; i < 64; ++i) {
    bool flipped = false;
    CHECK(count_explanations(plain.data[i], out.data[i], 2, fill, &flipped) == 1);
    flips += flipped;
    unchanged += torch::equal(plain.data[i], out.data[i]);
  }
  CHECK(flips > 16);  // about half of 64
  CHECK(flips < 48);
  CHECK(unchanged < 10);  // 1/50 chance each of the identity (no shift, no flip)

  // Same (seed, epoch, index) -> same result in another batch, another object.
  Augment again(base, options);
  again.set_epoch(1);
  const Example picked = again.get_batch({37, 2});
  CHECK(torch::equal(picked.data[0], out.data[37]));
  CHECK(torch::equal(picked.data[1], out.data[2]));
  // Another epoch or seed changes it.
  again.set_epoch(2);
  CHECK_FALSE(torch::equal(again.get_batch(all).data, out.data));
  options.seed = 6;
  Augment reseeded(base, options);
  reseeded.set_epoch(1);
  CHECK_FALSE(torch::equal(reseeded.get_batch(all).data, out.data));
}

TEST_CASE("Augment over a SyntheticDataset of the same seed: the crop does not follow the label", "[data]") {
  // One config seed seeds both. Before each drew from its own domain, sample i's row offset in epoch 1
  // was its label's draw (label * 5 / 10 of the 5 rows), the same for every sample of a class.
  SyntheticOptions synthetic;
  synthetic.channels = 1;
  synthetic.height = 8;
  synthetic.width = 8;
  synthetic.num_classes = 10;
  synthetic.size = 300;
  synthetic.seed = 5;
  auto base = std::make_shared<SyntheticDataset>(synthetic);
  AugmentOptions options;
  options.pad = 2;
  options.seed = 5;
  Augment augment(base, options);
  augment.set_epoch(1);
  std::vector<int64_t> all(300);
  std::iota(all.begin(), all.end(), int64_t{0});
  const Example plain = base->get_batch(all);
  const Example out = augment.get_batch(all);
  const std::vector<float>& pad_values = base->info().pad_values;
  const float fill = pad_values.empty() ? 0.0f : pad_values.front();
  std::map<int64_t, std::set<int64_t>> rows_by_label;
  for (int64_t i = 0; i < 300; ++i) {
    const torch::Tensor padded = torch::constant_pad_nd(plain.data[i], {2, 2, 2, 2}, fill);
    int64_t row = -1;
    for (int64_t oy = 0; oy <= 4 && row < 0; ++oy) {
      for (int64_t ox = 0; ox <= 4; ++ox) {
        if (torch::equal(padded.narrow(1, oy, 8).narrow(2, ox, 8), out.data[i])) row = oy;
      }
    }
    REQUIRE(row >= 0);
    rows_by_label[plain.target[i].item<int64_t>()].insert(row);
  }
  REQUIRE(rows_by_label.size() == 10);
  for (const auto& [label, rows] : rows_by_label) {
    INFO("label " << label);
    CHECK(rows.size() > 1);  // about 30 samples a class, over 5 rows
  }
}

TEST_CASE("Augment: no-op options are the identity, flip-only flips, bad options are errors", "[data]") {
  auto base = ramp_dataset(32, 1, 6);
  std::vector<int64_t> all(32);
  std::iota(all.begin(), all.end(), int64_t{0});
  const Example plain = base->get_batch(all);
  CHECK(torch::equal(Augment(base, {}).get_batch(all).data, plain.data));

  AugmentOptions flip_only;
  flip_only.hflip = true;
  const Example flipped = Augment(base, flip_only).get_batch(all);
  int flips = 0;
  for (int64_t i = 0; i < 32; ++i) {
    const bool same = torch::equal(flipped.data[i], plain.data[i]);
    const bool mirror = torch::equal(flipped.data[i], plain.data[i].flip({2}));
    CHECK(same != mirror);
    flips += mirror;
  }
  CHECK(flips > 4);
  CHECK(flips < 28);

  AugmentOptions bad;
  bad.pad = -1;
  CHECK_THROWS_WITH(Augment(base, bad), Contains("pad must be >= 0"));
  bad.pad = 7;
  CHECK_THROWS_WITH(Augment(base, bad), Contains("pad 7 exceeds the image size 6x6"));
  CHECK_THROWS_WITH(Augment(nullptr, {}), Contains("base dataset is null"));
}

TEST_CASE("Augment refuses a target laid out over the image's pixels, and labels and vectors pass", "[data]") {
  // The data would move and the target would not: a denoiser's clean image, a segmentation mask.
  class WithTarget : public Over {
   public:
    WithTarget(DatasetPtr base, std::function<torch::Tensor(const Example&)> target)
        : Over(std::move(base)), target_(std::move(target)) {}
    std::string description() const override { return "pairs over " + base_->description(); }
    Example get_batch(const std::vector<int64_t>& indices) const override {
      Example example = base_->get_batch(indices);
      example.target = target_(example);
      return example;
    }

   private:
    std::function<torch::Tensor(const Example&)> target_;
  };
  auto base = ramp_dataset(8, 2, 6);
  const std::vector<int64_t> some{0, 3, 5};
  AugmentOptions crop;
  crop.pad = 2;
  crop.hflip = true;
  const auto image = [](const Example& e) { return e.data.clone(); };
  const auto mask = [](const Example& e) { return e.data.select(1, 0).gt(0).to(torch::kLong); };
  CHECK_THROWS_WITH(Augment(std::make_shared<WithTarget>(base, image), crop).get_batch(some),
                    Contains("Augment over pairs over") && Contains("the target is [3, 2, 6, 6]") &&
                        Contains("out of register") && Contains("denoise_images.cpp"));
  CHECK_THROWS_WITH(Augment(std::make_shared<WithTarget>(base, mask), crop).get_batch(some),
                    Contains("the target is [3, 6, 6]"));
  // The same, flattened (an autoencoder's target) or channels-last.
  const auto flat_image = [](const Example& e) { return e.data.flatten(1); };
  const auto flat_mask = [](const Example& e) { return e.data.select(1, 0).flatten(1); };
  const auto channels_last = [](const Example& e) { return e.data.permute({0, 2, 3, 1}); };
  CHECK_THROWS_WITH(Augment(std::make_shared<WithTarget>(base, flat_image), crop).get_batch(some),
                    Contains("the target is [3, 72]") && Contains("out of register"));
  CHECK_THROWS_WITH(Augment(std::make_shared<WithTarget>(base, flat_mask), crop).get_batch(some),
                    Contains("the target is [3, 36]"));
  CHECK_THROWS_WITH(Augment(std::make_shared<WithTarget>(base, channels_last), crop).get_batch(some),
                    Contains("the target is [3, 6, 6, 2]"));
  // Class labels, and per-sample vectors, are untouched by a crop: they pass.
  const auto vector = [](const Example& e) { return torch::zeros({e.data.size(0), 6}); };
  CHECK(Augment(std::make_shared<WithTarget>(base, vector), crop).get_batch(some).target.sizes() ==
        torch::IntArrayRef({3, 6}));
  CHECK(Augment(base, crop).get_batch(some).target.sizes() == torch::IntArrayRef({3}));
  // With nothing to do, Augment passes any target through as it always has.
  CHECK(Augment(std::make_shared<WithTarget>(base, image), {}).get_batch(some).target.dim() == 4);
}

TEST_CASE("Augment refuses data that is not on the CPU, naming where it is", "[data]") {
  // It crops and flips through host pointers: device memory read there is a crash, or garbage.
  class OnDevice : public Over {
   public:
    using Over::Over;
    std::string description() const override { return "device images"; }
    Example get_batch(const std::vector<int64_t>& indices) const override {
      Example example = base_->get_batch(indices);
      example.data = torch::empty(example.data.sizes(), torch::device(torch::kMeta).dtype(torch::kFloat));
      return example;
    }
  };
  AugmentOptions crop;
  crop.pad = 1;
  CHECK_THROWS_WITH(Augment(std::make_shared<OnDevice>(ramp_dataset(4, 1, 6)), crop).get_batch({0, 1}),
                    Contains("Augment over device images: the data is on meta") &&
                        Contains("give it a data set that returns CPU tensors"));
}

TEST_CASE("ImageDataset refuses images or labels that are not on the CPU", "[data]") {
  ImageData data;
  data.images = torch::empty({4, 1, 3, 3}, torch::device(torch::kMeta).dtype(torch::kUInt8));
  data.labels = torch::zeros({4}, torch::kLong);
  data.num_classes = 2;
  data.description = "device images";
  CHECK_THROWS_WITH(ImageDataset(data), Contains("device images: images and labels must be CPU tensors") &&
                                             Contains("images on meta"));
  data.images = torch::zeros({4, 1, 3, 3}, torch::kUInt8);
  data.labels = torch::empty({4}, torch::device(torch::kMeta).dtype(torch::kLong));
  CHECK_THROWS_WITH(ImageDataset(data), Contains("labels on meta"));
}

TEST_CASE("ImageDataset refuses malformed images, labels and normalisation, naming what is wrong", "[data]") {
  const auto good = [] {
    ImageData data;
    data.images = torch::zeros({4, 2, 3, 3}, torch::kUInt8);
    data.labels = torch::tensor({0, 1, 2, 1}, torch::kLong);
    data.num_classes = 3;
    data.mean = {0.5};
    data.std = {0.25};
    data.description = "pictures";
    return data;
  };
  REQUIRE_NOTHROW(ImageDataset(good()));
  ImageData d = good();
  d.images = torch::zeros({4, 9}, torch::kUInt8);
  CHECK_THROWS_WITH(ImageDataset(d), Contains("pictures: images must be a [N, C, H, W] tensor, got [4, 9]"));
  d = good();
  d.images = torch::zeros({4, 2, 3, 3}, torch::kFloat);
  CHECK_THROWS_WITH(ImageDataset(d), Contains("pictures: images must be uint8, got Float"));
  d = good();
  d.labels = d.labels.to(torch::kInt);
  CHECK_THROWS_WITH(ImageDataset(d), Contains("pictures: labels must be an int64 [N] tensor"));
  d = good();
  d.labels = torch::tensor({0, 1, 2}, torch::kLong);
  CHECK_THROWS_WITH(ImageDataset(d), Contains("pictures: 4 images but 3 labels"));
  d = good();
  d.images = torch::zeros({0, 2, 3, 3}, torch::kUInt8);
  d.labels = torch::zeros({0}, torch::kLong);
  CHECK_THROWS_WITH(ImageDataset(d), Contains("pictures: no samples"));
  d = good();
  d.num_classes = 0;
  CHECK_THROWS_WITH(ImageDataset(d), Contains("pictures: num_classes must be positive, got 0"));
  d = good();
  d.labels = torch::tensor({0, 1, 3, 1}, torch::kLong);
  CHECK_THROWS_WITH(ImageDataset(d), Contains("pictures: labels range over [0, 3]; expected values in [0, 3)"));
  d.labels = torch::tensor({0, -1, 2, 1}, torch::kLong);
  CHECK_THROWS_WITH(ImageDataset(d), Contains("labels range over [-1, 2]"));
  d = good();
  d.std = {0.25, 0.0};
  CHECK_THROWS_WITH(ImageDataset(d), Contains("pictures: channel 1 needs a finite mean and a positive std"));
  d = good();
  d.mean = {std::nan("")};
  CHECK_THROWS_WITH(ImageDataset(d), Contains("channel 0 needs a finite mean and a positive std"));
  d = good();
  d.mean = {0.1, 0.2, 0.3};
  CHECK_THROWS_WITH(ImageDataset(d), Contains("has 3 values; expected 1 or one per channel (2)"));
}

TEST_CASE("Augment refuses a base data set that returns another number of rows than it was asked for", "[data]") {
  class OneRowTooMany : public Over {
   public:
    using Over::Over;
    std::string description() const override { return "a broken set"; }
    Example get_batch(const std::vector<int64_t>& indices) const override {
      std::vector<int64_t> more = indices;
      more.push_back(indices.front());
      return base_->get_batch(more);
    }
  };
  AugmentOptions crop;
  crop.pad = 1;
  CHECK_THROWS_WITH(Augment(std::make_shared<OneRowTooMany>(ramp_dataset(4, 1, 6)), crop).get_batch({0, 1}),
                    Contains("Augment over a broken set: asked for 2 samples, the data set returned 3 rows"));
}

TEST_CASE("Subset: first N and explicit indices map onto the base", "[data]") {
  auto base = ramp_dataset(20, 1, 4);
  auto first = Subset::first(base, 5);
  CHECK(first->size() == 5);
  CHECK(torch::equal(first->get_batch({4}).data, base->get_batch({4}).data));
  CHECK_THROWS_WITH(first->get_batch({5}), Contains("index 5") && Contains("< 5"));
  CHECK(Subset::first(base, 1000)->size() == 20);  // a limit is "at most"
  CHECK_THROWS_WITH(Subset::first(base, 0), Contains("limit must be positive"));

  Subset picked(base, {7, 3, 7});
  CHECK(picked.size() == 3);
  const Example e = picked.get_batch({0, 1, 2});
  CHECK(torch::equal(e.data, base->get_batch({7, 3, 7}).data));
  CHECK(torch::equal(e.target, base->get_batch({7, 3, 7}).target));
  CHECK_THROWS_WITH(Subset(base, {1, 20}), Contains("index 20 (position 1) is out of range"));
}
