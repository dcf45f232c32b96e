// The ZeRO partition: closed-form cases and the greedy bound (no share exceeds the mean by more than
// the largest parameter). The sharded optimizer itself is tested at 2 and 3 ranks in
// tests/dist/test_zero.cpp.
#include <torch/torch.h>
#include <catch2/catch.hpp>

#include <algorithm>
#include <numeric>
#include <random>

#include "lockstep/ddp/zero_optimizer.hpp"

using lockstep::ddp::partition_parameters;

TEST_CASE("ZeRO partition: largest first, each to the least-loaded rank, ties to the lower rank", "[zero]") {
  // 10 -> rank 0; 5 -> 1; 5 -> 1 (5 < 10); 3 -> 0 (10 = 10); 1 -> 1 (10 < 13).
  CHECK(partition_parameters({10, 1, 5, 5, 3}, 2) == std::vector<int>{0, 1, 1, 1, 0});
  CHECK(partition_parameters({10, 1, 5, 5, 3}, 1) == std::vector<int>{0, 0, 0, 0, 0});
  // More ranks than parameters: the last ranks own nothing.
  CHECK(partition_parameters({4, 4}, 3) == std::vector<int>{0, 1});
  CHECK(partition_parameters({}, 2).empty());
  CHECK_THROWS_WITH(partition_parameters({1}, 0), Catch::Contains("world size must be >= 1, got 0"));
}

TEST_CASE("ZeRO partition: every share within the largest parameter of the mean", "[zero]") {
  std::mt19937 rng(5);
  for (int trial = 0; trial < 50; ++trial) {
    const int world = 1 + static_cast<int>(rng() % 8);
    std::vector<int64_t> numels(1 + rng() % 60);
    for (auto& n : numels) n = 1 + static_cast<int64_t>(rng() % 100000);
    const std::vector<int> owner = partition_parameters(numels, world);
    std::vector<int64_t> load(static_cast<size_t>(world), 0);
    for (size_t i = 0; i < numels.size(); ++i) {
      REQUIRE(owner[i] >= 0);
      REQUIRE(owner[i] < world);
      load[static_cast<size_t>(owner[i])] += numels[i];
    }
    const double mean = std::accumulate(numels.begin(), numels.end(), 0.0) / world;
    const int64_t largest = *std::max_element(numels.begin(), numels.end());
    CHECK(static_cast<double>(*std::max_element(load.begin(), load.end())) <= mean + static_cast<double>(largest));
  }
}
