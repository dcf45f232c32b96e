#include "train/epoch_totals.hpp"

#include <ATen/ATen.h>

#include <nlohmann/json.hpp>

#include "lockstep/core/error.hpp"

namespace lockstep::train {

void EpochTotals::reset(int64_t next_epoch, const c10::Device& device) {
  epoch = next_epoch;
  sums.assign(kNumSums, 0.0);
  loss_sum = at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(device));
  correct_sum = at::zeros({}, at::TensorOptions().dtype(at::kLong).device(device));
  started = std::chrono::steady_clock::now();
  seconds_before = 0;
}

double EpochTotals::seconds() const {
  return seconds_before + std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
}

void EpochTotalsState::on_setup(TrainerContext& ctx) { comm_ = ctx.communicator; }

std::string EpochTotalsState::save_state() const {
  LOCKSTEP_CHECK(comm_ != nullptr, "EpochTotalsState: saved before on_setup");
  // Every rank's host sums and device scalars in one float64 all-reduce (counts stay exact: < 2^53).
  std::vector<double> local = totals_->sums;
  const bool started = totals_->loss_sum.defined();
  local[kLossSum] = started ? totals_->loss_sum.item<double>() : 0.0;
  local[kCorrect] = started ? static_cast<double>(totals_->correct_sum.item<int64_t>()) : 0.0;
  at::Tensor all = at::tensor(local, at::kDouble);
  comm_->allreduce(all)->wait();
  nlohmann::json state;
  state["epoch"] = totals_->epoch;
  state["sums"] = std::vector<double>(all.data_ptr<double>(), all.data_ptr<double>() + all.numel());
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
  totals_->correct_sum.fill_(static_cast<int64_t>(saved->sums[kCorrect]));
  totals_->sums[kLossSum] = 0;  // these two are read from the device tensors at the epoch's end
  totals_->sums[kCorrect] = 0;
  return true;
}

}  // namespace lockstep::train
