// Pruning masks and schedules in one process: exact counts, whole channels, N:M groups, the cubic
// schedule against its closed form, and folding masks into a plain model.
#include <torch/torch.h>
#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <limits>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "lockstep/compress/masks.hpp"
#include "lockstep/compress/pruning.hpp"
#include "lockstep/compress/quantization.hpp"
#include "lockstep/core/error.hpp"
#include "lockstep/models/resnet.hpp"
#include "lockstep/train/callback.hpp"
#include "lockstep/train/early_stopping.hpp"
#include "lockstep/train/ema.hpp"
#include "support/temp_dir.hpp"

using namespace lockstep::compress;

namespace {

int64_t pruned(const at::Tensor& mask) { return mask.numel() - mask.count_nonzero().item<int64_t>(); }

// Weights with many ties (already-zero entries, repeated magnitudes) to test exactness.
at::Tensor tied_weight(std::vector<int64_t> shape, uint64_t seed) {
  torch::manual_seed(seed);
  at::Tensor w = torch::randn(shape);
  w.reshape({-1}).narrow(0, 0, w.numel() / 5).zero_();
  w.reshape({-1}).narrow(0, w.numel() / 5, w.numel() / 10).fill_(0.5);
  return w;
}

}  // namespace

TEST_CASE("pruning: the cubic schedule matches Zhu & Gupta at its ends and midpoints", "[compress]") {
  PruningOptions o;
  o.initial_sparsity = 0.1;
  o.target_sparsity = 0.8;
  o.begin_step = 100;
  o.end_step = 1100;
  o.frequency = 100;
  validate(o);
  auto closed_form = [&](double t) { return 0.8 + (0.1 - 0.8) * std::pow(1.0 - (t - 100.0) / 1000.0, 3); };
  CHECK(scheduled_sparsity(o, 0) == 0.0);
  CHECK(scheduled_sparsity(o, 99) == 0.0);
  CHECK(scheduled_sparsity(o, 100) == Approx(0.1));
  CHECK(scheduled_sparsity(o, 600) == Approx(closed_form(600)));  // midpoint: 0.8 - 0.7 / 8
  CHECK(scheduled_sparsity(o, 600) == Approx(0.8 - 0.7 / 8));
  CHECK(scheduled_sparsity(o, 350) == Approx(closed_form(350)));
  CHECK(scheduled_sparsity(o, 1100) == Approx(0.8));
  CHECK(scheduled_sparsity(o, 5000) == Approx(0.8));
  // Monotone between the ends.
  for (int64_t t = 100; t < 1100; t += 50) CHECK(scheduled_sparsity(o, t) <= scheduled_sparsity(o, t + 50));

  CHECK_FALSE(is_pruning_step(o, 99));
  CHECK(is_pruning_step(o, 100));
  CHECK_FALSE(is_pruning_step(o, 150));
  CHECK(is_pruning_step(o, 200));
  CHECK(is_pruning_step(o, 1100));
  CHECK_FALSE(is_pruning_step(o, 1200));
  o.end_step = 1050;  // not a multiple of the frequency: the end step still prunes
  CHECK(is_pruning_step(o, 1000));
  CHECK(is_pruning_step(o, 1050));

  o.schedule = PruneSchedule::OneShot;
  CHECK(is_pruning_step(o, 100));
  CHECK_FALSE(is_pruning_step(o, 200));
  CHECK(scheduled_sparsity(o, 100) == Approx(0.8));
}

TEST_CASE("pruning: invalid options are errors naming the option", "[compress]") {
  PruningOptions o;
  o.target_sparsity = 1.0;
  CHECK_THROWS_WITH(validate(o), Catch::Contains("target_sparsity"));
  o = PruningOptions{};
  o.initial_sparsity = 0.7;
  o.target_sparsity = 0.5;
  CHECK_THROWS_WITH(validate(o), Catch::Contains("initial_sparsity"));
  o = PruningOptions{};
  o.end_step = o.begin_step;
  CHECK_THROWS_WITH(validate(o), Catch::Contains("end_step > begin_step"));
  o = PruningOptions{};
  o.begin_epoch = 2;  // with end_step in steps: the ramp's ends in two units
  CHECK_THROWS_WITH(validate(o), Catch::Contains("a gradual schedule given begin_epoch (2) needs end_epoch too"));
  o = PruningOptions{};
  o.granularity = PruneGranularity::NM;
  o.schedule = PruneSchedule::OneShot;
  o.scope = PruneScope::Global;
  CHECK_THROWS_WITH(validate(o), Catch::Contains("scope must be"));
  o.scope = PruneScope::Layer;
  o.n = 4;
  CHECK_THROWS_WITH(validate(o), Catch::Contains("1 <= n < m"));
  CHECK_THROWS_WITH(parse_prune_granularity("blocky"), Catch::Contains("unstructured, structured or n:m"));
  o = PruningOptions{};
  o.begin_step = 500;  // it was replaced by begin_epoch's 0 without a word
  o.end_epoch = 10;
  CHECK_THROWS_WITH(validate(o), Catch::Contains("pruning: begin_step (500) with a schedule in epochs (begin_epoch 0, "
                                                 "end_epoch 10, which decide): epochs and steps do not mix"));
}

TEST_CASE("pruning: unstructured masks prune exactly the requested count, smallest first", "[compress]") {
  const at::Tensor w = tied_weight({37, 11, 3, 3}, 1);
  for (double s : {0.0, 0.1, 0.33, 0.5, 0.8, 0.95}) {
    const at::Tensor mask = unstructured_mask(w, s);
    INFO("sparsity " << s);
    CHECK(mask.scalar_type() == torch::kBool);
    CHECK(mask.sizes() == w.sizes());
    CHECK(pruned(mask) == std::llround(s * w.numel()));
    // Every pruned |w| <= every kept |w|.
    if (pruned(mask) > 0 && pruned(mask) < w.numel()) {
      CHECK(w.abs().masked_select(mask.logical_not()).max().item<float>() <=
            w.abs().masked_select(mask).min().item<float>());
    }
  }
  // Deterministic (ranks with identical weights compute identical masks).
  CHECK(torch::equal(unstructured_mask(w, 0.6), unstructured_mask(w.clone(), 0.6)));
  // A small layer keeps its largest weight where rounding would prune all (5 x 0.9 = 4.5 rounds to 5);
  // sparsity 1 prunes all.
  const at::Tensor small = torch::tensor({0.5f, -3.0f, 0.1f, 2.0f, -0.2f});
  CHECK(torch::equal(unstructured_mask(small, 0.9), torch::tensor({false, true, false, false, false})));
  CHECK(pruned(unstructured_mask(small, 1.0)) == 5);
}

TEST_CASE("pruning: global unstructured masks share one threshold and hit the total exactly", "[compress]") {
  std::vector<at::Tensor> ws = {tied_weight({16, 8}, 2) * 3, tied_weight({32, 4, 3, 3}, 3), tied_weight({10, 64}, 4) / 4};
  int64_t total = 0;
  for (const auto& w : ws) total += w.numel();
  const auto masks = global_unstructured_masks(ws, 0.7);
  int64_t count = 0;
  float max_pruned = 0, min_kept = 1e9;
  for (size_t i = 0; i < ws.size(); ++i) {
    count += pruned(masks[i]);
    if (pruned(masks[i]) > 0) max_pruned = std::max(max_pruned, ws[i].abs().masked_select(masks[i].logical_not()).max().item<float>());
    if (pruned(masks[i]) < masks[i].numel()) min_kept = std::min(min_kept, ws[i].abs().masked_select(masks[i]).min().item<float>());
  }
  CHECK(count == std::llround(0.7 * total));
  CHECK(max_pruned <= min_kept);
  // The layer scaled down loses the most.
  CHECK(sparsity_of(masks[2]) > sparsity_of(masks[0]));

  // A layer whose weights are all below the threshold keeps its largest (the last of its ties), and
  // the total stays exact: the next smallest weight elsewhere goes in its place.
  const at::Tensor tiny = torch::tensor({1e-3f, -4e-3f, 2e-3f, 4e-3f});
  const std::vector<at::Tensor> with_tiny = {ws[0], tiny};
  const int64_t with_total = ws[0].numel() + tiny.numel();
  const auto guarded = global_unstructured_masks(with_tiny, 0.5);
  CHECK(torch::equal(guarded[1], torch::tensor({false, false, false, true})));
  CHECK(pruned(guarded[0]) + pruned(guarded[1]) == std::llround(0.5 * with_total));
  // Where the target leaves fewer weights than layers, each layer keeps exactly one; 1 prunes all.
  const auto nearly_all = global_unstructured_masks(with_tiny, 0.999);
  CHECK(pruned(nearly_all[0]) == ws[0].numel() - 1);
  CHECK(pruned(nearly_all[1]) == tiny.numel() - 1);
  const auto all_pruned = global_unstructured_masks(with_tiny, 1.0);
  CHECK(pruned(all_pruned[0]) + pruned(all_pruned[1]) == with_total);
}

TEST_CASE("pruning: structured masks zero whole output channels with the smallest L2 norms", "[compress]") {
  torch::manual_seed(5);
  // Channel c: random signs, magnitudes 1 + c (so its L2 norm grows with c), a few weights larger
  // than some of the next channel's (so a per-weight ranking would differ).
  at::Tensor w = torch::randn({20, 6, 3, 3}).sign();
  for (int64_t c = 0; c < 20; ++c) w[c].mul_(1.0 + c);
  w.select(0, 3).view({-1})[0] = 9.0;
  const at::Tensor mask = channel_mask(w, 0.4);
  CHECK(pruned(mask) == 8 * 6 * 9);
  for (int64_t c = 0; c < 20; ++c) {
    INFO("channel " << c);
    CHECK(mask[c].all().item<bool>() == (c >= 8));
    CHECK(mask[c].any().item<bool>() == (c >= 8));
  }
  CHECK(zero_channels(w * mask) == 8);
  // At least one channel always stays.
  CHECK(pruned(channel_mask(w, 0.999)) == 19 * 6 * 9);

  // Global: channels ranked by RMS across layers; the pruned elements stay within the target by
  // less than one channel.
  std::vector<at::Tensor> ws = {torch::randn({16, 4, 3, 3}), torch::randn({8, 32}) * 0.1, torch::randn({12, 8})};
  int64_t total = 0;
  for (const auto& x : ws) total += x.numel();
  const auto masks = global_channel_masks(ws, 0.5);
  int64_t count = 0;
  for (size_t i = 0; i < ws.size(); ++i) {
    count += pruned(masks[i]);
    const at::Tensor rows = masks[i].reshape({ws[i].size(0), -1});
    CHECK(torch::equal(rows.all(1), rows.any(1)));  // whole channels only
    CHECK(rows.any(1).any().item<bool>());          // no layer emptied
  }
  CHECK(count <= std::llround(0.5 * total));
  CHECK(count > std::llround(0.5 * total) - 4 * 3 * 3 - 32 - 8);
  CHECK(sparsity_of(masks[1]) == Approx(7.0 / 8));  // the scaled-down layer goes first (all but one)
  // Ranked by RMS (the L2 norm over the root of the channel's size), so that layers of other widths
  // compare alike: every pruned channel's RMS is at most every kept one's, leaving out a layer's
  // last channel (kept whatever its rank). Ranked by the plain L2 norm, the 8-wide rows of the third
  // layer would go before the 36-wide channels of the first whatever their values.
  float max_pruned_rms = 0.0f, min_kept_rms = std::numeric_limits<float>::infinity();
  for (size_t i = 0; i < ws.size(); ++i) {
    const at::Tensor rms = ws[i].reshape({ws[i].size(0), -1}).pow(2).mean(1).sqrt();
    const at::Tensor kept = masks[i].reshape({ws[i].size(0), -1}).all(1);
    if (kept.logical_not().any().item<bool>()) {
      max_pruned_rms = std::max(max_pruned_rms, rms.masked_select(kept.logical_not()).max().item<float>());
    }
    if (kept.sum().item<int64_t>() > 1) min_kept_rms = std::min(min_kept_rms, rms.masked_select(kept).min().item<float>());
  }
  CHECK(max_pruned_rms <= min_kept_rms);
}

TEST_CASE("pruning: N:M masks keep exactly N of every M, the largest", "[compress]") {
  torch::manual_seed(6);
  const at::Tensor w = torch::randn({12, 8, 3, 3});
  const at::Tensor mask = nm_mask(w, 2, 4);
  const at::Tensor groups = mask.reshape({-1, 4});
  CHECK(torch::equal(groups.sum(1), torch::full({groups.size(0)}, 2, torch::kLong)));
  const at::Tensor magnitudes = w.abs().reshape({-1, 4});
  const at::Tensor kept_min = magnitudes.masked_fill(groups.logical_not(), 1e9).amin(1);
  const at::Tensor pruned_max = magnitudes.masked_fill(groups, -1).amax(1);
  CHECK((pruned_max <= kept_min).all().item<bool>());
  CHECK(sparsity_of(mask) == Approx(0.5));
  CHECK(torch::equal(nm_mask(torch::zeros({2, 8}), 1, 4).reshape({-1, 4}).sum(1), torch::ones({4}, torch::kLong)));
  CHECK_FALSE(nm_applies(torch::zeros({4, 1, 3, 3}), 4));  // rows of 9
  CHECK_THROWS_WITH(nm_mask(torch::zeros({4, 9}), 2, 4), Catch::Contains("multiple of M"));
}

TEST_CASE("pruning: the callback selects conv and linear weights, honours patterns, and rejects unknown ones",
          "[compress]") {
  lockstep::models::ResNet18Options ro;
  ro.width = 8;
  ro.stem = lockstep::models::Stem::Small;
  ro.in_channels = 1;
  ro.num_classes = 10;
  lockstep::train::TrainerContext ctx;

  {
    lockstep::models::ResNet18 model(ro);
    ctx.model = model.ptr().get();
    MagnitudePruning all(PruningOptions{});
    all.on_setup(ctx);
    CHECK(all.layers().size() == 21);  // 1 stem conv + 16 block convs + 3 shortcut convs + fc
    CHECK(all.layers().front() == "conv1.weight");
    CHECK(all.layers().back() == "fc.weight");
    // The masks are buffers of the model.
    int64_t mask_buffers = 0;
    for (const auto& b : model->named_buffers()) mask_buffers += b.key().rfind("pruning_masks.", 0) == 0;
    CHECK(mask_buffers == 21);
    MagnitudePruning again(PruningOptions{});
    CHECK_THROWS_WITH(again.on_setup(ctx), Catch::Contains("already has a 'pruning_masks' child"));
  }
  {
    lockstep::models::ResNet18 model(ro);
    ctx.model = model.ptr().get();
    PruningOptions o;
    o.exclude = {"^conv1\\.", "^fc\\."};
    MagnitudePruning some(o);
    some.on_setup(ctx);
    CHECK(some.layers().size() == 19);
  }
  {
    lockstep::models::ResNet18 model(ro);
    ctx.model = model.ptr().get();
    PruningOptions o;
    o.exclude = {"^layer9\\."};
    MagnitudePruning typo(o);
    CHECK_THROWS_WITH(typo.on_setup(ctx), Catch::Contains("exclude pattern '^layer9\\.' matches no parameter"));
  }
  {
    lockstep::models::ResNet18 model(ro);
    ctx.model = model.ptr().get();
    PruningOptions o;
    o.granularity = PruneGranularity::NM;
    o.schedule = PruneSchedule::OneShot;
    MagnitudePruning nm(o);
    nm.on_setup(ctx);
    REQUIRE(nm.skipped().size() == 1);  // the stem conv: 1 x 3 x 3 = 9 weights per row
    CHECK(nm.skipped()[0].first == "conv1.weight");
  }
  {
    // Structured: the classifier's rows are its classes. The default takes the 20 convolutions and
    // skips fc, saying why; an include that names fc takes it.
    lockstep::models::ResNet18 model(ro);
    ctx.model = model.ptr().get();
    PruningOptions o;
    o.granularity = PruneGranularity::Structured;
    MagnitudePruning structured(o);
    structured.on_setup(ctx);
    CHECK(structured.layers().size() == 20);
    CHECK(structured.layers().back() == "layer4.1.conv2.weight");
    REQUIRE(structured.skipped().size() == 1);
    CHECK(structured.skipped()[0].first == "fc.weight");
    CHECK_THAT(structured.skipped()[0].second, Catch::Contains("a classifier's classes") &&
                                                   Catch::Contains("only where include names them"));
    // A checkpoint of a structured run from before this default, whose layers include fc: refused,
    // saying how to resume it as it was.
    nlohmann::json older = nlohmann::json::parse(structured.save_state());
    auto layers = older["layers"].get<std::vector<std::string>>();
    layers.push_back("fc.weight");
    older["layers"] = layers;
    CHECK_THROWS_WITH(structured.load_state(older.dump()),
                      Catch::Contains("pruned layers include 'fc.weight', Linear layers that structured pruning takes "
                                      "by default no more") &&
                          Catch::Contains("include: ['\\.weight$']"));
    // The advice selects that run's layers again.
    model->unregister_module("pruning_masks");
    o.include = {"\\.weight$"};
    MagnitudePruning as_before(o);
    as_before.on_setup(ctx);
    CHECK(as_before.layers() == layers);
    CHECK_NOTHROW(as_before.load_state(older.dump()));
  }
  {
    lockstep::models::ResNet18 model(ro);
    ctx.model = model.ptr().get();
    PruningOptions o;
    o.granularity = PruneGranularity::Structured;
    o.include = {"^fc\\."};
    MagnitudePruning named(o);
    named.on_setup(ctx);
    CHECK(named.layers() == std::vector<std::string>{"fc.weight"});
    // The pattern matches the bias too, which has no channels to prune.
    REQUIRE(named.skipped().size() == 1);
    CHECK(named.skipped()[0].first == "fc.bias");
    CHECK_THAT(named.skipped()[0].second, Catch::Contains("takes weights with output channels"));
  }
  {
    // A ConvTranspose keeps its output channels in dimension 1: structured pruning would remove its
    // input channels under the name of output channels, so it is skipped, saying why.
    torch::nn::Sequential net(torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 8, 3)),
                              torch::nn::ConvTranspose2d(torch::nn::ConvTranspose2dOptions(8, 4, 3)));
    ctx.model = net.ptr().get();
    PruningOptions o;
    o.granularity = PruneGranularity::Structured;
    o.include = {"weight$"};
    MagnitudePruning transposed(o);
    transposed.on_setup(ctx);
    CHECK(transposed.layers() == std::vector<std::string>{"0.weight"});
    REQUIRE(transposed.skipped().size() == 1);
    CHECK(transposed.skipped()[0].first == "1.weight");
    CHECK_THAT(transposed.skipped()[0].second, Catch::Contains("would be its input channels"));
    net->unregister_module("pruning_masks");
    o.include = {"^1\\.weight$"};
    MagnitudePruning only_transposed(o);
    CHECK_THROWS_WITH(only_transposed.on_setup(ctx), Catch::Contains("none of the 1 selected parameters") &&
                                                         Catch::Contains("1.weight: a ConvTranspose weight"));
    // Unstructured pruning takes it (any layout is one set of weights).
    o.granularity = PruneGranularity::Unstructured;
    MagnitudePruning unstructured(o);
    unstructured.on_setup(ctx);
    CHECK(unstructured.layers() == std::vector<std::string>{"1.weight"});
  }
  for (const auto granularity : {PruneGranularity::Unstructured, PruneGranularity::NM}) {
    // Unstructured and N:M too: a pattern over a block selects its batch norms' scales and shifts, which
    // stay dense (80% of a norm's scales at 0 would switch its channels off).
    lockstep::models::ResNet18 model(ro);
    ctx.model = model.ptr().get();
    PruningOptions o;
    o.granularity = granularity;
    o.schedule = PruneSchedule::OneShot;
    o.include = {"^layer1\\.0\\."};
    MagnitudePruning block(o);
    block.on_setup(ctx);
    CHECK(block.layers() == std::vector<std::string>{"layer1.0.conv1.weight", "layer1.0.conv2.weight"});
    std::vector<std::string> skipped;
    for (const auto& [name, why] : block.skipped()) {
      skipped.push_back(name);
      CHECK_THAT(why, Catch::Contains("pruning takes weights of 2 or more dimensions"));
    }
    CHECK(skipped == std::vector<std::string>{"layer1.0.bn1.weight", "layer1.0.bn1.bias", "layer1.0.bn2.weight",
                                              "layer1.0.bn2.bias"});
    // A checkpoint from when they were pruned: refused, saying why and what to do.
    nlohmann::json older = nlohmann::json::parse(block.save_state());
    older["layers"] = std::vector<std::string>{"layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer1.0.bn1.bias",
                                               "layer1.0.conv2.weight", "layer1.0.bn2.weight", "layer1.0.bn2.bias"};
    CHECK_THROWS_WITH(block.load_state(older.dump()),
                      Catch::Contains("pruned layers include 'layer1.0.bn1.weight', 'layer1.0.bn1.bias', "
                                      "'layer1.0.bn2.weight', 'layer1.0.bn2.bias', parameters of fewer than 2 "
                                      "dimensions") &&
                          Catch::Contains("trainer.init_from"));
  }
  {
    // A model of Linear layers alone: structured pruning with the default selection has nothing to
    // prune, and says how to choose.
    torch::nn::Sequential mlp(torch::nn::Linear(8, 16), torch::nn::ReLU(), torch::nn::Linear(16, 4));
    ctx.model = mlp.ptr().get();
    PruningOptions o;
    o.granularity = PruneGranularity::Structured;
    MagnitudePruning none(o);
    CHECK_THROWS_WITH(none.on_setup(ctx), Catch::Contains("selects convolution weights, and none is left to prune") &&
                                              Catch::Contains("where include names them"));
    o.include = {"^0\\.weight$"};
    MagnitudePruning hidden(o);
    hidden.on_setup(ctx);
    CHECK(hidden.layers() == std::vector<std::string>{"0.weight"});
  }
}

TEST_CASE("pruning: a permanent model loads into the plain definition and gives the same outputs", "[compress]") {
  lockstep::models::ResNet18Options ro;
  ro.width = 8;
  ro.stem = lockstep::models::Stem::Small;
  ro.in_channels = 1;
  ro.num_classes = 10;
  torch::manual_seed(7);
  lockstep::models::ResNet18 model(ro);
  lockstep::train::TrainerContext ctx;
  ctx.model = model.ptr().get();
  PruningOptions o;
  o.target_sparsity = 0.6;
  MagnitudePruning pruning(o);
  pruning.on_setup(ctx);
  // Set masks by hand as the callback would, then fold them in.
  for (const auto& b : model->named_buffers()) {
    if (b.key().rfind("pruning_masks.", 0) == 0) b.value().bernoulli_(0.4);
  }
  model->eval();
  const at::Tensor x = torch::randn({3, 1, 28, 28});
  const auto report = make_pruning_permanent(*model);
  CHECK(report.size() == 21);
  for (const auto& child : model->named_children()) CHECK(child.key() != "pruning_masks");
  const at::Tensor expected = model->forward(x);

  const lockstep::testing::TempDir dir("lockstep_pruned");
  const std::string path = dir / "pruned.pt";
  save_model_atomically(*model, path);
  torch::manual_seed(8);
  lockstep::models::ResNet18 plain(ro);
  torch::load(plain, path);
  plain->eval();
  CHECK(torch::equal(plain->forward(x), expected));
  // The same through load_model_checked, and a changed byte there is refused (Note [Checksummed files]).
  lockstep::models::ResNet18 checked(ro);
  load_model_checked(*checked, path);
  checked->eval();
  CHECK(torch::equal(checked->forward(x), expected));
  {
    std::fstream file(path, std::ios::in | std::ios::out | std::ios::binary);
    file.seekg(0, std::ios::end);
    const std::streamoff middle = file.tellg() / 2;
    file.seekg(middle);
    const char byte = static_cast<char>(file.get());
    file.seekp(middle);
    file.put(static_cast<char>(byte ^ 0x01));
  }
  CHECK_THROWS_WITH(load_model_checked(*checked, path),
                    Catch::Contains("model file " + path + " is corrupt") && Catch::Contains("does not match"));
  int64_t zeros = 0, numel = 0;
  for (const auto& layer : report) {
    zeros += layer.numel - layer.nonzeros;
    numel += layer.numel;
  }
  CHECK(static_cast<double>(zeros) / numel == Approx(0.6).margin(0.02));
  std::filesystem::remove(path);
  const std::string table = format_sparsity_table(report);
  CHECK(table.find("layer1.0.conv1.weight") != std::string::npos);
  CHECK(table.find("total (pruned layers)") != std::string::npos);
}

namespace {
// Names next to a dot that the mask names ('.' stored as "__") cannot tell apart when decoded:
// "head_.weight" is stored as "head___weight", which reads back as "head._weight".
struct UnderscoresImpl : torch::nn::Module {
  UnderscoresImpl() {
    head = register_module("head_", torch::nn::Linear(6, 5));
    tail = register_module("_tail", torch::nn::Linear(5, 3));
  }
  torch::Tensor forward(const torch::Tensor& x) { return tail(torch::relu(head(x))); }
  torch::nn::Linear head{nullptr}, tail{nullptr};
};
TORCH_MODULE(Underscores);

struct AliasImpl : torch::nn::Module {
  AliasImpl() {
    register_module("a_", torch::nn::Linear(4, 4));
    auto inner = register_module("a", std::make_shared<torch::nn::Module>());
    inner->register_parameter("_weight", torch::randn({4, 4}));
  }
};
TORCH_MODULE(Alias);

// An Underscores model (seed 9) and a trainer context that points at it.
std::pair<Underscores, lockstep::train::TrainerContext> underscores_in_context() {
  torch::manual_seed(9);
  Underscores model;
  lockstep::train::TrainerContext ctx;
  ctx.model = model.ptr().get();
  return {model, ctx};
}
}  // namespace

TEST_CASE("pruning: parameter names with underscores beside a dot keep their masks", "[compress]") {
  auto [model, ctx] = underscores_in_context();
  MagnitudePruning pruning(PruningOptions{});
  pruning.on_setup(ctx);
  REQUIRE(pruning.layers() == std::vector<std::string>{"head_.weight", "_tail.weight"});
  for (const auto& b : model->named_buffers()) {
    if (b.key().rfind("pruning_masks.", 0) == 0) b.value().bernoulli_(0.5);
  }
  const at::Tensor head_expected = model->head->weight.detach() * model->named_buffers()["pruning_masks.head___weight"];
  const at::Tensor tail_expected = model->tail->weight.detach() * model->named_buffers()["pruning_masks._tail__weight"];
  const auto report = make_pruning_permanent(*model);
  REQUIRE(report.size() == 2);
  CHECK(report[0].name == "head_.weight");
  CHECK(report[1].name == "_tail.weight");
  CHECK(torch::equal(model->head->weight, head_expected));
  CHECK(torch::equal(model->tail->weight, tail_expected));

  // Two selected parameters whose mask names would coincide: an error naming both, at setup.
  Alias alias;
  ctx.model = alias.ptr().get();
  PruningOptions o;
  o.include = {"weight$"};
  MagnitudePruning clash(o);
  CHECK_THROWS_WITH(clash.on_setup(ctx), Catch::Contains("'a_.weight' and 'a._weight' would share the mask name "
                                                         "'a___weight'"));
  // Only one of them selected: still an error at setup, not when make_pruning_permanent meets the
  // ambiguity after training.
  o.include = {"^a_\\.weight$"};
  MagnitudePruning half(o);
  CHECK_THROWS_WITH(half.on_setup(ctx), Catch::Contains("parameters 'a_.weight' and 'a._weight' would share the mask "
                                                        "name 'a___weight'"));
}

TEST_CASE("pruning: begin_epoch alone sets a one-shot schedule's step", "[compress]") {
  auto [model, ctx] = underscores_in_context();
  ctx.steps_per_epoch = 5;
  PruningOptions o;
  o.schedule = PruneSchedule::OneShot;
  o.begin_epoch = 2;  // it pruned at step 0 when end_epoch was 0
  MagnitudePruning pruning(o);
  pruning.on_setup(ctx);
  pruning.on_train_begin(ctx);
  CHECK(pruning.options().begin_step == 10);
  CHECK_FALSE(is_pruning_step(pruning.options(), 0));
  CHECK(is_pruning_step(pruning.options(), 10));
}

TEST_CASE("pruning: a second fit() with the same callback keeps its masks, and N:M that fits no layer says why",
          "[compress]") {
  auto [model, ctx] = underscores_in_context();
  MagnitudePruning pruning(PruningOptions{});
  pruning.on_setup(ctx);
  model->named_buffers()["pruning_masks.head___weight"].bernoulli_(0.5);
  const at::Tensor mask = model->named_buffers()["pruning_masks.head___weight"].clone();
  pruning.on_setup(ctx);  // what the trainer's next fit() does: before, "already has a 'pruning_masks' child"
  CHECK(pruning.layers() == std::vector<std::string>{"head_.weight", "_tail.weight"});
  CHECK(torch::equal(model->named_buffers()["pruning_masks.head___weight"], mask));
  int64_t masks = 0;
  for (const auto& b : model->named_buffers()) masks += b.key().rfind("pruning_masks.", 0) == 0;
  CHECK(masks == 2);
  MagnitudePruning other(PruningOptions{});  // another callback on the same model still may not
  CHECK_THROWS_WITH(other.on_setup(ctx), Catch::Contains("already has a 'pruning_masks' child"));
  // A model changed between the fits (a new head): the masks no longer fit and start over.
  model->replace_module("_tail", torch::nn::Linear(5, 7));
  pruning.on_setup(ctx);
  CHECK(model->named_buffers()["pruning_masks._tail__weight"].sizes() == at::IntArrayRef({7, 5}));
  CHECK(model->named_buffers()["pruning_masks.head___weight"].all().item<bool>());
  masks = 0;
  for (const auto& b : model->named_buffers()) masks += b.key().rfind("pruning_masks.", 0) == 0;
  CHECK(masks == 2);

  Underscores fresh;  // rows of 6 and 5 weights: a multiple of M = 4 in neither
  ctx.model = fresh.ptr().get();
  PruningOptions nm;
  nm.granularity = PruneGranularity::NM;
  nm.schedule = PruneSchedule::OneShot;
  MagnitudePruning none(nm);
  CHECK_THROWS_WITH(none.on_setup(ctx), Catch::Contains("N:M (2:4) applies to none of the 2 selected weights") &&
                                            Catch::Contains("head_.weight: rows of 6 weights are not a multiple of M = 4"));
}

TEST_CASE("pruning: a schedule that would end after the run's last step is refused at setup, naming both",
          "[compress]") {
  auto [model, ctx] = underscores_in_context();
  ctx.steps_per_epoch = 100;
  ctx.total_steps = 300;  // 3 epochs: steps 0..299
  PruningOptions o;
  o.target_sparsity = 0.8;
  o.end_epoch = 3;  // step 300: the last pruning step would be 200, at 77.04%
  o.frequency = 100;
  MagnitudePruning late(o);
  CHECK_THROWS_WITH(late.on_setup(ctx), Catch::Contains("the schedule reaches its target sparsity 80.00% at step 300 "
                                                        "(end_epoch 3), but the run's last step is 299 (3 epochs of "
                                                        "100 steps), so the run would end at 77.04%"));
  o.end_epoch = 2.99;  // step 299
  MagnitudePruning in_time(o);
  CHECK_NOTHROW(in_time.on_setup(ctx));
  CHECK(in_time.options().end_step == 299);
  CHECK(scheduled_sparsity(in_time.options(), 299) == 0.8);
  PruningOptions one_shot;
  one_shot.schedule = PruneSchedule::OneShot;
  one_shot.begin_step = 300;  // it never pruned
  MagnitudePruning never(one_shot);
  auto [other_model, other_ctx] = underscores_in_context();
  other_ctx.steps_per_epoch = 100;
  other_ctx.total_steps = 300;
  CHECK_THROWS_WITH(never.on_setup(other_ctx), Catch::Contains("at step 300, but the run's last step is 299") &&
                                                   Catch::Contains("so the run would end at 0.00%"));
}

TEST_CASE("pruning: a resumed run on another schedule is refused, its state unchanged", "[compress]") {
  auto [model, ctx] = underscores_in_context();
  ctx.steps_per_epoch = 10;
  ctx.total_steps = 30;
  PruningOptions o;
  o.target_sparsity = 0.5;
  o.end_epoch = 2;
  o.frequency = 5;
  MagnitudePruning first(o);
  first.on_setup(ctx);
  std::string saved = first.save_state();  // as if written after the pruning step 10
  const std::string fresh_step = "\"last_pruning_step\":-1";
  REQUIRE(saved.find(fresh_step) != std::string::npos);
  saved.replace(saved.find(fresh_step), fresh_step.size(), "\"last_pruning_step\":10");
  // A fresh run with `options` loads `saved`: what it raised ("" for none); a refusal leaves its state.
  auto load_into = [&, &model = model, &ctx = ctx](const PruningOptions& options) {
    model->unregister_module("pruning_masks");
    MagnitudePruning run(options);
    run.on_setup(ctx);
    const std::string before = run.save_state();
    std::string error;
    try {
      run.load_state(saved);
      CHECK(run.save_state() == saved);
    } catch (const std::exception& e) {
      error = e.what();
      CHECK(run.save_state() == before);
    }
    return error;
  };
  PruningOptions other = o;
  other.target_sparsity = 0.6;
  CHECK_THAT(load_into(other), Catch::Contains("the checkpoint was pruned on another schedule: its target_sparsity is "
                                               "0.5, this run's 0.6"));
  other = o;
  other.end_epoch = 2.5;
  CHECK_THAT(load_into(other),
             Catch::Contains("its end_step is 20, this run's 25 (steps 0..20 every 5 there, steps 0..25 every 5 here)"));
  CHECK(load_into(o).empty());

  // One-shot: its step and target count; end_step, frequency and initial_sparsity are unused, and a
  // change to them is no reason to refuse.
  PruningOptions once;
  once.schedule = PruneSchedule::OneShot;
  once.begin_step = 10;
  once.target_sparsity = 0.5;
  MagnitudePruning one_shot(once);
  model->unregister_module("pruning_masks");
  one_shot.on_setup(ctx);
  saved = one_shot.save_state();
  CHECK(saved.find("end_step") == std::string::npos);
  other = once;
  other.end_step = 5;  // before begin_step: unused by one-shot
  other.frequency = 7;
  other.initial_sparsity = 0.1;
  CHECK(load_into(other).empty());
  other = once;
  other.begin_step = 12;
  CHECK_THAT(load_into(other), Catch::Contains("its begin_step is 10, this run's 12 (step 10 there, step 12 here)"));
  // A one-shot state from before (with the unused keys) still loads.
  nlohmann::json older = nlohmann::json::parse(saved);
  older["end_step"] = 1000;
  older["frequency"] = 100;
  older["initial_sparsity"] = 0.0;
  model->unregister_module("pruning_masks");
  MagnitudePruning resumed(once);
  resumed.on_setup(ctx);
  CHECK_NOTHROW(resumed.load_state(older.dump()));
}

namespace {
struct EmptyHeadImpl : torch::nn::Module {
  EmptyHeadImpl()
      : body(register_module("body", torch::nn::Linear(8, 4))), head(register_module("head", torch::nn::Linear(4, 0))) {}
  torch::nn::Linear body, head;
};
TORCH_MODULE(EmptyHead);
}  // namespace

TEST_CASE("pruning: a weight with no elements is skipped with its reason, for every granularity", "[compress]") {
  // Before: N:M and structured pruning divided by its zero output channels (SIGFPE).
  for (const PruneGranularity granularity :
       {PruneGranularity::Unstructured, PruneGranularity::Structured, PruneGranularity::NM}) {
    EmptyHead model;
    lockstep::train::TrainerContext ctx;
    ctx.model = model.ptr().get();
    PruningOptions o;
    o.granularity = granularity;
    if (granularity == PruneGranularity::NM) o.schedule = PruneSchedule::OneShot;
    if (granularity == PruneGranularity::Structured) o.include = {"\\.weight$"};  // Linear layers: named
    o.scope = granularity == PruneGranularity::NM ? PruneScope::Layer : PruneScope::Global;
    MagnitudePruning pruning(o);
    pruning.on_setup(ctx);
    CHECK(pruning.layers() == std::vector<std::string>{"body.weight"});
    REQUIRE(pruning.skipped().size() == 1);
    CHECK(pruning.skipped()[0] == std::pair<std::string, std::string>{"head.weight", "it has no elements"});
  }
}

TEST_CASE("pruning: added after quantization-aware training, or beside a weight average, it is refused", "[compress]") {
  auto [model, ctx] = underscores_in_context();
  auto qat = std::make_shared<QuantizationAwareTraining>(QuantizationOptions{});
  auto pruning = std::make_shared<MagnitudePruning>(PruningOptions{});
  const std::vector<lockstep::train::CallbackPtr> wrong{qat, pruning};
  ctx.callbacks = &wrong;
  CHECK_THROWS_WITH(pruning->on_setup(ctx), Catch::Contains("MagnitudePruning: add it before "
                                                            "QuantizationAwareTraining"));
  const std::vector<lockstep::train::CallbackPtr> right{pruning, qat};
  ctx.callbacks = &right;
  CHECK_NOTHROW(pruning->on_setup(ctx));
  // Nor with a weight average, in either order: the config reader refuses it, and so does the callback.
  auto ema = std::make_shared<lockstep::train::ExponentialMovingAverage>(lockstep::train::EmaOptions{});
  for (const auto& both : {std::vector<lockstep::train::CallbackPtr>{pruning, ema},
                           std::vector<lockstep::train::CallbackPtr>{ema, pruning}}) {
    ctx.callbacks = &both;
    CHECK_THROWS_WITH(pruning->on_setup(ctx), Catch::Contains("it cannot run with ExponentialMovingAverage"));
  }
}

TEST_CASE("quantization-aware training added before a weight average is refused, and runs after it", "[compress]") {
  // After QAT, the average would be evaluated in float over the int8 values, and QAT would export the
  // raw weights' int8 values, which were never evaluated (the config reader adds them in this order).
  auto [model, ctx] = underscores_in_context();
  QuantizationOptions weights_only;
  weights_only.activations = false;
  auto qat = std::make_shared<QuantizationAwareTraining>(weights_only);
  auto ema = std::make_shared<lockstep::train::ExponentialMovingAverage>(lockstep::train::EmaOptions{});
  const std::vector<lockstep::train::CallbackPtr> wrong{qat, ema};
  ctx.callbacks = &wrong;
  CHECK_THROWS_WITH(qat->on_setup(ctx), Catch::Contains("QuantizationAwareTraining: add ExponentialMovingAverage "
                                                        "before it") &&
                                            Catch::Contains("never evaluated"));
  const std::vector<lockstep::train::CallbackPtr> right{ema, qat};
  ctx.callbacks = &right;
  CHECK_NOTHROW(qat->on_setup(ctx));
  // An average evaluated but taken out at the end, with an int8 file to write: the file would not be
  // the model the metrics measured.
  lockstep::train::EmaOptions raw_at_end;
  raw_at_end.apply_at_end = false;
  auto evaluated_only = std::make_shared<lockstep::train::ExponentialMovingAverage>(raw_at_end);
  QuantizationOptions exporting = weights_only;
  exporting.export_path = "model.int8";
  for (const bool evaluate : {true, false}) {
    raw_at_end.evaluate = evaluate;
    auto average = std::make_shared<lockstep::train::ExponentialMovingAverage>(raw_at_end);
    auto exporter = std::make_shared<QuantizationAwareTraining>(exporting);
    const std::vector<lockstep::train::CallbackPtr> both{average, exporter};
    ctx.callbacks = &both;
    if (evaluate) {
      CHECK_THROWS_WITH(exporter->on_setup(ctx), Catch::Contains("export_path with an ExponentialMovingAverage that "
                                                                 "evaluates the average but does not leave it") &&
                                                     Catch::Contains("Set apply_at_end to true"));
    } else {
      CHECK_NOTHROW(exporter->on_setup(ctx));
    }
  }
  // Without a file to write, nothing is promised.
  const std::vector<lockstep::train::CallbackPtr> no_file{evaluated_only, qat};
  ctx.callbacks = &no_file;
  CHECK_NOTHROW(qat->on_setup(ctx));
}

TEST_CASE("pruning and quantization-aware training refuse EarlyStopping's restore_best_weights where it would undo them",
          "[compress]") {
  // Note [Best weights and compression]: the best epoch can be one before the last pruning step (or
  // before quantization began); putting its weights back at the end would undo the compression.
  auto [model, ctx] = underscores_in_context();
  ctx.steps_per_epoch = 10;
  lockstep::train::EarlyStoppingOptions restoring;
  restoring.restore_best_weights = true;
  auto early = std::make_shared<lockstep::train::EarlyStopping>(restoring);
  auto stopping_only = std::make_shared<lockstep::train::EarlyStopping>(lockstep::train::EarlyStoppingOptions{});
  PruningOptions gradual;  // steps 0..1000: after the first epoch's evaluation
  auto pruning = std::make_shared<MagnitudePruning>(gradual);
  for (const auto& both : {std::vector<lockstep::train::CallbackPtr>{pruning, early},
                           std::vector<lockstep::train::CallbackPtr>{early, pruning}}) {
    ctx.callbacks = &both;
    CHECK_THROWS_WITH(pruning->on_setup(ctx), Catch::Contains("MagnitudePruning: it cannot run with EarlyStopping's "
                                                              "restore_best_weights") &&
                                                  Catch::Contains("last pruning step 1000, 10 steps per epoch"));
  }
  const std::vector<lockstep::train::CallbackPtr> plain{pruning, stopping_only};
  ctx.callbacks = &plain;
  CHECK_NOTHROW(pruning->on_setup(ctx));
  // The cases that set up: each on a model of its own (one pruning callback per model).
  auto [fresh_model, fresh] = underscores_in_context();
  fresh.steps_per_epoch = 10;
  // A schedule done within the first epoch (one shot at step 9, pruning a trained model): every
  // evaluated epoch has the final masks, so the best one is as sparse.
  PruningOptions early_shot;
  early_shot.schedule = PruneSchedule::OneShot;
  early_shot.begin_step = 9;
  auto one_shot = std::make_shared<MagnitudePruning>(early_shot);
  const std::vector<lockstep::train::CallbackPtr> fine{one_shot, early};
  fresh.callbacks = &fine;
  CHECK_NOTHROW(one_shot->on_setup(fresh));
  early_shot.begin_step = 10;  // the first step of the second epoch
  auto late_shot = std::make_shared<MagnitudePruning>(early_shot);
  const std::vector<lockstep::train::CallbackPtr> late{late_shot, early};
  ctx.callbacks = &late;
  CHECK_THROWS_WITH(late_shot->on_setup(ctx), Catch::Contains("last pruning step 10, 10 steps per epoch"));

  QuantizationOptions weights_only;
  weights_only.activations = false;
  auto qat = std::make_shared<QuantizationAwareTraining>(weights_only);
  for (const auto& both : {std::vector<lockstep::train::CallbackPtr>{qat, early},
                           std::vector<lockstep::train::CallbackPtr>{early, qat}}) {
    ctx.callbacks = &both;
    CHECK_THROWS_WITH(qat->on_setup(ctx), Catch::Contains("QuantizationAwareTraining: it cannot run with "
                                                          "EarlyStopping's restore_best_weights"));
  }
  auto [quantized_model, quantized_ctx] = underscores_in_context();
  const std::vector<lockstep::train::CallbackPtr> quantized{qat, stopping_only};
  quantized_ctx.callbacks = &quantized;
  CHECK_NOTHROW(qat->on_setup(quantized_ctx));
}
