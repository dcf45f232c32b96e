#include "train/epoch_totals.hpp"

#include <ATen/ATen.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>

#include "lockstep/core/error.hpp"

namespace lockstep::train {

namespace {

// Note [Non-finite sums]: one NaN or inf loss (an fp16 step that overflowed, which the scaler skips)
// makes the epoch's loss sum non-finite for the rest of the epoch, and JSON has no such numbers:
// nlohmann writes them as null, which a reader of numbers refuses, so every checkpoint of that epoch
// failed to load. They are written as the strings "nan", "inf" and "-inf"; null (a checkpoint written
// before this) reads as NaN, the value it stood for or close to it (an inf written so reads as NaN).
nlohmann::json number_to_json(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  return value;
}

nlohmann::json numbers_to_json(const double* begin, const double* end) {
  nlohmann::json out = nlohmann::json::array();
  for (const double* p = begin; p != end; ++p) out.push_back(number_to_json(*p));
  return out;
}

double number_from_json(const nlohmann::json& value) {
  if (value.is_null()) return std::numeric_limits<double>::quiet_NaN();
  if (value.is_string()) {
    const std::string text = value.get<std::string>();
    if (text == "nan") return std::numeric_limits<double>::quiet_NaN();
    if (text == "inf") return std::numeric_limits<double>::infinity();
    if (text == "-inf") return -std::numeric_limits<double>::infinity();
    LOCKSTEP_FAIL("expected a number, \"nan\", \"inf\" or \"-inf\", found \"", text, "\"");
  }
  return value.get<double>();
}

std::vector<double> numbers_from_json(const nlohmann::json& values) {
  LOCKSTEP_CHECK(values.is_array(), "expected an array of numbers, found ", values.dump());
  std::vector<double> out;
  out.reserve(values.size());
  for (const nlohmann::json& value : values) out.push_back(number_from_json(value));
  return out;
}

}  // namespace

void EpochTotals::reset(int64_t next_epoch) {
  epoch = next_epoch;
  sums.assign(kNumSums, 0.0);
  grad_norm = at::Tensor();
  tracker.reset();
  started_epoch = true;
  started = std::chrono::steady_clock::now();
  seconds_before = 0;
  frozen_seconds.reset();
}

void EpochTotals::add_grad_norm(const at::Tensor& norm) {
  if (grad_norm.defined()) {
    grad_norm.add_(norm);
  } else {
    grad_norm = norm.to(at::kDouble, /*non_blocking=*/false, /*copy=*/true);
  }
}

void EpochTotals::settle() {
  if (!grad_norm.defined()) return;
  sums[kGradNorm] += grad_norm.item<double>();
  grad_norm = at::Tensor();
}

double EpochTotals::seconds() const {
  if (frozen_seconds) return *frozen_seconds;
  return seconds_before + std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
}

void EpochTotalsState::on_setup(TrainerContext& ctx) { comm_ = ctx.communicator; }

std::string EpochTotalsState::save_state() const {
  LOCKSTEP_CHECK(comm_ != nullptr, "EpochTotalsState: saved before on_setup");
  // Every rank's host sums and the tracker's device sums in one float64 all-reduce (counts stay
  // exact: < 2^53).
  totals_->settle();
  const int64_t tracked = totals_->tracker.num_sums();
  at::Tensor all = at::zeros({kNumSums + tracked}, at::kDouble);
  all.narrow(0, 0, kNumSums).copy_(at::tensor(totals_->sums, at::kDouble));
  all.narrow(0, kNumSums, tracked).copy_(totals_->tracker.sums());
  comm_->allreduce(all)->wait();
  const double* sums = all.data_ptr<double>();
  nlohmann::json state;
  state["epoch"] = totals_->epoch;
  state["sums"] = numbers_to_json(sums, sums + kNumSums);
  state["metrics"] = totals_->tracker.names();
  state["tracked"] = numbers_to_json(sums + kNumSums, sums + kNumSums + tracked);
  state["seconds"] = number_to_json(totals_->started_epoch ? totals_->seconds() : 0.0);
  return state.dump();
}

void EpochTotalsState::load_state(const std::string& text) {
  try {
    const nlohmann::json state = nlohmann::json::parse(text);
    Saved saved;
    saved.epoch = state.at("epoch").get<int64_t>();
    saved.sums = numbers_from_json(state.at("sums"));
    saved.seconds = number_from_json(state.at("seconds"));
    if (state.contains("tracked")) {
      saved.metrics = state.at("metrics").get<std::vector<std::string>>();
      saved.tracked = numbers_from_json(state.at("tracked"));
    } else {
      // Written before metrics were pluggable: sums = (loss, correct, count, forward, backward, comm,
      // exposed, steps, grad norm, clipped). The loss and the count continue; the metrics start at
      // the resume (restore says so).
      LOCKSTEP_CHECK(saved.sums.size() == kNumSums + 3, "expected ", kNumSums + 3, " sums, found ",
                     saved.sums.size());
      saved.tracked = {saved.sums[0], saved.sums[2], saved.sums[2]};
      saved.sums.erase(saved.sums.begin(), saved.sums.begin() + 3);
      saved.metrics = {"(unknown)"};
    }
    LOCKSTEP_CHECK(saved.sums.size() == static_cast<size_t>(kNumSums), "expected ", static_cast<int>(kNumSums),
                   " sums, found ", saved.sums.size());
    LOCKSTEP_CHECK(saved.tracked.size() >= static_cast<size_t>(MetricTracker::kFirstMetricSum),
                   "expected at least ", MetricTracker::kFirstMetricSum, " tracked sums, found ", saved.tracked.size());
    loaded_ = std::move(saved);
  } catch (const nlohmann::json::exception& e) {
    LOCKSTEP_FAIL("the checkpoint's trainer_epoch_totals state is not valid: ", e.what());
  } catch (const Error& e) {
    LOCKSTEP_FAIL("the checkpoint's trainer_epoch_totals state is not valid: ", e.message());
  }
}

bool EpochTotalsState::restore(int64_t epoch, int rank) {
  std::optional<Saved> saved = std::move(loaded_);
  loaded_.reset();
  if (!saved || saved->epoch != epoch) return false;
  totals_->seconds_before = saved->seconds;
  if (rank != 0) return true;  // rank 0 carries the totals so far; the end-of-epoch sum adds the rest
  totals_->sums = saved->sums;
  MetricTracker& tracker = totals_->tracker;
  const std::vector<std::string> names = tracker.names();
  std::vector<double> tracked = saved->tracked;
  if (saved->metrics != names || static_cast<int64_t>(tracked.size()) != tracker.num_sums()) {
    // The loss and the counts go on; the metrics' sums start from zero.
    tracked.resize(static_cast<size_t>(MetricTracker::kFirstMetricSum));
    tracked.resize(static_cast<size_t>(tracker.num_sums()), 0.0);
    auto list = [](const std::vector<std::string>& items) {
      std::string out;
      for (const auto& item : items) out += (out.empty() ? "" : ", ") + item;
      return out.empty() ? std::string("none") : out;
    };
    std::printf("lockstep: the checkpoint's epoch %lld totals hold the metrics [%s], this run computes [%s]: "
                "epoch %lld's train metrics other than train_loss cover only the steps after the resume\n",
                static_cast<long long>(epoch + 1), list(saved->metrics).c_str(), list(names).c_str(),
                static_cast<long long>(epoch + 1));
    std::fflush(stdout);
  }
  tracker.set_sums(at::tensor(tracked, at::kDouble));
  return true;
}

}  // namespace lockstep::train
