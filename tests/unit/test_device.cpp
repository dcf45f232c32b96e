// Device names and the NCCL entry points every build has (their answers depend on the build and the
// machine, so each case states what it expects where).
#include <catch2/catch.hpp>
#include <torch/torch.h>

#include "lockstep/comm/nccl_communicator.hpp"
#include "lockstep/core/device.hpp"
#include "lockstep/core/error.hpp"

using Catch::Matchers::Contains;

TEST_CASE("resolve_device names devices and refuses what is not there", "[device]") {
  CHECK(lockstep::resolve_device("cpu").is_cpu());
  CHECK_THROWS_WITH(lockstep::resolve_device("tpu", "trainer.device"),
                    Contains("trainer.device") && Contains("expected auto, cpu, cuda or cuda:N"));
  CHECK_THROWS_WITH(lockstep::resolve_device("meta"), Contains("expected auto, cpu, cuda or cuda:N"));
  if (!torch::cuda::is_available()) {
    CHECK(lockstep::resolve_device("auto").is_cpu());
    CHECK_THROWS_WITH(lockstep::resolve_device("cuda", "trainer.device"),
                      Contains("trainer.device") && Contains("CUDA is not usable"));
    CHECK_THROWS_WITH(lockstep::resolve_device("cuda:0"), Contains("CUDA is not usable"));
    CHECK(lockstep::cuda_device_count() == 0);
  } else {
    CHECK(lockstep::resolve_device("auto").is_cuda());
    CHECK(lockstep::resolve_device("cuda:0") == c10::Device("cuda:0"));
    CHECK_THROWS_WITH(lockstep::resolve_device("cuda:" + std::to_string(lockstep::cuda_device_count())),
                      Contains("CUDA device(s) are visible"));
  }
}

TEST_CASE("a build without the NCCL communicator says so instead of failing obscurely", "[device][nccl]") {
  CHECK_FALSE(lockstep::comm::nccl_build_info().empty());
  if (lockstep::comm::nccl_available()) {
    WARN("this build has the NCCL communicator (" << lockstep::comm::nccl_build_info()
                                                  << "); its tests are labelled gpu");
    return;
  }
  CHECK_THROWS_WITH(lockstep::comm::make_nccl_communicator(), Contains("not part of this build") &&
                                                                  Contains("backend \"mpi\""));
  CHECK_THROWS_AS(lockstep::comm::make_nccl_communicator(), lockstep::Error);
}
