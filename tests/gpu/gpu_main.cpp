// main of the GPU tests (label gpu): like the multi-rank tests' main, but the whole executable is
// skipped (exit 77, CTest's SKIP_RETURN_CODE) with a message where no GPU is usable.
#include "support/catch_run.hpp"
#include <mpi.h>
#include <torch/cuda.h>

#include <cstdio>

#include "support/dist.hpp"

int main(int argc, char** argv) {
  lockstep::Runtime runtime(argc, argv);
  lockstep::testing::set_runtime(&runtime);
  int usable = torch::cuda::is_available() ? 1 : 0, all_usable = 0;
  MPI_Allreduce(&usable, &all_usable, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (!all_usable) {
    if (runtime.rank() == 0) std::printf("SKIPPED: no usable CUDA device on some rank; the gpu tests need one\n");
    return 77;
  }
  if (runtime.rank() == 0) {
    std::printf("gpu tests: %d rank(s), %d GPU(s) on this host, runtime backend %s (%s)\n", runtime.size(),
                static_cast<int>(torch::cuda::device_count()), runtime.backend().c_str(), runtime.backend_reason().c_str());
  }
  int failed = lockstep::testing::run_catch(argc, argv);
  int any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (any_failed != 0 && failed == 0 && runtime.rank() == 0) std::fprintf(stderr, "another rank failed\n");
  lockstep::testing::remove_shared_temp_dirs(/*keep=*/any_failed != 0);
  return any_failed != 0 ? 1 : 0;
}
