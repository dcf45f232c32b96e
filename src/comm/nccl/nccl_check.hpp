#pragma once
// LOCKSTEP_NCCL_CHECK and LOCKSTEP_CUDA_CHECK: NCCL and CUDA return codes become lockstep::Error with
// the library's own error string (and, for NCCL, its description of the last failure), the call that
// failed and where. Internal to the NCCL backend: they need nccl.h and cuda_runtime_api.h.

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <string>

namespace lockstep::comm::nccl {

// "NCCL call failed: ncclAllReduce(...): unhandled cuda error (run with NCCL_DEBUG=INFO for details)
// (code 1) [last error: ...]"
std::string nccl_error_text(const char* expression, ncclResult_t code, ncclComm_t comm = nullptr);
std::string cuda_error_text(const char* expression, cudaError_t code);
[[noreturn]] void throw_nccl_error(const char* file, int line, const char* expression, ncclResult_t code,
                                   ncclComm_t comm);
[[noreturn]] void throw_cuda_error(const char* file, int line, const char* expression, cudaError_t code);

}  // namespace lockstep::comm::nccl

#define LOCKSTEP_NCCL_CHECK(expr) LOCKSTEP_NCCL_CHECK_COMM(expr, nullptr)

// With the communicator, so the message carries NCCL's description of what went wrong on it.
#define LOCKSTEP_NCCL_CHECK_COMM(expr, nccl_comm)                                              \
  do {                                                                                         \
    ncclResult_t lockstep_nccl_rc_ = (expr);                                                   \
    if (lockstep_nccl_rc_ != ncclSuccess) {                                                    \
      ::lockstep::comm::nccl::throw_nccl_error(__FILE__, __LINE__, #expr, lockstep_nccl_rc_, (nccl_comm)); \
    }                                                                                          \
  } while (false)

#define LOCKSTEP_CUDA_CHECK(expr)                                                              \
  do {                                                                                         \
    cudaError_t lockstep_cuda_rc_ = (expr);                                                    \
    if (lockstep_cuda_rc_ != cudaSuccess) {                                                    \
      ::lockstep::comm::nccl::throw_cuda_error(__FILE__, __LINE__, #expr, lockstep_cuda_rc_);  \
    }                                                                                          \
  } while (false)
