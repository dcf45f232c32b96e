// The CUDA/NCCL-only part of the NCCL backend (src/comm/nccl/), built wherever CUDA and NCCL are
// installed: dtype and operation mapping, error texts, and a clear error where no GPU is usable.
// What needs a GPU is in tests/gpu/ (label gpu).
#include <catch2/catch.hpp>
#include <torch/torch.h>

#include "comm/nccl/nccl_check.hpp"
#include "comm/nccl/nccl_compat.hpp"
#include "comm/nccl/nccl_core.hpp"
#include "comm/nccl/nccl_types.hpp"
#include "lockstep/core/error.hpp"

using namespace lockstep::comm;
using Catch::Matchers::Contains;

TEST_CASE("dtypes map onto NCCL's, and the rest are refused by name", "[nccl]") {
  CHECK(nccl::nccl_dtype(at::kFloat, "allreduce") == ncclFloat32);
  CHECK(nccl::nccl_dtype(at::kDouble, "allreduce") == ncclFloat64);
  CHECK(nccl::nccl_dtype(at::kHalf, "allreduce") == ncclFloat16);
  CHECK(nccl::nccl_dtype(at::kChar, "allreduce") == ncclInt8);
  CHECK(nccl::nccl_dtype(at::kByte, "allreduce") == ncclUint8);
  CHECK(nccl::nccl_dtype(at::kInt, "allreduce") == ncclInt32);
  CHECK(nccl::nccl_dtype(at::kLong, "allreduce") == ncclInt64);
  if (nccl::compat::kHasBfloat16) {
    CHECK(std::string(nccl::nccl_dtype_name(nccl::nccl_dtype(at::kBFloat16, "allreduce"))) == "ncclBfloat16");
  } else {
    CHECK_THROWS_WITH(nccl::nccl_dtype(at::kBFloat16, "allreduce"), Contains("bfloat16 needs NCCL >= 2.10"));
  }
  CHECK_THROWS_WITH(nccl::nccl_dtype(at::kBool, "broadcast"),
                    Contains("broadcast") && Contains("does not support dtype Bool"));
  CHECK_THROWS_WITH(nccl::nccl_dtype(at::kComplexFloat, "allgather"), Contains("ComplexFloat"));
}

TEST_CASE("reduction operations map onto NCCL's, average only for floating point", "[nccl]") {
  CHECK(nccl::nccl_reduction(ReduceOp::Sum, at::kFloat, "allreduce", 0).op == ncclSum);
  CHECK(nccl::nccl_reduction(ReduceOp::Product, at::kInt, "allreduce", 0).op == ncclProd);
  CHECK(nccl::nccl_reduction(ReduceOp::Min, at::kHalf, "allreduce", 0).op == ncclMin);
  CHECK(nccl::nccl_reduction(ReduceOp::Max, at::kLong, "allreduce", 0).op == ncclMax);
  const nccl::NcclReduction average = nccl::nccl_reduction(ReduceOp::Average, at::kBFloat16, "reduce_scatter", 0);
  if (nccl::compat::kHasAvg) {
    CHECK(average.op == nccl::compat::kAvg);
    CHECK_FALSE(average.divide_after);
  } else {
    CHECK(average.op == ncclSum);
    CHECK(average.divide_after);
  }
  CHECK_THROWS_WITH(nccl::nccl_reduction(ReduceOp::Average, at::kInt, "reduce_scatter", 0),
                    Contains("reduce_scatter") && Contains("average is defined for floating-point tensors only") &&
                        Contains("rank 0)"));
}

TEST_CASE("NCCL and CUDA return codes become errors with the libraries' own text", "[nccl]") {
  // ncclGetUniqueId works without a GPU; a null argument is refused.
  try {
    LOCKSTEP_NCCL_CHECK(ncclGetUniqueId(nullptr));
    FAIL("no error raised");
  } catch (const lockstep::Error& e) {
    CHECK_THAT(e.message(), Contains("ncclGetUniqueId(nullptr)") && Contains(ncclGetErrorString(ncclInvalidArgument)));
    CHECK_THAT(std::string(e.what()), Contains("test_nccl_core.cpp"));
  }
  CHECK_THROWS_WITH([] { LOCKSTEP_CUDA_CHECK(cudaErrorInvalidValue); }(),
                    Contains("cudaErrorInvalidValue") && Contains(cudaGetErrorString(cudaErrorInvalidValue)));
  CHECK_NOTHROW([] { LOCKSTEP_NCCL_CHECK(ncclSuccess); }());
  CHECK(nccl::compat::runtime_version_code() >= NCCL_VERSION(2, 4, 0));
}

TEST_CASE("without a usable GPU the NCCL core refuses clearly instead of crashing", "[nccl]") {
  int count = 0;
  if (cudaGetDeviceCount(&count) == cudaSuccess && count > 0) {
    cudaGetLastError();
    WARN("this machine has " << count << " CUDA device(s); the no-GPU path is not exercised here");
    CHECK_THROWS_WITH(nccl::Core::create(nccl::CoreOptions{count}, nullptr), Contains("does not exist"));
    return;
  }
  cudaGetLastError();
  CHECK_THROWS_WITH(nccl::cuda_device_count("the NCCL communicator"),
                    Contains("the NCCL communicator needs a CUDA device") && Contains("backend: mpi"));
  nccl::CoreOptions options;
  options.device = 0;
  CHECK_THROWS_AS(nccl::Core::create(options, nullptr), lockstep::Error);
  CHECK_THROWS_WITH(nccl::Core::create(options, nullptr), Contains("needs a CUDA device"));
}
