#include "lockstep/comm/communicator.hpp"

#include <cstdlib>
#include <string>

#include "lockstep/core/error.hpp"

namespace lockstep::comm {

const char* to_string(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum: return "sum";
    case ReduceOp::Average: return "average";
    case ReduceOp::Min: return "min";
    case ReduceOp::Max: return "max";
    case ReduceOp::Product: return "product";
  }
  return "unknown";
}

std::chrono::milliseconds default_timeout() {
  // Ten minutes, like a generous c10d default: long enough for a slow first step, short enough
  // that a dead peer ends the job instead of holding the cluster.
  constexpr double kDefaultSeconds = 600.0;
  double seconds = kDefaultSeconds;
  if (const char* text = std::getenv("LOCKSTEP_TIMEOUT_S"); text != nullptr && *text != '\0') {
    char* end = nullptr;
    seconds = std::strtod(text, &end);
    // At least a millisecond: a smaller one would be 0 ms, and every wait would time out at once.
    LOCKSTEP_CHECK(end != text && *end == '\0' && seconds >= 0.001,
                   "LOCKSTEP_TIMEOUT_S must be a number of seconds >= 0.001 (or inf), found '", text, "'");
  }
  // Compared as a double first: converting inf, or anything past int64's range, is undefined.
  const double ms = seconds * 1000.0;
  if (ms >= static_cast<double>(kMaxTimeout.count())) return kMaxTimeout;
  return std::chrono::milliseconds(static_cast<std::int64_t>(ms));
}

}  // namespace lockstep::comm
