// Learning-rate schedules against their closed forms, and checkpoint file naming.

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <string>
#include <utility>
#include <vector>
#include <unistd.h>

#include "lockstep/core/error.hpp"
#include "lockstep/train/checkpoint.hpp"
#include "lockstep/train/lr_schedule.hpp"
// Catch after the LibTorch headers: glog (through c10) defines CHECK too, and Catch's must win.
#include <catch2/catch.hpp>

using lockstep::train::lr_at;
using lockstep::train::LrScheduleKind;
using lockstep::train::LrScheduleOptions;

TEST_CASE("lr schedule: constant with linear warm-up", "[train][lr]") {
  LrScheduleOptions o;
  o.base_lr = 0.1;
  o.warmup_steps = 4;
  CHECK(lr_at(o, 0, 10, 100, 1) == Approx(0.025));
  CHECK(lr_at(o, 1, 10, 100, 1) == Approx(0.05));
  CHECK(lr_at(o, 3, 10, 100, 1) == Approx(0.1));
  CHECK(lr_at(o, 4, 10, 100, 1) == Approx(0.1));
  CHECK(lr_at(o, 99, 10, 100, 1) == Approx(0.1));
  o.warmup_steps = 0;
  o.warmup_epochs = 0.5;  // 5 steps at 10 per epoch
  CHECK(lr_at(o, 0, 10, 100, 1) == Approx(0.02));
  CHECK(lr_at(o, 4, 10, 100, 1) == Approx(0.1));
}

TEST_CASE("lr schedule: warm-up epochs whose steps do not fit a step count are an error", "[train][lr]") {
  LrScheduleOptions o;
  o.kind = LrScheduleKind::Cosine;
  o.warmup_epochs = 1e17;  // 1e19 steps: llround would give LLONG_MIN, a negative warm-up, min_lr at once
  CHECK_THROWS_WITH(lr_at(o, 0, 100, 1000, 1), Catch::Contains("warmup_epochs = 1e+17 epochs of 100 steps"));
  o.warmup_epochs = 1e15;  // 1e17 steps: fits, and the lr climbs from (almost) 0, not from min_lr
  o.base_lr = 0.1;
  o.min_lr = 0.01;
  const double first = lr_at(o, 0, 100, 1000, 1);
  CHECK(first > 0);
  CHECK(first == Approx(0.1 / 1e17).epsilon(1e-6));
  CHECK(lr_at(o, 1, 100, 1000, 1) == Approx(2 * first).epsilon(1e-6));
}

TEST_CASE("lr schedule: linear scaling with the world size", "[train][lr]") {
  LrScheduleOptions o;
  o.base_lr = 0.1;
  o.scale_lr_with_world_size = true;
  CHECK(lr_at(o, 7, 10, 100, 4) == Approx(0.4));
  o.warmup_steps = 2;
  CHECK(lr_at(o, 0, 10, 100, 4) == Approx(0.2));
}

TEST_CASE("lr schedule: step decay every step_size epochs", "[train][lr]") {
  LrScheduleOptions o;
  o.kind = LrScheduleKind::Step;
  o.base_lr = 0.1;
  o.step_size = 2;
  o.gamma = 0.1;
  CHECK(lr_at(o, 0, 10, 100, 1) == Approx(0.1));
  CHECK(lr_at(o, 19, 10, 100, 1) == Approx(0.1));
  CHECK(lr_at(o, 20, 10, 100, 1) == Approx(0.01));
  CHECK(lr_at(o, 45, 10, 100, 1) == Approx(0.001));
}

TEST_CASE("lr schedule: cosine after warm-up", "[train][lr]") {
  LrScheduleOptions o;
  o.kind = LrScheduleKind::Cosine;
  o.base_lr = 0.1;
  CHECK(lr_at(o, 0, 10, 100, 1) == Approx(0.1));
  CHECK(lr_at(o, 50, 10, 100, 1) == Approx(0.05));
  CHECK(lr_at(o, 25, 10, 100, 1) == Approx(0.05 * (1 + std::cos(M_PI / 4))));
  CHECK(lr_at(o, 100, 10, 100, 1) == Approx(0.0).margin(1e-15));
  o.warmup_steps = 10;
  o.min_lr = 0.01;
  CHECK(lr_at(o, 4, 10, 100, 1) == Approx(0.05));
  CHECK(lr_at(o, 10, 10, 100, 1) == Approx(0.1));
  CHECK(lr_at(o, 55, 10, 100, 1) == Approx(0.01 + 0.09 * 0.5));
}

TEST_CASE("lr schedule: options no schedule can follow are refused, naming the field", "[train][lr]") {
  using lockstep::train::check_lr_schedule;
  const LrScheduleOptions good;
  CHECK_NOTHROW(check_lr_schedule(good, 0.1, 4));
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const std::vector<std::pair<std::function<void(LrScheduleOptions&)>, std::string>> bad = {
      {[&](LrScheduleOptions& o) { o.base_lr = nan; },
       "lr.base_lr (0: the optimizer's lr) must be a finite number >= 0, got nan"},
      {[](LrScheduleOptions& o) { o.base_lr = -0.1; },
       "lr.base_lr (0: the optimizer's lr) must be a finite number >= 0, got -0.1"},
      {[](LrScheduleOptions& o) { o.warmup_epochs = -1; }, "lr.warmup_epochs must be a finite number >= 0, got -1"},
      {[](LrScheduleOptions& o) { o.warmup_steps = -3; }, "lr.warmup_steps must be >= 0, got -3"},
      {[](LrScheduleOptions& o) { o.step_size = 0; }, "lr.step_size must be >= 1, got 0"},
      {[](LrScheduleOptions& o) { o.gamma = -0.5; }, "lr.gamma must be in (0, 1], got -0.5"},
      {[&](LrScheduleOptions& o) { o.gamma = nan; }, "lr.gamma must be in (0, 1], got nan"},
      {[](LrScheduleOptions& o) { o.min_lr = -1e-3; }, "lr.min_lr must be a finite number >= 0, got -0.001"},
      {[](LrScheduleOptions& o) {
         o.kind = LrScheduleKind::Cosine;
         o.min_lr = 0.5;
       },
       "lr.min_lr 0.5 is above the cosine schedule's peak 0.1"},
  };
  for (const auto& [spoil, message] : bad) {
    LrScheduleOptions o;
    spoil(o);
    INFO(message);
    CHECK_THROWS_WITH(check_lr_schedule(o, 0.1, 4), Catch::Contains("TrainerOptions::" + message));
  }
  LrScheduleOptions scaled;  // the peak is base_lr x world size: 0.4 at 4 ranks
  scaled.kind = LrScheduleKind::Cosine;
  scaled.min_lr = 0.3;
  scaled.scale_lr_with_world_size = true;
  CHECK_NOTHROW(check_lr_schedule(scaled, 0.1, 4));
}

TEST_CASE("lr schedule: names", "[train][lr]") {
  CHECK(lockstep::train::parse_lr_schedule_kind("cosine") == LrScheduleKind::Cosine);
  CHECK(lockstep::train::to_string(LrScheduleKind::Step) == "step");
  CHECK_THROWS_WITH(lockstep::train::parse_lr_schedule_kind("linear"), Catch::Contains("constant, step, cosine"));
}

TEST_CASE("checkpoint files: names and listing order", "[train][checkpoint]") {
  namespace fs = std::filesystem;
  CHECK(lockstep::train::checkpoint_file_name(123) == "checkpoint-step00000123.pt");
  const fs::path dir = fs::temp_directory_path() / ("lockstep_ckpt_list_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  for (const char* name : {"checkpoint-step00000020.pt", "checkpoint-step00000003.pt", "checkpoint-step00000100.pt",
                           "checkpoint-step00000200.pt.tmp", "checkpoint-stepXX.pt", "other.pt"}) {
    std::ofstream(dir / name) << "x";
  }
  const auto listed = lockstep::train::list_checkpoints(dir.string());
  REQUIRE(listed.size() == 3);
  CHECK(fs::path(listed[0]).filename() == "checkpoint-step00000003.pt");
  CHECK(fs::path(listed[1]).filename() == "checkpoint-step00000020.pt");
  CHECK(fs::path(listed[2]).filename() == "checkpoint-step00000100.pt");
  CHECK(lockstep::train::list_checkpoints((dir / "missing").string()).empty());
  fs::remove_all(dir);
}
