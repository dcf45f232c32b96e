#include "lockstep/core/stop_signals.hpp"

#include <signal.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <map>
#include <mutex>

#include "lockstep/core/error.hpp"

namespace lockstep {
namespace {

const std::vector<std::pair<const char*, int>>& known_signals() {
  static const std::vector<std::pair<const char*, int>> known = {
      {"SIGHUP", SIGHUP},   {"SIGINT", SIGINT},   {"SIGQUIT", SIGQUIT}, {"SIGTERM", SIGTERM},
      {"SIGUSR1", SIGUSR1}, {"SIGUSR2", SIGUSR2}, {"SIGXCPU", SIGXCPU},
  };
  return known;
}

// Note [Signal flag]: the one process-wide state Lockstep keeps besides the World: a signal handler
// can reach nothing else. A lock-free atomic is async-signal-safe; the first signal wins.
std::atomic<int> g_caught{0};
static_assert(std::atomic<int>::is_always_lock_free, "the signal flag must be lock-free");

std::mutex g_mutex;  // guards g_depth, g_users and the handlers' installation
int g_depth = 0;
// Per signal, the live guards that have our handler on it. The last one to end restores the default,
// whichever guard installed it: guards ended out of order (two trainers in two threads, a guard
// moved into an object that outlives the next) must not take the handler from one still alive.
std::map<int, int> g_users;

extern "C" void lockstep_on_stop_signal(int signal) {
  int none = 0;
  g_caught.compare_exchange_strong(none, signal);
}

bool is_ours(const struct sigaction& action) {
  return (action.sa_flags & SA_SIGINFO) == 0 && action.sa_handler == &lockstep_on_stop_signal;
}

}  // namespace

int signal_number(const std::string& name, const std::string& who) {
  std::string upper;
  for (char c : name) upper += static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  if (!upper.empty() && std::all_of(upper.begin(), upper.end(), [](char c) { return std::isdigit(c) != 0; })) {
    const int number = upper.size() <= 3 ? std::stoi(upper) : -1;
    for (const auto& [known_name, known_number] : known_signals()) {
      if (known_number == number) return number;
    }
  } else {
    if (upper.rfind("SIG", 0) != 0) upper = "SIG" + upper;
    for (const auto& [known_name, known_number] : known_signals()) {
      if (upper == known_name) return known_number;
    }
  }
  std::string accepted;
  for (const auto& [known_name, known_number] : known_signals()) {
    accepted += (accepted.empty() ? "" : ", ") + std::string(known_name);
  }
  LOCKSTEP_FAIL(who, who.empty() ? "" : ": ", "'", name, "' is not a signal a run can stop on; expected one of ", accepted,
                " (with or without SIG, or its number)");
}

std::string signal_name(int signal) {
  for (const auto& [known_name, known_number] : known_signals()) {
    if (known_number == signal) return known_name;
  }
  return "signal " + std::to_string(signal);
}

StopSignals::StopSignals(const std::vector<std::string>& signals) {
  std::vector<int> numbers;
  for (const auto& name : signals) {
    const int number = signal_number(name, "StopSignals");
    if (std::find(numbers.begin(), numbers.end(), number) == numbers.end()) numbers.push_back(number);
  }
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_depth++ == 0) g_caught.store(0);
  for (int number : numbers) {
    struct sigaction current {};
    LOCKSTEP_CHECK(sigaction(number, nullptr, &current) == 0, "sigaction(", signal_name(number),
                   ") failed: ", std::strerror(errno));
    // Another live guard's handler; or it was, and a signal since found it (SA_RESETHAND put the
    // default back): that signal asked the run to stop, and the next one must find the default
    // action, which a new guard re-installing the handler would swallow.
    if (is_ours(current) || g_users[number] > 0) {
      installed_.push_back(number);
      ++g_users[number];
      continue;
    }
    // Note [Signal ownership]: only a default disposition is ours to take.
    if ((current.sa_flags & SA_SIGINFO) != 0 || current.sa_handler != SIG_DFL) continue;
    struct sigaction action {};
    action.sa_handler = &lockstep_on_stop_signal;
    sigemptyset(&action.sa_mask);
    // SA_RESETHAND: the second signal finds the default action again. SA_RESTART: system calls that
    // the signal interrupts (MPI's polling, file writes) carry on instead of failing with EINTR.
    action.sa_flags = SA_RESETHAND | SA_RESTART;
    LOCKSTEP_CHECK(sigaction(number, &action, nullptr) == 0, "sigaction(", signal_name(number),
                   ") failed: ", std::strerror(errno));
    installed_.push_back(number);
    owned_.push_back(number);
    ++g_users[number];
  }
}

StopSignals::~StopSignals() {
  std::lock_guard<std::mutex> lock(g_mutex);
  // What a guard takes was the default action (Note [Signal ownership]), so the default comes back
  // when the last guard using it ends; unless the program installed a handler of its own meanwhile,
  // which stays.
  for (int number : installed_) {
    if (--g_users[number] > 0) continue;
    struct sigaction current {};
    if (sigaction(number, nullptr, &current) != 0 || !is_ours(current)) continue;
    struct sigaction fallback {};
    fallback.sa_handler = SIG_DFL;
    sigemptyset(&fallback.sa_mask);
    sigaction(number, &fallback, nullptr);
  }
  --g_depth;
}

int StopSignals::caught() const { return g_caught.load(); }

}  // namespace lockstep
