#include "support/dist.hpp"

#include "lockstep/core/error.hpp"

namespace lockstep::testing {
namespace {
Runtime* g_runtime = nullptr;
}
Runtime& runtime() {
  LOCKSTEP_CHECK(g_runtime != nullptr, "the multi-rank test main has not created the Runtime");
  return *g_runtime;
}
void set_runtime(Runtime* runtime) { g_runtime = runtime; }
}  // namespace lockstep::testing
