// Catch2's implementation, compiled once for both test executables (each has its own main, which
// calls run_catch: Catch::Session is only visible where the implementation is).
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include "support/catch_run.hpp"

namespace lockstep::testing {
int run_catch(int argc, char** argv) { return Catch::Session().run(argc, argv); }
}  // namespace lockstep::testing
