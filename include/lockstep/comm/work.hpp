#pragma once
// Work: the asynchronous handle every collective returns.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>

namespace lockstep::comm {

using Clock = std::chrono::steady_clock;

// The longest wait honoured, about 100 years. A longer timeout (std::chrono::milliseconds::max() or
// LOCKSTEP_TIMEOUT_S=inf for "no limit") is shortened to it: added to a clock's now() it would
// overflow, and the wait would time out at once instead of never.
inline constexpr std::chrono::milliseconds kMaxTimeout{100LL * 365 * 24 * 3600 * 1000};
inline constexpr std::chrono::milliseconds bounded_timeout(std::chrono::milliseconds timeout) {
  return timeout > kMaxTimeout ? kMaxTimeout : timeout;
}

// What a Work is about, for error messages and timelines.
struct WorkInfo {
  std::string op;          // "allreduce", "broadcast", ...
  std::uint64_t seq = 0;   // per-communicator issue number, identical on every rank for the same call
  std::int64_t numel = 0;  // elements of the (input) tensor
  std::int64_t bytes = 0;
  std::string dtype;
  int rank = 0;
  int size = 1;
  std::string describe() const;  // "allreduce #17 (float32, 1048576 elements, 4.0 MiB) on rank 1 of 3"
};

class Work {
 public:
  explicit Work(WorkInfo info, std::chrono::milliseconds default_timeout);
  virtual ~Work();
  Work(const Work&) = delete;
  Work& operator=(const Work&) = delete;

  // Waits for the operation with the timeout it was issued with. Rethrows its error; raises
  // lockstep::TimeoutError naming the operation when the time runs out.
  void wait() { wait(default_timeout_); }
  virtual void wait(std::chrono::milliseconds timeout) = 0;
  // Whether the operation has finished (successfully or not), without waiting: wait() then no longer
  // blocks on it, and raises its error if it failed (for then(), see below).
  virtual bool is_completed() const = 0;

  const WorkInfo& info() const { return info_; }
  // The timeout wait() uses: the communicator's at issue time (comm::default_timeout() unless set).
  std::chrono::milliseconds default_timeout() const { return default_timeout_; }
  // When the operation started and finished running (valid once completed); for timings and traces.
  virtual Clock::time_point start_time() const = 0;
  virtual Clock::time_point end_time() const = 0;
  double seconds() const;

 protected:
  [[noreturn]] void throw_timeout(std::chrono::milliseconds timeout) const;

 private:
  WorkInfo info_;
  std::chrono::milliseconds default_timeout_;
};

using WorkPtr = std::shared_ptr<Work>;

// A Work completed by another thread (the MPI progress thread, a test): mark_started, then
// mark_completed or mark_failed, exactly once.
class AsyncWork final : public Work {
 public:
  using Work::Work;
  using Work::wait;
  void wait(std::chrono::milliseconds timeout) override;
  bool is_completed() const override;
  Clock::time_point start_time() const override;
  Clock::time_point end_time() const override;

  void mark_started();
  void mark_completed();
  void mark_failed(std::exception_ptr error);
  // `given_up` (the communicator's) counts this Work while a wait() on it has timed out and it has not
  // completed: a collective given up on, for which the communicator's destructor need not wait a whole
  // timeout again. One that completes later no longer counts (a shutdown then waits for the others).
  void report_timeouts_to(std::shared_ptr<std::atomic<int>> given_up) { given_up_ = std::move(given_up); }

 private:
  mutable std::mutex mutex_;
  std::condition_variable done_cv_;
  bool done_ = false;
  std::atomic<bool> done_flag_{false};  // done_ without the lock, for wait()'s short spin
  std::exception_ptr error_;
  Clock::time_point start_{}, end_{};
  std::shared_ptr<std::atomic<int>> given_up_;
  bool counted_ = false;  // in *given_up_
};

// then(work, fn): a Work that, the first time it is waited on successfully, waits for `work` and
// then runs `fn` on the waiting thread (e.g. casting a compressed buffer back). Errors in either
// are rethrown from every wait. Its is_completed() is `work`'s: fn runs only in wait(), never on a
// polling thread (a continuation may issue a collective, whose order wait()'s caller decides), so the
// result is there only after wait(), which may still block on what fn issues.
WorkPtr then(WorkPtr work, std::function<void()> fn);

// A Work that is already done (world size 1, empty tensors handled without communication).
WorkPtr completed_work(WorkInfo info);

}  // namespace lockstep::comm
