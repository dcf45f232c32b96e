#pragma once
// World: who this process is among the job's ranks, as the launcher (mpirun) set it up.

#include <c10/core/Device.h>

#include <string>

namespace lockstep {

struct World {
  int rank = 0;        // 0 .. size-1 over the whole job
  int size = 1;
  int local_rank = 0;  // rank among the processes on this host (picks the GPU)
  int local_size = 1;
  std::string host;
  c10::Device device = c10::Device(c10::kCPU);

  bool is_root() const { return rank == 0; }
};

// This process's rank as the launcher numbered it (OMPI_COMM_WORLD_RANK, PMIX_RANK, PMI_RANK or
// SLURM_PROCID), readable before MPI starts; 0 outside a launcher. For messages printed before the
// Runtime exists (a bad command line or config, on which every rank fails alike): print them once.
int launcher_rank();
// The number of processes the launcher started (OMPI_COMM_WORLD_SIZE, PMI_SIZE or
// SLURM_STEP_NUM_TASKS), readable before MPI starts; 1 outside a launcher.
int launcher_size();

}  // namespace lockstep
