#include "comm/nccl/nccl_check.hpp"

#include "comm/nccl/nccl_compat.hpp"
#include "lockstep/core/error.hpp"

namespace lockstep::comm::nccl {

std::string nccl_error_text(const char* expression, ncclResult_t code, ncclComm_t comm) {
  std::string text = detail::str_cat("NCCL call failed: ", expression, ": ", ncclGetErrorString(code), " (code ",
                                     static_cast<int>(code), ")");
  const char* last = compat::last_error(comm);
  if (last != nullptr && *last != '\0') text += detail::str_cat(" [", last, "]");
  return text + "; NCCL_DEBUG=INFO prints NCCL's own account";
}

std::string cuda_error_text(const char* expression, cudaError_t code) {
  return detail::str_cat("CUDA call failed: ", expression, ": ", cudaGetErrorString(code), " (", cudaGetErrorName(code),
                         ")");
}

void throw_nccl_error(const char* file, int line, const char* expression, ncclResult_t code, ncclComm_t comm) {
  throw Error(nccl_error_text(expression, code, comm), file, line);
}

void throw_cuda_error(const char* file, int line, const char* expression, cudaError_t code) {
  cudaGetLastError();  // clear the sticky-until-read error so that later calls report their own
  throw Error(cuda_error_text(expression, code), file, line);
}

}  // namespace lockstep::comm::nccl
