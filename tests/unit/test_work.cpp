#include <catch2/catch.hpp>

#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "lockstep/comm/communicator.hpp"
#include "lockstep/comm/work.hpp"
#include "lockstep/core/error.hpp"

using namespace lockstep::comm;
using Catch::Matchers::Contains;

namespace {
WorkInfo info() {
  WorkInfo i;
  i.op = "allreduce";
  i.seq = 7;
  i.numel = 1 << 20;
  i.bytes = 4 << 20;
  i.dtype = "float32";
  i.rank = 1;
  i.size = 3;
  return i;
}
}  // namespace

TEST_CASE("WorkInfo describes the operation", "[comm]") {
  CHECK(info().describe() == "allreduce #7 (float32, 1048576 elements, 4.0 MiB) on rank 1 of 3");
}

TEST_CASE("AsyncWork completes from another thread and records its times", "[comm]") {
  auto work = std::make_shared<AsyncWork>(info(), std::chrono::milliseconds(5000));
  CHECK_FALSE(work->is_completed());
  std::thread t([&] {
    work->mark_started();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    work->mark_completed();
  });
  work->wait();
  t.join();
  CHECK(work->is_completed());
  CHECK(work->seconds() >= 0.015);
  CHECK(work->end_time() >= work->start_time());
}

TEST_CASE("AsyncWork times out with a message naming the operation", "[comm]") {
  auto work = std::make_shared<AsyncWork>(info(), std::chrono::milliseconds(30));
  CHECK_THROWS_AS(work->wait(), lockstep::TimeoutError);
  CHECK_THROWS_WITH(work->wait(), Contains("allreduce #7") && Contains("rank 1 of 3") && Contains("30 ms"));
}

TEST_CASE("AsyncWork counts itself given up on only until it completes", "[comm]") {
  // The communicator's destructor waits a short grace, not a whole timeout, while some Work is counted.
  // Before, one timed-out wait shortened it for good, even after that collective had completed.
  auto given_up = std::make_shared<std::atomic<int>>(0);
  for (const bool fail : {false, true}) {
    auto work = std::make_shared<AsyncWork>(info(), std::chrono::milliseconds(5000));
    work->report_timeouts_to(given_up);
    CHECK_THROWS(work->wait(std::chrono::milliseconds(1)));
    CHECK_THROWS(work->wait(std::chrono::milliseconds(1)));  // counted once
    CHECK(given_up->load() == 1);
    if (fail) {
      work->mark_failed(std::make_exception_ptr(std::runtime_error("late failure")));
    } else {
      work->mark_completed();
    }
    CHECK(given_up->load() == 0);
  }
}

TEST_CASE("AsyncWork rethrows a failure from every wait", "[comm]") {
  auto work = std::make_shared<AsyncWork>(info(), std::chrono::milliseconds(1000));
  work->mark_failed(std::make_exception_ptr(std::runtime_error("MPI said no")));
  CHECK(work->is_completed());
  CHECK_THROWS_WITH(work->wait(), Contains("MPI said no"));
  CHECK_THROWS_WITH(work->wait(), Contains("MPI said no"));
}

TEST_CASE("then runs its continuation once, after the work", "[comm]") {
  auto inner = std::make_shared<AsyncWork>(info(), std::chrono::milliseconds(1000));
  int runs = 0;
  auto work = then(inner, [&] { ++runs; });
  CHECK_FALSE(work->is_completed());
  inner->mark_completed();
  work->wait();
  work->wait();
  CHECK(runs == 1);
  CHECK(work->info().seq == 7);
  // What the continuation captured (a 16-bit copy of a bucket) is released once it ran, though the
  // Work is kept.
  auto captured = std::make_shared<int>(1);
  const std::weak_ptr<int> watch = captured;
  auto kept = then(completed_work(info()), [captured] {});
  captured.reset();
  CHECK_FALSE(watch.expired());
  kept->wait();
  CHECK(watch.expired());
  auto done = completed_work(info());
  CHECK(done->is_completed());
  done->wait();
}

TEST_CASE("a timeout too long for the clock waits instead of timing out at once", "[comm]") {
  // milliseconds::max() in nanoseconds overflows steady_clock: condition_variable::wait_for then
  // returned at once, so "no limit" failed every wait with a TimeoutError.
  const auto forever = std::chrono::milliseconds::max();
  auto work = std::make_shared<AsyncWork>(info(), forever);
  CHECK(work->default_timeout() == kMaxTimeout);
  std::thread t([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    work->mark_completed();
  });
  CHECK_NOTHROW(work->wait());
  t.join();
  auto other = std::make_shared<AsyncWork>(info(), std::chrono::milliseconds(1000));
  std::thread u([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    other->mark_completed();
  });
  CHECK_NOTHROW(other->wait(forever));
  u.join();
}

namespace {
// Sets LOCKSTEP_TIMEOUT_S for one scope and puts back what was there.
class TimeoutEnv {
 public:
  explicit TimeoutEnv(const char* value) {
    if (const char* old = std::getenv("LOCKSTEP_TIMEOUT_S")) old_ = old;
    if (value) {
      setenv("LOCKSTEP_TIMEOUT_S", value, 1);
    } else {
      unsetenv("LOCKSTEP_TIMEOUT_S");
    }
  }
  ~TimeoutEnv() {
    if (old_) {
      setenv("LOCKSTEP_TIMEOUT_S", old_->c_str(), 1);
    } else {
      unsetenv("LOCKSTEP_TIMEOUT_S");
    }
  }

 private:
  std::optional<std::string> old_;
};
}  // namespace

TEST_CASE("LOCKSTEP_TIMEOUT_S: seconds, inf or huge for no limit, and errors for the rest", "[comm]") {
  using std::chrono::milliseconds;
  {
    TimeoutEnv env(nullptr);
    CHECK(default_timeout() == milliseconds(600000));
  }
  {
    TimeoutEnv env("2.5");
    CHECK(default_timeout() == milliseconds(2500));
  }
  for (const char* unlimited : {"inf", "1e12", "1e300"}) {
    INFO(unlimited);
    TimeoutEnv env(unlimited);
    CHECK(default_timeout() == kMaxTimeout);  // before: inf cast to int64 (undefined), 1e12 s overflowed the clock
  }
  for (const char* bad : {"0", "-3", "nan", "ten", "5s", "0.0004"}) {  // 0.4 ms was 0 ms: every wait timed out
    INFO(bad);
    TimeoutEnv env(bad);
    CHECK_THROWS_WITH(default_timeout(), Contains("LOCKSTEP_TIMEOUT_S must be a number of seconds >= 0.001") &&
                                             Contains(std::string("'") + bad + "'"));
  }
}

TEST_CASE("LOCKSTEP_CHECK names what failed and where", "[core]") {
  try {
    LOCKSTEP_CHECK(1 + 1 == 3, "expected ", 3, ", found ", 2);
    FAIL("no throw");
  } catch (const lockstep::Error& e) {
    CHECK(e.message() == "expected 3, found 2");
    CHECK_THAT(e.what(), Contains("test_work.cpp:"));
  }
  CHECK(std::string(to_string(ReduceOp::Average)) == "average");
}
