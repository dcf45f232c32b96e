#pragma once
// Input checks shared by every backend: wrong input raises a clear error before anything is sent.

#include <ATen/core/Tensor.h>

#include <initializer_list>

#include "lockstep/comm/communicator.hpp"

namespace lockstep::comm::detail {

// Defined, contiguous, of a supported dtype, on one of the `accepted` kinds of device. Both
// communicators take CPU and CUDA tensors (each stages the kind it does not run on natively).
// Every message ends with " (rank N)": a wrong input is often one rank's alone.
void check_tensor(const at::Tensor& tensor, const char* op, const char* what, int rank,
                  std::initializer_list<c10::DeviceType> accepted = {c10::DeviceType::CPU, c10::DeviceType::CUDA});
// Same dtype and shape (out-of-place allreduce).
void check_same(const at::Tensor& input, const at::Tensor& output, const char* op, int rank);
// `whole` holds exactly `size` times `part`'s elements, of the same dtype.
void check_gather_sizes(const at::Tensor& part, const at::Tensor& whole, int size, int rank, const char* op);
// Average needs floating point (an integer average would silently truncate).
void check_reduce_op(c10::ScalarType type, ReduceOp op, const char* name, int rank);
// "float32", "bfloat16", "int64", ... (the names users know from PyTorch).
const char* dtype_name(c10::ScalarType type);
bool overlaps(const at::Tensor& a, const at::Tensor& b);
// Is `part` exactly slice `rank` of `whole` (same storage, right offset)?
bool is_rank_slice(const at::Tensor& part, const at::Tensor& whole, int rank);

}  // namespace lockstep::comm::detail
