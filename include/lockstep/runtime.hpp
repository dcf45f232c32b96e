#pragma once
// Runtime: the one object a Lockstep program creates first. It initialises MPI (thread level
// MPI_THREAD_MULTIPLE, checked), finds rank / world size / local rank, picks the device and the
// communicator, applies the allocator and thread tuning of docs/performance.md, and finalises MPI.
// An exception that escapes on any rank ends the whole job (MPI_Abort) with its message and rank,
// so the other ranks never hang waiting for it.

#include <chrono>
#include <memory>
#include <string>

#include "lockstep/comm/communicator.hpp"
#include "lockstep/core/world.hpp"

namespace lockstep {

struct RuntimeOptions {
  // Raise glibc's mmap/trim thresholds so large buffers are reused instead of being mapped and
  // page-faulted afresh every step (about 2x on ResNet-18 steps here; docs/performance.md).
  // The environment variable LOCKSTEP_TUNE_MALLOC=0 turns it off without a rebuild.
  bool tune_malloc = true;
  // Intra-op threads for LibTorch (and OpenBLAS): 0 = the CPUs this rank may run on (its affinity: a
  // batch system's cpuset, mpirun's binding, taskset), at most a cgroup CPU quota's worth (a container's
  // --cpus), divided by the ranks on the host that may run on them too (at least 1), so co-located
  // ranks do not oversubscribe the cores.
  int threads = 0;
  // "auto": the local rank's GPU (cuda:local_rank % devices) when CUDA is usable, else the CPU.
  // "cpu" keeps a GPU machine on the CPU; "cuda" insists on a GPU (an error without one).
  std::string device = "auto";
  // "auto": NCCL when the device is a GPU, this build has the NCCL communicator and every rank on the
  // host has a GPU of its own; MPI otherwise (it stages CUDA tensors through host memory). "mpi" or
  // "nccl" force one (nccl needs device cuda).
  std::string backend = "auto";
  // Default timeout for every collective's wait(); 0 = comm::default_timeout() (LOCKSTEP_TIMEOUT_S).
  std::chrono::milliseconds timeout{0};
};

class Runtime {
 public:
  Runtime(int& argc, char**& argv, RuntimeOptions options = {});
  ~Runtime();
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  const World& world() const { return world_; }
  int rank() const { return world_.rank; }
  int size() const { return world_.size; }
  // The communicator for this process (created on first use, then shared; collective the first time).
  comm::CommunicatorPtr communicator();
  // "nccl" or "mpi": what communicator() creates, and why ("mpi (2 ranks share 1 GPU on host a)").
  const std::string& backend() const { return backend_; }
  const std::string& backend_reason() const { return backend_reason_; }

 private:
  void select_device_and_backend();

  RuntimeOptions options_;
  World world_;
  bool owns_mpi_ = false;
  std::string backend_;
  std::string backend_reason_;
  comm::CommunicatorPtr communicator_;
};

namespace detail {
// Note [A config one rank cannot read]: config::program_config's agreement, before any Runtime.
// Collective over MPI_COMM_WORLD: starts MPI (MPI_THREAD_MULTIPLE) unless it runs, and returns this
// rank and every rank's `text`, by rank. A Runtime made afterwards adopts the MPI started here and
// finalizes it; end_started_mpi() finalizes it at once (after a barrier), for a program that leaves
// before it makes one.
struct Gathered {
  int rank = 0;
  std::vector<std::string> texts;
};
Gathered start_mpi_and_gather(const std::string& text);
void end_started_mpi();
}  // namespace detail

// Applies the malloc thresholds of RuntimeOptions::tune_malloc (idempotent). For programs that do
// not use Runtime but want the same setting.
void tune_malloc();

}  // namespace lockstep
