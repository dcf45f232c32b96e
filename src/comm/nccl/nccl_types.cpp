#include "comm/nccl/nccl_types.hpp"

#include "comm/nccl/nccl_compat.hpp"
#include "comm/validate.hpp"
#include "lockstep/core/error.hpp"

namespace lockstep::comm::nccl {

ncclDataType_t nccl_dtype(c10::ScalarType type, const char* op) {
  switch (type) {
    case c10::ScalarType::Float: return ncclFloat32;
    case c10::ScalarType::Double: return ncclFloat64;
    case c10::ScalarType::Half: return ncclFloat16;
    case c10::ScalarType::Char: return ncclInt8;
    case c10::ScalarType::Byte: return ncclUint8;
    case c10::ScalarType::Int: return ncclInt32;
    case c10::ScalarType::Long: return ncclInt64;
    case c10::ScalarType::BFloat16:
      LOCKSTEP_CHECK(compat::kHasBfloat16, op, ": bfloat16 needs NCCL >= 2.10; this build uses NCCL ", NCCL_MAJOR, ".",
                     NCCL_MINOR, ".", NCCL_PATCH, " (cast to float32, or use a newer NCCL)");
      return compat::kBfloat16;
    default:
      LOCKSTEP_FAIL(op, ": the NCCL communicator does not support dtype ", c10::toString(type),
                    " (float32, float64, float16, bfloat16, int8, uint8, int32, int64 are)");
  }
}

NcclReduction nccl_reduction(ReduceOp op, c10::ScalarType type, const char* name, int rank) {
  detail::check_reduce_op(type, op, name, rank);
  switch (op) {
    case ReduceOp::Sum: return {ncclSum, false};
    case ReduceOp::Product: return {ncclProd, false};
    case ReduceOp::Min: return {ncclMin, false};
    case ReduceOp::Max: return {ncclMax, false};
    case ReduceOp::Average:
      if (compat::kHasAvg) return {compat::kAvg, false};
      return {ncclSum, true};
  }
  LOCKSTEP_FAIL(name, ": unknown reduction operation ", static_cast<int>(op));
}

const char* nccl_dtype_name(ncclDataType_t type) {
  switch (type) {
    case ncclInt8: return "ncclInt8";
    case ncclUint8: return "ncclUint8";
    case ncclInt32: return "ncclInt32";
    case ncclUint32: return "ncclUint32";
    case ncclInt64: return "ncclInt64";
    case ncclUint64: return "ncclUint64";
    case ncclFloat16: return "ncclFloat16";
    case ncclFloat32: return "ncclFloat32";
    case ncclFloat64: return "ncclFloat64";
    default: return type == compat::kBfloat16 && compat::kHasBfloat16 ? "ncclBfloat16" : "ncclDataType?";
  }
}

}  // namespace lockstep::comm::nccl
