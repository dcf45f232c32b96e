#pragma once
// Mapping of Lockstep's dtypes and reduction operations onto NCCL's (Note [NCCL versions] decides
// what this NCCL offers).

#include <c10/core/ScalarType.h>
#include <nccl.h>

#include "lockstep/comm/communicator.hpp"

namespace lockstep::comm::nccl {

// float32/64, float16, bfloat16 (NCCL >= 2.10), int8, uint8, int32, int64; anything else throws,
// naming the dtype and the operation.
ncclDataType_t nccl_dtype(c10::ScalarType type, const char* op);

struct NcclReduction {
  ncclRedOp_t op = ncclSum;
  // Average without ncclAvg: the collective sums and the caller divides by the world size afterwards.
  bool divide_after = false;
};
// The NCCL operation that carries `op` on `type` (Average only on floating types: see
// detail::check_reduce_op).
NcclReduction nccl_reduction(ReduceOp op, c10::ScalarType type, const char* name, int rank);

const char* nccl_dtype_name(ncclDataType_t type);

}  // namespace lockstep::comm::nccl
