// The NCCL entry points of a build without the NCCL communicator (compiled instead of
// src/comm/nccl/torch_cuda/). Callers never test for the backend with #ifdef: they call these, and
// get an error that says what this build lacks. LOCKSTEP_NCCL_UNAVAILABLE_REASON comes from the
// header cmake/LockstepNccl.cmake generates.
#include "comm/nccl_build_info.hpp"
#include "lockstep/comm/nccl_communicator.hpp"
#include "lockstep/core/error.hpp"

namespace lockstep::comm {

namespace {
[[noreturn]] void unavailable(const char* what) {
  LOCKSTEP_FAIL(what, ": the NCCL communicator is not part of this build: ", LOCKSTEP_NCCL_UNAVAILABLE_REASON,
                ". Use backend \"mpi\" (it also takes CUDA tensors), or rebuild against a CUDA-enabled LibTorch "
                "with CUDA and NCCL installed (docs/gpu.md)");
}
}  // namespace

bool nccl_available() { return false; }
std::string cuda_pci_bus_id(int) { return ""; }
int nccl_device_index(const Communicator&) { return -1; }
std::string nccl_build_info() { return std::string("not built: ") + LOCKSTEP_NCCL_UNAVAILABLE_REASON; }
CommunicatorPtr make_nccl_communicator(NcclCommunicatorOptions) { unavailable("make_nccl_communicator"); }
void nccl_raw_allreduce(Communicator&, const at::Tensor&) { unavailable("nccl_raw_allreduce"); }
void nccl_synchronize(Communicator&) { unavailable("nccl_synchronize"); }

}  // namespace lockstep::comm
