#include "support/catch_run.hpp"

#include "lockstep/runtime.hpp"

int main(int argc, char** argv) {
  lockstep::tune_malloc();
  return lockstep::testing::run_catch(argc, argv);
}
