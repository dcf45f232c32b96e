#include "comm/validate.hpp"

#include <ATen/ATen.h>

#include "lockstep/core/error.hpp"

namespace lockstep::comm::detail {

namespace {
bool supported(c10::ScalarType type) {
  switch (type) {
    case at::kFloat: case at::kDouble: case at::kHalf: case at::kBFloat16:
    case at::kInt: case at::kLong: case at::kChar: case at::kByte:
      return true;
    default:
      return false;
  }
}
}  // namespace

void check_tensor(const at::Tensor& tensor, const char* op, const char* what, int rank,
                  std::initializer_list<c10::DeviceType> accepted) {
  LOCKSTEP_CHECK(tensor.defined(), op, ": the ", what, " tensor is undefined (rank ", rank, ")");
  bool ok = false;
  std::string names;
  for (c10::DeviceType kind : accepted) {
    ok = ok || tensor.device().type() == kind;
    names += (names.empty() ? "" : " or ") + c10::DeviceTypeName(kind, /*lower_case=*/true);
  }
  if (!ok) {
    LOCKSTEP_FAIL(op, ": the ", what, " tensor is on ", tensor.device(), " but this communicator takes ", names,
                  " tensors; copy it to one of those first (rank ", rank, ")");
  }
  LOCKSTEP_CHECK(tensor.is_contiguous(), op, ": the ", what, " tensor must be contiguous (sizes ", tensor.sizes(),
                 ", strides ", tensor.strides(), "); call .contiguous() first (rank ", rank, ")");
  LOCKSTEP_CHECK(supported(tensor.scalar_type()), op, ": dtype ", tensor.scalar_type(), " of the ", what,
                 " tensor is not supported (float32, float64, float16, bfloat16, int8, uint8, int32, int64 are; rank ",
                 rank, ")");
}

void check_same(const at::Tensor& input, const at::Tensor& output, const char* op, int rank) {
  LOCKSTEP_CHECK(input.scalar_type() == output.scalar_type(), op, ": input dtype ", input.scalar_type(),
                 " differs from output dtype ", output.scalar_type(), " (rank ", rank, ")");
  LOCKSTEP_CHECK(input.sizes() == output.sizes(), op, ": input sizes ", input.sizes(), " differ from output sizes ",
                 output.sizes(), " (rank ", rank, ")");
}

void check_gather_sizes(const at::Tensor& part, const at::Tensor& whole, int size, int rank, const char* op) {
  LOCKSTEP_CHECK(part.scalar_type() == whole.scalar_type(), op, ": dtypes differ (", part.scalar_type(), " vs ",
                 whole.scalar_type(), "; rank ", rank, ")");
  LOCKSTEP_CHECK(whole.numel() == part.numel() * size, op, ": expected ", size, " x ", part.numel(), " = ",
                 part.numel() * size, " elements in the gathered tensor on rank ", rank, ", found ", whole.numel());
}

void check_reduce_op(c10::ScalarType type, ReduceOp op, const char* name, int rank) {
  LOCKSTEP_CHECK(op != ReduceOp::Average || c10::isFloatingType(type), name,
                 ": average is defined for floating-point tensors only, found ", type,
                 " (use sum and divide if truncation is what you want; rank ", rank, ")");
}

const char* dtype_name(c10::ScalarType type) {
  switch (type) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    default: return c10::toString(type);
  }
}

bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  if (a.nbytes() == 0 || b.nbytes() == 0) return false;
  const char* a0 = static_cast<const char*>(a.data_ptr());
  const char* b0 = static_cast<const char*>(b.data_ptr());
  return a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

bool is_rank_slice(const at::Tensor& part, const at::Tensor& whole, int rank) {
  if (part.numel() == 0) return false;
  const char* p = static_cast<const char*>(part.data_ptr());
  const char* w = static_cast<const char*>(whole.data_ptr());
  return p == w + static_cast<std::ptrdiff_t>(rank) * static_cast<std::ptrdiff_t>(part.nbytes());
}

}  // namespace lockstep::comm::detail
