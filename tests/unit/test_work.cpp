#include <catch2/catch.hpp>

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
  auto done = completed_work(info());
  CHECK(done->is_completed());
  done->wait();
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
