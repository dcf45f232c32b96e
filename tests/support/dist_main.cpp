// main of the multi-rank tests: one Runtime (MPI) for the whole run, Catch2 on every rank, and the
// verdict combined over ranks so that every rank exits with the same status.
#include "support/catch_run.hpp"
#include <mpi.h>

#include <cstdio>

#include "support/dist.hpp"

int main(int argc, char** argv) {
  lockstep::Runtime runtime(argc, argv);
  lockstep::testing::set_runtime(&runtime);
  int failed = lockstep::testing::run_catch(argc, argv);
  int any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);  // every rank is done with the files
  lockstep::testing::remove_shared_temp_dirs(/*keep=*/any_failed != 0);
  if (any_failed != 0 && failed == 0 && runtime.rank() == 0) {
    std::fprintf(stderr, "another rank failed (see its output above)\n");
  }
  return any_failed != 0 ? 1 : 0;
}
