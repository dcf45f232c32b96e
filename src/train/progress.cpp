#include "lockstep/train/progress.hpp"

#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "lockstep/core/error.hpp"
#include "lockstep/train/metrics.hpp"
#include "lockstep/train/trainer.hpp"
#include "train/atomic_file.hpp"

namespace lockstep::train {
namespace {

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) seconds = 0;
  const auto total = static_cast<long long>(std::llround(seconds));
  char text[32];
  if (total >= 3600) {
    std::snprintf(text, sizeof text, "%lld:%02lld:%02lld", total / 3600, total / 60 % 60, total % 60);
  } else {
    std::snprintf(text, sizeof text, "%lld:%02lld", total / 60, total % 60);
  }
  return text;
}

double metric(const TrainerContext& ctx, const std::string& key) {
  auto it = ctx.metrics.find(key);
  return it == ctx.metrics.end() ? std::nan("") : it->second;
}

bool ends_with(const std::string& text, const std::string& tail) {
  return text.size() >= tail.size() && text.compare(text.size() - tail.size(), tail.size(), tail) == 0;
}

// "train loss 0.4123 acc 85.00% | test loss 0.3811 acc 86.10%": the loss and every metric of the
// trainer, accuracies as percentages; the test part only when the epoch was evaluated.
std::string summary(const TrainerContext& ctx) {
  std::string out;
  char number[64];
  for (const char* part : {"train", "test"}) {
    const std::string prefix = std::string(part) + "_";
    if (ctx.metrics.count(prefix + "loss") == 0) continue;
    std::snprintf(number, sizeof number, "%.4f", metric(ctx, prefix + "loss"));
    out += (out.empty() ? "" : " | ") + std::string(part) + " loss " + number;
    if (ctx.trainer_metrics == nullptr) continue;
    for (const auto& m : *ctx.trainer_metrics) {
      for (const auto& key : m->keys()) {
        const double value = metric(ctx, prefix + key);
        if (ends_with(key, "acc")) {
          std::snprintf(number, sizeof number, "%.2f%%", 100 * value);
        } else {
          std::snprintf(number, sizeof number, "%.4g", value);
        }
        out += " " + key + " " + number;
      }
    }
  }
  return out;
}

// Note [Starting over] (checkpoint.cpp) for metrics.jsonl: a fresh run in a directory that holds an
// earlier run's lines (checkpoint.resume: never, no checkpoint yet, or checkpoints off) keeps them in
// "metrics.previous-<UTC time>.jsonl" instead of truncating them.
void set_aside_earlier_metrics(const std::string& path) {
  std::error_code error;
  if (!std::filesystem::is_regular_file(path, error) || std::filesystem::file_size(path, error) == 0 || error) return;
  char stamp[32];
  const std::time_t now = std::time(nullptr);
  std::tm utc{};
  gmtime_r(&now, &utc);
  std::strftime(stamp, sizeof stamp, "%Y%m%d-%H%M%S", &utc);
  const std::filesystem::path target(path);
  const std::string stem = (target.parent_path() / target.stem()).string() + ".previous-" + stamp;
  std::string aside = stem + target.extension().string();
  for (int n = 2; std::filesystem::exists(aside); ++n) aside = stem + "-" + std::to_string(n) + target.extension().string();
  std::filesystem::rename(path, aside, error);
  LOCKSTEP_CHECK(!error, "cannot move the earlier run's ", path, " aside to ", aside, ": ", error.message());
  std::printf("moved the earlier run's %s to %s\n", path.c_str(), aside.c_str());
  std::fflush(stdout);
}

}  // namespace

ProgressLogger::ProgressLogger(ProgressOptions options) : options_(std::move(options)) {
  LOCKSTEP_CHECK(options_.log_every >= 0, "ProgressOptions::log_every must be >= 0, got ", options_.log_every);
}

void ProgressLogger::on_train_begin(TrainerContext& ctx) {
  // Note [Progress terminal]: OpenMPI forwards each rank's stdout through a pseudo-terminal, so isatty()
  // says yes even when mpirun's own output goes to a file; under mpirun plain lines are the default.
  // LOCKSTEP_PROGRESS_TTY=1 or 0 forces either way.
  const char* forced = std::getenv("LOCKSTEP_PROGRESS_TTY");
  if (options_.interactive >= 0) {
    interactive_ = options_.interactive == 1;
  } else if (forced != nullptr && *forced != '\0') {
    interactive_ = std::string(forced) != "0";
  } else {
    interactive_ = isatty(STDOUT_FILENO) != 0 && std::getenv("OMPI_COMM_WORLD_SIZE") == nullptr &&
                   std::getenv("PMI_RANK") == nullptr;
  }
  // Collective even without a file: a logger whose metrics_path is set on rank 0 alone stays in step.
  const auto prepare = [&] {
    if (options_.metrics_path.empty()) return;
    if (ctx.global_step == 0) {  // a fresh run starts a fresh file
      set_aside_earlier_metrics(options_.metrics_path);
      std::ofstream out(options_.metrics_path, std::ios::trunc);
      LOCKSTEP_CHECK(out.good(), "cannot open ", options_.metrics_path, " for writing");
      return;
    }
    // A resumed run (the Checkpointer ran before us) appends, after dropping the lines of the epochs it
    // resumes at and beyond: a run resumed from an older checkpoint (the newest was corrupt, a crash
    // came after a later epoch's line, or an explicit older file) trains those epochs again, and each
    // would otherwise have two lines. A torn last line (a crash while it was written) goes too.
    std::ifstream in(options_.metrics_path);
    if (!in.good()) return;  // nothing yet: appending creates it
    std::string kept, line;
    std::size_t dropped = 0;
    while (std::getline(in, line)) {
      const nlohmann::json parsed = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      const bool earlier = parsed.is_object() && parsed.contains("epoch") && parsed["epoch"].is_number_integer() &&
                           parsed["epoch"].get<int64_t>() <= ctx.epoch;
      if (earlier) {
        kept += line + "\n";
      } else if (!line.empty()) {
        ++dropped;
      }
    }
    in.close();
    if (dropped == 0) return;
    write_file_atomically(options_.metrics_path, [&](const std::string& temporary) {
      std::ofstream out(temporary, std::ios::trunc);
      out << kept;
      out.flush();
      LOCKSTEP_CHECK(out.good(), "cannot write ", temporary);
    });
  };
  run_on_rank0(ctx, prepare, "ProgressLogger");
}

void ProgressLogger::on_epoch_begin(TrainerContext& ctx) {
  epoch_start_ = std::chrono::steady_clock::now();
  epoch_first_step_ = ctx.global_step;
  images_ = 0;
  evaluating_ = false;
}

void ProgressLogger::on_evaluation_begin(TrainerContext& ctx) {
  evaluating_ = true;
  evaluation_start_ = std::chrono::steady_clock::now();
}

// A long evaluation shows progress too: every log_every batches (not after the last one, which the
// epoch's summary line follows), with the same redraw-or-lines choice as training.
void ProgressLogger::on_evaluation_batch_end(TrainerContext& ctx) {
  if (ctx.world.rank != 0 || options_.log_every == 0) return;
  const int64_t done = ctx.eval_batch;
  if (done % options_.log_every != 0 || done >= ctx.eval_batches) return;
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - evaluation_start_).count();
  const double eta = elapsed / static_cast<double>(done) * static_cast<double>(ctx.eval_batches - done);
  std::printf("%sepoch %lld/%lld evaluating [%lld/%lld] | ETA %s%s", interactive_ ? "\r" : "",
              static_cast<long long>(ctx.epoch + 1), static_cast<long long>(ctx.options ? ctx.options->epochs : 0),
              static_cast<long long>(done), static_cast<long long>(ctx.eval_batches), format_duration(eta).c_str(),
              interactive_ ? "\033[K" : "\n");
  line_open_ = interactive_;
  std::fflush(stdout);
}

void ProgressLogger::on_after_optimizer_step(TrainerContext& ctx) {
  images_ += ctx.step_samples * ctx.world.size;
  if (ctx.world.rank != 0 || options_.log_every == 0) return;
  const int64_t done = ctx.batch_in_epoch + 1;
  if (done % options_.log_every != 0 && done != ctx.steps_per_epoch) return;
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - epoch_start_).count();
  const int64_t steps_here = ctx.global_step - epoch_first_step_;
  const double per_step = steps_here > 0 ? elapsed / static_cast<double>(steps_here) : 0.0;
  const double eta = per_step * static_cast<double>(ctx.steps_per_epoch - done);
  const double loss = ctx.loss.defined() ? ctx.loss.item<double>() : std::nan("");
  const auto options = ctx.options;
  std::printf("%sepoch %lld/%lld [%lld/%lld] loss %.4f lr %.4g | %.0f img/s | ETA %s%s", interactive_ ? "\r" : "",
              static_cast<long long>(ctx.epoch + 1), static_cast<long long>(options ? options->epochs : 0),
              static_cast<long long>(done), static_cast<long long>(ctx.steps_per_epoch), loss, ctx.lr,
              elapsed > 0 ? static_cast<double>(images_) / elapsed : 0.0, format_duration(eta).c_str(),
              interactive_ ? "\033[K" : "\n");
  line_open_ = interactive_;
  std::fflush(stdout);
}

void ProgressLogger::on_epoch_end(TrainerContext& ctx) {
  if (ctx.world.rank == 0) {
    if (line_open_) std::printf("\n");
    line_open_ = false;
    std::printf("epoch %lld: %s | %.0f img/s | %.1f s\n", static_cast<long long>(ctx.epoch + 1),
                summary(ctx).c_str(), metric(ctx, "images_per_s"), metric(ctx, "train_time_s"));
    std::fflush(stdout);
  }
  run_on_rank0(
      ctx,
      [&] {
        if (!options_.metrics_path.empty()) append_metrics_line(ctx);
      },
      "ProgressLogger");
}

void ProgressLogger::append_metrics_line(const TrainerContext& ctx) const {
  nlohmann::json line = nlohmann::json::object();
  for (const auto& [key, value] : ctx.metrics) {
    if (key == "epoch" || key == "step") {
      line[key] = static_cast<int64_t>(value);
    } else if (std::isfinite(value)) {
      line[key] = value;
    } else {
      line[key] = nullptr;  // JSON has no NaN
    }
  }
  std::ofstream out(options_.metrics_path, std::ios::app);
  out << line.dump() << "\n";
  out.flush();  // a short line sits in the buffer until here; a full disk shows only now
  LOCKSTEP_CHECK(out.good(), "cannot append to ", options_.metrics_path);
}

void ProgressLogger::on_train_end(TrainerContext& ctx) {
  if (ctx.world.rank != 0 || !ctx.stop_requested) return;
  if (line_open_) std::printf("\n");
  line_open_ = false;
  const char* reason = ctx.stop_reason.empty() ? "stop requested" : ctx.stop_reason.c_str();
  if (evaluating_ && !ctx.epoch_finished) {  // Note [Stop during evaluation]
    std::printf("training stopped after step %lld (during epoch %lld's evaluation, which a resumed run does "
                "again): %s\n",
                static_cast<long long>(ctx.global_step), static_cast<long long>(ctx.epoch + 1), reason);
  } else if (ctx.epoch_finished) {
    std::printf("training stopped after step %lld (the end of epoch %lld): %s\n",
                static_cast<long long>(ctx.global_step), static_cast<long long>(ctx.epoch + 1), reason);
  } else {
    std::printf("training stopped after step %lld (epoch %lld, step %lld of %lld): %s\n",
                static_cast<long long>(ctx.global_step), static_cast<long long>(ctx.epoch + 1),
                static_cast<long long>(ctx.batch_in_epoch), static_cast<long long>(ctx.steps_per_epoch), reason);
  }
  std::fflush(stdout);
}

}  // namespace lockstep::train
