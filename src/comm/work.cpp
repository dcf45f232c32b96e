#include "lockstep/comm/work.hpp"

#include <cstdio>
#include <thread>
#include <utility>

#include "lockstep/core/error.hpp"

namespace lockstep::comm {

std::string WorkInfo::describe() const {
  char size_text[32];
  if (bytes >= (1 << 20)) {
    std::snprintf(size_text, sizeof(size_text), "%.1f MiB", bytes / double(1 << 20));
  } else if (bytes >= (1 << 10)) {
    std::snprintf(size_text, sizeof(size_text), "%.1f KiB", bytes / double(1 << 10));
  } else {
    std::snprintf(size_text, sizeof(size_text), "%lld B", static_cast<long long>(bytes));
  }
  std::string text = op + " #" + std::to_string(seq);
  if (!dtype.empty()) text += " (" + dtype + ", " + std::to_string(numel) + " elements, " + size_text + ")";
  return text + " on rank " + std::to_string(rank) + " of " + std::to_string(size);
}

Work::Work(WorkInfo info, std::chrono::milliseconds default_timeout)
    : info_(std::move(info)), default_timeout_(bounded_timeout(default_timeout)) {}
Work::~Work() = default;

double Work::seconds() const {
  if (!is_completed()) return 0.0;
  return std::chrono::duration<double>(end_time() - start_time()).count();
}

void Work::throw_timeout(std::chrono::milliseconds timeout) const {
  throw TimeoutError(info_.describe() + " did not complete within " + std::to_string(timeout.count()) +
                         " ms (a peer may have died, or ranks issued different collectives; "
                         "set LOCKSTEP_TIMEOUT_S to change the limit)",
                     __FILE__, __LINE__);
}

// ---- AsyncWork ----

// Note [Short spin]: a waiter that goes straight to sleep on the condition variable pays a futex
// wake-up (~5-10 us here) after the progress thread finishes; for small and medium collectives
// that is a large share of the time (it was ~13 us of 205 us at 1 MiB). Spinning briefly first
// catches the collectives that end soon; the spin is short enough (and yields) that a waiter on
// a busy 2-core machine does not starve the ranks' progress threads.
constexpr auto kSpin = std::chrono::microseconds(50);

void AsyncWork::wait(std::chrono::milliseconds timeout) {
  timeout = bounded_timeout(timeout);
  if (!done_flag_.load(std::memory_order_acquire)) {
    const auto spin_end = Clock::now() + kSpin;
    while (!done_flag_.load(std::memory_order_acquire) && Clock::now() < spin_end) std::this_thread::yield();
  }
  std::unique_lock<std::mutex> lock(mutex_);
  if (!done_cv_.wait_for(lock, timeout, [this] { return done_; })) {
    if (given_up_ && !counted_) {
      counted_ = true;
      given_up_->fetch_add(1);
    }
    throw_timeout(timeout);
  }
  if (error_) std::rethrow_exception(error_);
}

bool AsyncWork::is_completed() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return done_;
}

Clock::time_point AsyncWork::start_time() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return start_;
}

Clock::time_point AsyncWork::end_time() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return end_;
}

void AsyncWork::mark_started() {
  std::lock_guard<std::mutex> lock(mutex_);
  start_ = Clock::now();
}

void AsyncWork::mark_completed() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    end_ = Clock::now();
    if (start_ == Clock::time_point{}) start_ = end_;
    done_ = true;
    done_flag_.store(true, std::memory_order_release);
    if (counted_) given_up_->fetch_sub(1);
  }
  done_cv_.notify_all();
}

void AsyncWork::mark_failed(std::exception_ptr error) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    end_ = Clock::now();
    if (start_ == Clock::time_point{}) start_ = end_;
    error_ = std::move(error);
    done_ = true;
    done_flag_.store(true, std::memory_order_release);
    if (counted_) given_up_->fetch_sub(1);
  }
  done_cv_.notify_all();
}

// ---- continuation and completed works ----

namespace {

class ThenWork final : public Work {
 public:
  ThenWork(WorkPtr inner, std::function<void()> fn)
      : Work(inner->info(), inner->default_timeout()), inner_(std::move(inner)), fn_(std::move(fn)) {}

  void wait(std::chrono::milliseconds timeout) override {
    inner_->wait(timeout);
    std::lock_guard<std::mutex> lock(mutex_);
    if (ran_) {
      if (error_) std::rethrow_exception(error_);
      return;
    }
    ran_ = true;
    // Released once run: what it captured (a 16-bit copy of a bucket, PowerSGD's factors) would
    // otherwise live as long as this Work is kept.
    const std::function<void()> fn = std::exchange(fn_, nullptr);
    try {
      fn();
    } catch (...) {
      error_ = std::current_exception();
      throw;
    }
    end_ = Clock::now();
  }
  bool is_completed() const override { return inner_->is_completed(); }
  Clock::time_point start_time() const override { return inner_->start_time(); }
  Clock::time_point end_time() const override {
    std::lock_guard<std::mutex> lock(mutex_);
    return ran_ && end_ != Clock::time_point{} ? end_ : inner_->end_time();
  }

 private:
  WorkPtr inner_;
  std::function<void()> fn_;
  mutable std::mutex mutex_;
  bool ran_ = false;
  std::exception_ptr error_;
  Clock::time_point end_{};
};

}  // namespace

WorkPtr then(WorkPtr work, std::function<void()> fn) {
  LOCKSTEP_CHECK(work != nullptr, "comm::then needs a Work to follow");
  return std::make_shared<ThenWork>(std::move(work), std::move(fn));
}

WorkPtr completed_work(WorkInfo info) {
  auto work = std::make_shared<AsyncWork>(std::move(info), std::chrono::milliseconds(0));
  work->mark_completed();
  return work;
}

}  // namespace lockstep::comm
