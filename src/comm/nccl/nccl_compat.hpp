#pragma once
// Note [NCCL versions]: every difference between NCCL releases that Lockstep cares about lives here,
// decided once from NCCL_VERSION_CODE; the rest of the backend asks these constants and functions and
// never tests a version itself.

#include <nccl.h>

#ifndef NCCL_VERSION_CODE
#define NCCL_VERSION_CODE (NCCL_MAJOR * 1000 + NCCL_MINOR * 100 + NCCL_PATCH)
#endif
#ifndef NCCL_VERSION
#define NCCL_VERSION(X, Y, Z) (((X) <= 2 && (Y) <= 8) ? (X) * 1000 + (Y) * 100 + (Z) : (X) * 10000 + (Y) * 100 + (Z))
#endif

namespace lockstep::comm::nccl::compat {

// ncclBfloat16 and ncclAvg arrived in NCCL 2.10.
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 10, 0)
inline constexpr bool kHasBfloat16 = true;
inline constexpr bool kHasAvg = true;
inline constexpr ncclDataType_t kBfloat16 = ncclBfloat16;
inline constexpr ncclRedOp_t kAvg = ncclAvg;
#else
inline constexpr bool kHasBfloat16 = false;
inline constexpr bool kHasAvg = false;
inline constexpr ncclDataType_t kBfloat16 = ncclNumTypes;  // never used: kHasBfloat16 is false
inline constexpr ncclRedOp_t kAvg = ncclSum;               // never used: kHasAvg is false
#endif

// ncclCommAbort and ncclCommGetAsyncError exist since NCCL 2.4, which is older than anything a
// CUDA 11+ LibTorch ships with; Lockstep requires them.
static_assert(NCCL_VERSION_CODE >= NCCL_VERSION(2, 4, 0), "Lockstep's NCCL backend needs NCCL >= 2.4");

// The library's own description of the last failure (NCCL >= 2.13): far more useful than the
// generic error string ("Duplicate GPU detected : rank 1 and rank 0 both on CUDA device ...").
inline const char* last_error(ncclComm_t comm) {
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 13, 0)
  return ncclGetLastError(comm);
#else
  (void)comm;
  return "";
#endif
}

// ncclInProgress (non-blocking communicators, NCCL >= 2.14) is not a failure when polling.
inline bool is_in_progress(ncclResult_t result) {
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 14, 0)
  return result == ncclInProgress;
#else
  (void)result;
  return false;
#endif
}

// Runtime version as "2.28.9" (ncclGetVersion reports the loaded library, which may differ from the
// header the backend was compiled against).
inline int runtime_version_code() {
  int version = 0;
  if (ncclGetVersion(&version) != ncclSuccess) return 0;
  return version;
}

}  // namespace lockstep::comm::nccl::compat
