#pragma once
// The NCCL communicator: collectives on CUDA tensors, one NCCL communicator per process on the
// process's GPU, bootstrapped over MPI. Same operations, dtypes and errors as MpiCommunicator.
//
//   lockstep::Runtime runtime(argc, argv);          // picks the GPU from the local rank
//   auto comm = runtime.communicator();             // NCCL when CUDA is usable (backend "auto")
//   auto work = comm->allreduce(grad);              // queued behind the work that produced `grad`
//   work->wait();                                   // the current stream waits; the host does not
//
// Stream semantics (docs/gpu.md): each collective runs on the communicator's own CUDA stream, after
// the work already queued on the caller's current stream; wait() makes the caller's current stream
// wait for it without blocking the host. CPU tensors are accepted too: they go over MPI on the host
// (never through the GPU, so they neither wait for queued GPU work nor stall it), and their wait()
// blocks the host until the result is there. A collective that outlives its timeout, or an error NCCL reports, aborts
// the communicator and raises an error naming the operation, its sequence number and the rank.
//
// The backend is in a build of Lockstep only when CUDA, NCCL and a CUDA-enabled LibTorch were found;
// the functions below exist in every build and say so when it is missing.

#include <chrono>
#include <string>

#include "lockstep/comm/communicator.hpp"

namespace lockstep::comm {

struct NcclCommunicatorOptions {
  // CUDA device index; -1 = LibTorch's current CUDA device (Runtime sets it from the local rank).
  int device = -1;
  // How long a collective may run before the communicator is aborted; 0 = comm::default_timeout().
  std::chrono::milliseconds timeout{0};
  // wait() blocks the host until the collective is done (and raises its timeout there). Also turned
  // on by LOCKSTEP_NCCL_BLOCKING_WAIT=1. Off: only the caller's stream waits.
  bool blocking_wait = false;
};

// True when this build has the NCCL communicator (CUDA, NCCL and a CUDA-enabled LibTorch).
bool nccl_available();
// The PCI bus id of CUDA device `device` as this process numbers it ("0000:3b:00.0"), or "" when this
// build has no NCCL communicator or CUDA cannot tell. How the runtime tells ranks' GPUs apart when
// each rank sees its own through CUDA_VISIBLE_DEVICES (Note [GPUs of their own]).
std::string cuda_pci_bus_id(int device);
// The CUDA device index an NCCL communicator runs on; -1 for any other communicator (and in a build
// without NCCL). NCCL reduces tensors of that GPU only: DataParallel checks the model against it.
int nccl_device_index(const Communicator& comm);
// What the NCCL part of this build is: "NCCL 2.28.9 (compiled against 2.28.9), CUDA runtime 13000", or
// why it is missing.
std::string nccl_build_info();

// Collective: every rank of MPI_COMM_WORLD calls it. Throws a lockstep::Error when the build has no
// NCCL backend or the process has no usable GPU.
CommunicatorPtr make_nccl_communicator(NcclCommunicatorOptions options = {});

// The benchmarks' baseline: one in-place sum ncclAllReduce of `tensor` (a CUDA tensor) issued straight
// on `comm`'s NCCL communicator and stream, with none of Lockstep's bookkeeping (no events, no Work,
// no checks beyond the device). Returns at once; nccl_synchronize() waits for it.
void nccl_raw_allreduce(Communicator& comm, const at::Tensor& tensor);
// Blocks the host until everything queued on `comm`'s communication stream is done.
void nccl_synchronize(Communicator& comm);

}  // namespace lockstep::comm
