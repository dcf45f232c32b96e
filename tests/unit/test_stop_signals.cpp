// Stop signals (core/stop_signals.hpp) and the stop vote (comm/stop_vote.hpp) in one process.
#include <torch/torch.h>
#include <catch2/catch.hpp>

#include <signal.h>

#include <atomic>
#include <memory>

#include "lockstep/comm/stop_vote.hpp"
#include "lockstep/core/error.hpp"
#include "lockstep/core/stop_signals.hpp"
#include "support/solo_communicator.hpp"

namespace {

using lockstep::StopSignals;

// The handler installed for `signal` right now.
void (*handler_of(int signal))(int) {
  struct sigaction current {};
  sigaction(signal, nullptr, &current);
  return current.sa_handler;
}

std::atomic<int> g_own_handler_calls{0};
extern "C" void own_handler(int) { g_own_handler_calls.fetch_add(1); }

}  // namespace

TEST_CASE("signal names: with or without SIG, any case, or the number, others are named in the error",
          "[signals]") {
  CHECK(lockstep::signal_number("SIGTERM") == SIGTERM);
  CHECK(lockstep::signal_number("term") == SIGTERM);
  CHECK(lockstep::signal_number("Usr1") == SIGUSR1);
  CHECK(lockstep::signal_number(std::to_string(SIGUSR2)) == SIGUSR2);
  CHECK(lockstep::signal_name(SIGUSR1) == "SIGUSR1");
  CHECK(lockstep::signal_name(99) == "signal 99");
  CHECK_THROWS_WITH(lockstep::signal_number("SIGKILL", "trainer.stop_signals"),
                    Catch::Contains("trainer.stop_signals: 'SIGKILL' is not a signal a run can stop on") &&
                        Catch::Contains("SIGTERM, SIGUSR1"));
  CHECK_THROWS_WITH(lockstep::signal_number("9"), Catch::Contains("'9' is not a signal"));
  CHECK_THROWS_WITH(lockstep::signal_number(""), Catch::Contains("'' is not a signal"));
  CHECK_THROWS_WITH(StopSignals({"SIGUSR1", "TERMINATE"}), Catch::Contains("'TERMINATE'"));
}

TEST_CASE("StopSignals: the first signal sets the flag, the second finds the default action, the guard "
          "restores it",
          "[signals]") {
  REQUIRE(handler_of(SIGUSR2) == SIG_DFL);
  {
    StopSignals guard({"SIGUSR2", "USR2"});  // a repeat is taken once
    CHECK(guard.installed() == std::vector<int>{SIGUSR2});
    CHECK(guard.caught() == 0);
    CHECK(handler_of(SIGUSR2) != SIG_DFL);
    raise(SIGUSR2);  // delivered to this thread before raise() returns
    CHECK(guard.caught() == SIGUSR2);
    CHECK(handler_of(SIGUSR2) == SIG_DFL);  // SA_RESETHAND: a second SIGUSR2 would end the process
  }
  CHECK(handler_of(SIGUSR2) == SIG_DFL);
  StopSignals again({"SIGUSR2"});
  CHECK(again.caught() == 0);  // a new outermost guard starts with a clear flag
}

TEST_CASE("StopSignals: a signal the program handles itself is left to it", "[signals]") {
  struct sigaction own {};
  own.sa_handler = &own_handler;
  sigemptyset(&own.sa_mask);
  struct sigaction before {};
  REQUIRE(sigaction(SIGUSR2, &own, &before) == 0);
  g_own_handler_calls = 0;
  {
    StopSignals guard({"SIGUSR2"});
    CHECK(guard.installed().empty());
    raise(SIGUSR2);
    CHECK(g_own_handler_calls == 1);
    CHECK(guard.caught() == 0);
  }
  CHECK(handler_of(SIGUSR2) == &own_handler);
  sigaction(SIGUSR2, &before, nullptr);
}

TEST_CASE("StopSignals: nested guards share the flag, the inner one leaves the outer's handler", "[signals]") {
  StopSignals outer({"SIGUSR2"});
  {
    StopSignals inner({"SIGUSR2", "SIGHUP"});
    CHECK(inner.installed() == std::vector<int>{SIGUSR2, SIGHUP});
    raise(SIGHUP);
    CHECK(inner.caught() == SIGHUP);
  }
  CHECK(outer.caught() == SIGHUP);
  CHECK(handler_of(SIGHUP) == SIG_DFL);
  CHECK(handler_of(SIGUSR2) != SIG_DFL);  // still the outer guard's
}

TEST_CASE("StopSignals: a guard made after a signal was caught leaves the default action for the next one",
          "[signals]") {
  StopSignals outer({"SIGUSR2"});
  raise(SIGUSR2);
  CHECK(outer.caught() == SIGUSR2);
  REQUIRE(handler_of(SIGUSR2) == SIG_DFL);  // the second SIGUSR2 ends the process, as its sender insists
  {
    StopSignals inner({"SIGUSR2"});  // a second fit() of the same program, say
    CHECK(inner.caught() == SIGUSR2);
    CHECK(handler_of(SIGUSR2) == SIG_DFL);  // not taken back: it would swallow that second signal
  }
  CHECK(handler_of(SIGUSR2) == SIG_DFL);
}

TEST_CASE("StopSignals: guards ended out of order leave the handler to the one still alive", "[signals]") {
  auto first = std::make_unique<StopSignals>(std::vector<std::string>{"SIGUSR2"});
  StopSignals second({"SIGUSR2"});
  first.reset();  // the guard that installed the handler ends first
  CHECK(handler_of(SIGUSR2) != SIG_DFL);  // still the live guard's
  raise(SIGUSR2);  // caught, not the default action (which would end the test process)
  CHECK(second.caught() == SIGUSR2);
}

TEST_CASE("StopVote: codes come back `lag` posts later, finish() reads the rest", "[signals]") {
  auto solo = std::make_shared<lockstep::testing::SoloCommunicator>();
  lockstep::comm::StopVote vote(solo, c10::Device(c10::kCPU), 2);
  CHECK(vote.post(0).empty());
  CHECK(vote.post(7).empty());
  CHECK(vote.post(0) == std::vector<std::int32_t>{0});
  CHECK(vote.post(-1) == std::vector<std::int32_t>{7});
  CHECK(vote.post(0) == std::vector<std::int32_t>{0});
  // In flight: -1 and 0. finish() gives each rank's first non-zero code among them.
  CHECK(vote.finish() == std::vector<std::int32_t>{-1});
  CHECK(vote.finish() == std::vector<std::int32_t>{0});
  CHECK(vote.post(3).empty());  // usable again, the lag counted afresh
  CHECK_THROWS_WITH(lockstep::comm::StopVote(solo, c10::Device(c10::kCPU), 0), Catch::Contains("lag must be >= 1"));
}
