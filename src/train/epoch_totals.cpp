#include "train/epoch_totals.hpp"

#include <ATen/ATen.h>

#include <nlohmann/json.hpp>

#include <cstdio>

#include "lockstep/core/error.hpp"

namespace lockstep::train {

void EpochTotals::reset(int64_t next_epoch, const c10::Device& device) {
  epoch = next_epoch;
  sums.assign(kNumSums, 0.0);
  loss_sum = at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(device));
  metric_sums = metrics.zeros(device);
  started = std::chrono::steady_clock::now();
  seconds_before = 0;
}

double EpochTotals::seconds() const {
  return seconds_before + std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
}

void EpochTotalsState::on_setup(TrainerContext& ctx) { comm_ = ctx.communicator; }

std::string EpochTotalsState::save_state() const {
  LOCKSTEP_CHECK(comm_ != nullptr, "EpochTotalsState: saved before on_setup");
  // Every rank's host sums and device sums in one float64 all-reduce (counts stay exact: < 2^53).
  const bool started = totals_->loss_sum.defined();
  const int64_t metric_count = totals_->metrics.num_sums();
  at::Tensor all = at::zeros({kNumSums + metric_count}, at::kDouble);
  all.narrow(0, 0, kNumSums).copy_(at::tensor(totals_->sums, at::kDouble));
  if (started) {
    all[kLossSum].fill_(totals_->loss_sum.item<double>());
    all.narrow(0, kNumSums, metric_count).copy_(totals_->metric_sums);
  }
  comm_->allreduce(all)->wait();
  const double* sums = all.data_ptr<double>();
  nlohmann::json state;
  state["epoch"] = totals_->epoch;
  state["sums"] = std::vector<double>(sums, sums + kNumSums);
  state["metrics"] = totals_->metrics.names();
  state["metric_sums"] = std::vector<double>(sums + kNumSums, sums + kNumSums + metric_count);
  state["seconds"] = started ? totals_->seconds() : 0.0;
  return state.dump();
}

void EpochTotalsState::load_state(const std::string& text) {
  try {
    const nlohmann::json state = nlohmann::json::parse(text);
    Saved saved;
    saved.epoch = state.at("epoch").get<int64_t>();
    saved.sums = state.at("sums").get<std::vector<double>>();
    saved.seconds = state.at("seconds").get<double>();
    if (state.contains("metrics")) {
      saved.metrics = state.at("metrics").get<std::vector<std::string>>();
      saved.metric_sums = state.at("metric_sums").get<std::vector<double>>();
    } else if (saved.sums.size() == kNumSums + 1) {
      // Written before metrics were pluggable (sums[1] counted correct predictions): the loss and the
      // counts continue, the metrics start from the resume (restore says so).
      saved.sums.erase(saved.sums.begin() + 1);
      saved.metrics = {"(unknown)"};
    }
    LOCKSTEP_CHECK(saved.sums.size() == static_cast<size_t>(kNumSums), "expected ", static_cast<int>(kNumSums),
                   " sums, found ", saved.sums.size());
    loaded_ = std::move(saved);
  } catch (const nlohmann::json::exception& e) {
    LOCKSTEP_FAIL("the checkpoint's trainer_epoch_totals state is not valid: ", e.what());
  }
}

bool EpochTotalsState::restore(int64_t epoch, int rank) {
  std::optional<Saved> saved = std::move(loaded_);
  loaded_.reset();
  if (!saved || saved->epoch != epoch) return false;
  totals_->seconds_before = saved->seconds;
  if (rank != 0) return true;  // rank 0 carries the totals so far; the end-of-epoch sum adds the rest
  totals_->sums = saved->sums;
  totals_->loss_sum.fill_(saved->sums[kLossSum]);
  totals_->sums[kLossSum] = 0;  // read from the device tensor at the epoch's end
  const std::vector<std::string> names = totals_->metrics.names();
  if (saved->metrics == names && static_cast<int64_t>(saved->metric_sums.size()) == totals_->metrics.num_sums()) {
    totals_->metric_sums.copy_(at::tensor(saved->metric_sums, at::kDouble));
  } else {
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
  return true;
}

}  // namespace lockstep::train
