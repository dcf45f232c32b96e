#pragma once
namespace lockstep::testing {
// Runs Catch2 on the command line's tests; returns the number of failed assertions (capped).
int run_catch(int argc, char** argv);
}  // namespace lockstep::testing
