#include "lockstep/core/world.hpp"

#include <algorithm>
#include <cstdlib>

namespace lockstep {

int launcher_rank() {
  for (const char* name : {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"}) {
    if (const char* value = std::getenv(name); value != nullptr && *value != '\0') return std::atoi(value);
  }
  return 0;
}

int launcher_size() {
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"}) {
    if (const char* value = std::getenv(name); value != nullptr && *value != '\0') return std::max(1, std::atoi(value));
  }
  return 1;
}

}  // namespace lockstep
