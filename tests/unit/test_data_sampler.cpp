// ShardedSampler: the properties of Note [Sharded epoch order], checked by brute force over several
// world sizes and dataset sizes that do not divide evenly.
#include <torch/torch.h>
#include <catch2/catch.hpp>

#include <algorithm>
#include <map>
#include <set>

#include "lockstep/core/error.hpp"
#include "lockstep/data/sharded_sampler.hpp"

using lockstep::data::SamplerState;
using lockstep::data::ShardedSampler;
using lockstep::data::ShardedSamplerOptions;

namespace {

std::vector<ShardedSampler> make_world(size_t n, int world, ShardedSamplerOptions options, int64_t epoch = 0) {
  std::vector<ShardedSampler> samplers;
  for (int r = 0; r < world; ++r) {
    samplers.emplace_back(n, world, r, options);
    samplers.back().set_epoch(epoch);
  }
  return samplers;
}

// All indices the ranks draw in one epoch via next_batch, with the count of each.
std::map<int64_t, int> drawn(std::vector<ShardedSampler>& samplers, size_t batch) {
  std::map<int64_t, int> counts;
  for (auto& s : samplers) {
    for (auto b = s.next_batch(batch); !b.empty(); b = s.next_batch(batch)) {
      for (int64_t i : b) ++counts[i];
    }
  }
  return counts;
}

}  // namespace

TEST_CASE("ShardedSampler: padded epochs cover every sample, equal per rank, padding by wrap-around", "[data]") {
  for (int world : {1, 2, 3, 5}) {
    for (size_t n : {1, 2, 7, 10, 13, 100, 101}) {
      CAPTURE(world, n);
      auto samplers = make_world(n, world, {});
      const size_t per_rank = (n + world - 1) / world;
      for (auto& s : samplers) {
        CHECK(s.per_rank() == per_rank);
        CHECK(s.indices().size() == per_rank);
        CHECK(s.total_size() == per_rank * world);
      }
      auto counts = drawn(samplers, 3);
      REQUIRE(counts.size() == n);  // every sample appears
      CHECK(counts.begin()->first == 0);
      CHECK(counts.rbegin()->first == static_cast<int64_t>(n) - 1);
      size_t total = 0, repeated = 0;
      const size_t padding = per_rank * world - n;
      for (auto& [index, count] : counts) {
        total += count;
        // Padding repeats samples; a sample is repeated at most ceil(padding / n) extra times.
        CHECK(static_cast<size_t>(count) <= 1 + (padding + n - 1) / n);
        repeated += count - 1;
      }
      CHECK(total == per_rank * world);
      CHECK(repeated == per_rank * world - n);
      // The ranks' slices interleave back into the epoch's permutation (a world of one sees it
      // unpadded), padded by wrapping around to its start.
      const auto whole = make_world(n, 1, {});
      for (size_t k = 0; k < per_rank * world; ++k) {
        CHECK(samplers[k % world].indices()[k / world] == whole[0].indices()[k % n]);
      }
    }
  }
}

TEST_CASE("ShardedSampler: drop_last gives disjoint equal slices of floor(N / world)", "[data]") {
  for (int world : {1, 2, 3, 5}) {
    for (size_t n : {5, 7, 10, 13, 101}) {
      CAPTURE(world, n);
      ShardedSamplerOptions options;
      options.drop_last = true;
      options.seed = 11;
      auto samplers = make_world(n, world, options, 3);
      for (auto& s : samplers) CHECK(s.per_rank() == n / world);
      auto counts = drawn(samplers, 4);
      CHECK(counts.size() == (n / world) * world);
      for (auto& [index, count] : counts) {
        CHECK(count == 1);
        CHECK(index >= 0);
        CHECK(index < static_cast<int64_t>(n));
      }
    }
  }
}

TEST_CASE("ShardedSampler: slices are disjoint across ranks when nothing is padded", "[data]") {
  for (int world : {2, 3, 5}) {
    const size_t n = 60;  // divisible by 2, 3 and 5: no padding, so any overlap is a bug
    auto samplers = make_world(n, world, {}, 2);
    std::set<int64_t> seen;
    for (auto& s : samplers) {
      for (int64_t i : s.indices()) CHECK(seen.insert(i).second);
    }
    CHECK(seen.size() == n);
  }
}

TEST_CASE("ShardedSampler: reproducible, rank-independent permutation that differs between epochs and seeds",
          "[data]") {
  const size_t n = 1000;
  ShardedSamplerOptions options;
  options.seed = 42;
  ShardedSampler a(n, 3, 1, options), b(n, 3, 1, options);
  a.set_epoch(4);
  b.set_epoch(4);
  CHECK(a.indices() == b.indices());

  // The union over ranks, interleaved back in stride order, is one permutation shared by all ranks:
  // rebuilding it from different rank objects must agree with a world of size 1.
  auto three = make_world(n, 3, options, 4);
  auto one = make_world(n, 1, options, 4);
  std::vector<int64_t> interleaved;
  for (size_t k = 0; k < three[0].per_rank(); ++k) {
    for (auto& s : three) interleaved.push_back(s.indices()[k]);
  }
  interleaved.resize(n);  // drop the wrap-around padding
  CHECK(interleaved == one[0].indices());

  ShardedSampler c(n, 3, 1, options);
  c.set_epoch(5);
  CHECK(c.indices() != a.indices());
  ShardedSamplerOptions other = options;
  other.seed = 43;
  ShardedSampler d(n, 3, 1, other);
  d.set_epoch(4);
  CHECK(d.indices() != a.indices());

  // Shuffled, not the identity order.
  std::vector<int64_t> sorted = one[0].indices();
  std::sort(sorted.begin(), sorted.end());
  CHECK(sorted != one[0].indices());
  for (size_t i = 0; i < n; ++i) CHECK(sorted[i] == static_cast<int64_t>(i));
}

TEST_CASE("ShardedSampler: shuffle=false visits samples in order, strided over ranks", "[data]") {
  ShardedSamplerOptions options;
  options.shuffle = false;
  ShardedSampler s(7, 3, 2, options);
  CHECK(s.indices() == std::vector<int64_t>{2, 5, 1});  // padded order 0..6,0,1: rank 2 takes 2, 5, 8 -> 1
  s.set_epoch(9);
  CHECK(s.indices() == std::vector<int64_t>{2, 5, 1});
}

TEST_CASE("ShardedSampler: next_batch, batches_per_epoch and the end of an epoch", "[data]") {
  ShardedSampler s(23, 2, 0, {});  // 12 per rank
  CHECK(s.batches_per_epoch(5, false) == 3);
  CHECK(s.batches_per_epoch(5, true) == 2);
  CHECK(s.batches_per_epoch(12, true) == 1);
  std::vector<int64_t> all;
  std::vector<size_t> lengths;
  for (auto b = s.next_batch(5); !b.empty(); b = s.next_batch(5)) {
    lengths.push_back(b.size());
    all.insert(all.end(), b.begin(), b.end());
  }
  CHECK(lengths == std::vector<size_t>{5, 5, 2});
  CHECK(all == s.indices());
  CHECK(s.remaining() == 0);
  CHECK(s.next_batch(5).empty());
  s.set_epoch(1);
  CHECK(s.position() == 0);
  CHECK(s.next_batch(5).size() == 5);
}

TEST_CASE("ShardedSampler: state resumes mid-epoch exactly", "[data]") {
  for (int world : {1, 2, 3, 5}) {
    CAPTURE(world);
    ShardedSamplerOptions options;
    options.seed = 7;
    const int rank = world - 1;
    ShardedSampler original(97, world, rank, options);
    original.set_epoch(2);
    original.next_batch(4);
    original.next_batch(4);
    const SamplerState saved = original.state();
    CHECK(saved.epoch == 2);
    CHECK(saved.position == std::min<int64_t>(8, original.per_rank()));
    const auto rest = original.next_batch(1000);

    ShardedSampler resumed(97, world, rank, options);  // fresh object, e.g. after a restart
    resumed.load_state(saved);
    CHECK(resumed.state().epoch == saved.epoch);
    CHECK(resumed.state().position == saved.position);
    CHECK(resumed.next_batch(1000) == rest);
  }
}

TEST_CASE("ShardedSampler: bad arguments give errors that name the problem", "[data]") {
  using Catch::Matchers::Contains;
  CHECK_THROWS_WITH(ShardedSampler(10, 0, 0), Contains("world size must be >= 1"));
  CHECK_THROWS_WITH(ShardedSampler(10, 2, 2), Contains("rank 2 is outside the world of 2"));
  CHECK_THROWS_WITH(ShardedSampler(10, 2, -1), Contains("rank -1"));
  CHECK_THROWS_WITH(ShardedSampler(0, 2, 0), Contains("dataset is empty"));
  ShardedSamplerOptions drop;
  drop.drop_last = true;
  CHECK_THROWS_WITH(ShardedSampler(2, 3, 0, drop), Contains("leaves every rank without samples"));
  ShardedSampler s(10, 2, 0);
  CHECK_THROWS_WITH(s.set_epoch(-1), Contains("epoch must be >= 0"));
  CHECK_THROWS_WITH(s.next_batch(0), Contains("batch size must be positive"));
  CHECK_THROWS_WITH(s.load_state({0, 6}), Contains("saved position 6 is outside"));
  CHECK_THROWS_WITH(s.load_state({0, -1}), Contains("saved position -1 is outside"));
}
