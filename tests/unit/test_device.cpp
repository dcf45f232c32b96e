// Device names and the NCCL entry points every build has (their answers depend on the build and the
// machine, so each case states what it expects where).
#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "core/backend_choice.hpp"
#include "lockstep/comm/nccl_communicator.hpp"
#include "lockstep/core/device.hpp"
#include "lockstep/core/error.hpp"
#include "support/temp_dir.hpp"

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

TEST_CASE("GPUs of their own are told apart by PCI bus id, else counted (Note [GPUs of their own])", "[device]") {
  using lockstep::detail::host_gpu_count;
  // 4 ranks, each seeing one GPU of its own as device 0 (CUDA_VISIBLE_DEVICES per rank): 4 GPUs.
  CHECK(host_gpu_count({"0000:1b:00.0", "0000:3b:00.0", "0000:5e:00.0", "0000:86:00.0"}, 1) == 4);
  // Two ranks given the same GPU: 1, whatever each sees.
  CHECK(host_gpu_count({"0000:1b:00.0", "0000:1b:00.0"}, 1) == 1);
  // 4 ranks over 2 visible GPUs (local_rank % 2): 2.
  CHECK(host_gpu_count({"0000:1b:00.0", "0000:3b:00.0", "0000:1b:00.0", "0000:3b:00.0"}, 2) == 2);
  // A rank without an id (no GPU, or a build that cannot tell): the visible devices are counted.
  CHECK(host_gpu_count({"0000:1b:00.0", ""}, 8) == 8);
  CHECK(host_gpu_count({"", ""}, 1) == 1);
  CHECK(host_gpu_count({}, 0) == 0);
  // This build: a real id only with the NCCL communicator and a GPU.
  if (!lockstep::comm::nccl_available()) CHECK(lockstep::comm::cuda_pci_bus_id(0).empty());
}

TEST_CASE("default threads: a rank's CPUs shared among the host's ranks that may use them (Note [Threads from "
          "the CPUs a rank may use])",
          "[device]") {
  using lockstep::detail::default_threads;
  CHECK(default_threads({{0, 1, 2, 3, 4, 5, 6, 7}}, 0) == 8);  // alone
  CHECK(default_threads({{0}}, 0) == 1);                       // taskset -c 0: not the host's cores
  CHECK(default_threads({{0, 1}, {0, 1}}, 1) == 1);             // unbound on 2 cores: one each
  CHECK(default_threads({{0, 1}, {0, 1}, {0, 1}}, 2) == 1);     // more ranks than CPUs: still 1
  CHECK(default_threads({{0}, {1}}, 0) == 1);                   // bound to a core each
  CHECK(default_threads({{0, 1, 2, 3}, {4, 5, 6, 7}}, 1) == 4);  // a socket each: not 8 / 2 shared
  // Two ranks share a socket, a third has the other one.
  const std::vector<std::vector<int>> mixed = {{0, 1, 2, 3}, {0, 1, 2, 3}, {4, 5, 6, 7}};
  CHECK(default_threads(mixed, 0) == 2);
  CHECK(default_threads(mixed, 2) == 4);
  CHECK(default_threads({{0, 1, 2, 3, 4, 5, 6, 7}, {0}}, 0) == 4);  // an unbound rank beside a bound one
  CHECK(default_threads({{}, {0}}, 0) == 1);                         // no CPU known: at least 1
}

TEST_CASE("default threads under a cgroup CPU quota (Note [CPU quota])", "[device]") {
  using lockstep::detail::default_threads;
  const std::vector<int> eight = {0, 1, 2, 3, 4, 5, 6, 7};
  CHECK(default_threads({eight}, 0, 2.0) == 2);                       // docker --cpus=2 on 8 cores
  CHECK(default_threads({eight, eight}, 1, 2.0, 2) == 1);             // two ranks in that container
  CHECK(default_threads({eight}, 0, 1.5) == 2);                       // a fraction of a CPU counts as one
  CHECK(default_threads({eight}, 0, 0.25) == 1);                      // at least 1
  CHECK(default_threads({eight}, 0, 16.0) == 8);                      // a quota above the CPUs changes nothing
  CHECK(default_threads({{0, 1, 2, 3}, {4, 5, 6, 7}}, 0, 4.0, 2) == 2);  // a socket each, one quota: shared
  CHECK(default_threads({{0, 1, 2, 3}, {4, 5, 6, 7}}, 0, 4.0, 1) == 4);  // a socket and a quota each
  CHECK(default_threads({eight, eight, eight}, 2, 2.0, 3) == 1);      // more ranks than the quota: still 1
  CHECK(default_threads({eight}, 0, 0.0) == 8);                       // no quota

  // The Runtime's rule over every level: each shared by the ranks under its cgroup.
  using lockstep::detail::CpuLimit;
  using lockstep::detail::threads_under_quotas;
  const std::vector<std::vector<int>> four_unbound(4, eight);
  const CpuLimit job{4.0, "job"};
  const std::vector<std::vector<std::string>> tasks = {{"t0", "job"}, {"t1", "job"}, {"t2", "job"}, {"t3", "job"}};
  // A job's cgroup of 4 CPUs over 4 ranks, each in a task cgroup of 2: 1 each, not 2.
  CHECK(threads_under_quotas(four_unbound, 1, {{2.0, "t1"}, job}, tasks) == 1);
  // Ranks bound to a socket each inside one container share its quota: 2 each, not 4.
  const std::vector<std::vector<int>> sockets = {{0, 1, 2, 3}, {4, 5, 6, 7}};
  CHECK(threads_under_quotas(sockets, 0, {{4.0, "box"}}, {{"box"}, {"box"}}) == 2);
  // Each in a container of its own with 4 CPUs: 4 each.
  CHECK(threads_under_quotas(sockets, 0, {{4.0, "a"}}, {{"a"}, {"b"}}) == 4);
  // No quota: the affinity rule alone.
  CHECK(threads_under_quotas(sockets, 1, {}, {{}, {}}) == 4);
  CHECK(threads_under_quotas(four_unbound, 0, {}, {{}, {}, {}, {}}) == 2);

  using lockstep::detail::cgroup_cpu_limit;
  lockstep::testing::TempDir root("lockstep_cgroup");
  auto write = [&root](const std::string& path, const std::string& text) {
    std::filesystem::create_directories(std::filesystem::path(root / path).parent_path());
    std::ofstream(root / path) << text;
  };
  CHECK(cgroup_cpu_limit(root.path().string()).cpus == 0.0);  // nothing to read
  CHECK(cgroup_cpu_limit(root.path().string()).cgroup.empty());
  SECTION("cgroup v2: the smallest cpu.max from the process's cgroup up") {
    write("proc/self/cgroup", "0::/user.slice/job\n");
    write("sys/fs/cgroup/user.slice/job/cpu.max", "max 100000\n");
    CHECK(cgroup_cpu_limit(root.path().string()).cpus == 0.0);
    write("sys/fs/cgroup/user.slice/cpu.max", "250000 100000\n");
    CHECK(cgroup_cpu_limit(root.path().string()).cpus == 2.5);
    // Named by the directory that sets it, as every process under it sees it.
    struct stat dir {};
    REQUIRE(::stat((root / "sys/fs/cgroup/user.slice").c_str(), &dir) == 0);
    CHECK(cgroup_cpu_limit(root.path().string()).cgroup ==
          std::to_string(static_cast<unsigned long long>(dir.st_dev)) + ":" +
              std::to_string(static_cast<unsigned long long>(dir.st_ino)));
    write("sys/fs/cgroup/user.slice/job/cpu.max", "50000 100000\n");
    CHECK(cgroup_cpu_limit(root.path().string()).cpus == 0.5);
    // Every level that sets a limit, deepest first: the Runtime shares each among the ranks under it.
    const auto levels = lockstep::detail::cgroup_cpu_limits(root.path().string());
    REQUIRE(levels.size() == 2);
    CHECK(levels[0].cpus == 0.5);
    CHECK(levels[1].cpus == 2.5);
    CHECK(levels[0].cgroup != levels[1].cgroup);
    write("sys/fs/cgroup/user.slice/job/cpu.max", "garbage\n");
    CHECK(cgroup_cpu_limit(root.path().string()).cpus == 2.5);
  }
  SECTION("cgroup v2 in a container: the namespace's root holds the limit") {
    write("proc/self/cgroup", "0::/\n");
    write("sys/fs/cgroup/cpu.max", "200000 100000\n");
    CHECK(cgroup_cpu_limit(root.path().string()).cpus == 2.0);
  }
  SECTION("cgroup v1: cfs quota over period, the host's path missing in a container") {
    write("proc/self/cgroup", "12:pids:/docker/abc\n5:cpu,cpuacct:/docker/abc\n0::/\n");
    write("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "-1\n");
    write("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n");
    CHECK(cgroup_cpu_limit(root.path().string()).cpus == 0.0);
    write("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "300000\n");
    CHECK(cgroup_cpu_limit(root.path().string()).cpus == 3.0);
  }
  SECTION("cgroup v1: only the cpu controller's line counts") {
    write("proc/self/cgroup", "4:cpuacct:/b\n3:cpu:/a\n");
    write("sys/fs/cgroup/cpu/a/cpu.cfs_quota_us", "100000\n");
    write("sys/fs/cgroup/cpu/a/cpu.cfs_period_us", "100000\n");
    write("sys/fs/cgroup/cpu/b/cpu.cfs_quota_us", "10000\n");  // named by the cpuacct line only: ignored
    write("sys/fs/cgroup/cpu/b/cpu.cfs_period_us", "100000\n");
    CHECK(cgroup_cpu_limit(root.path().string()).cpus == 1.0);
  }
}

TEST_CASE("one backend for all ranks: NCCL only where every rank chose it (Note [One backend for all ranks])",
          "[device]") {
  using lockstep::detail::BackendChoice;
  using lockstep::detail::settle_backend;
  const BackendChoice auto_nccl{true, false}, auto_mpi{false, false}, asked_nccl{true, true}, asked_mpi{false, true};
  std::string reason;
  CHECK(settle_backend({auto_nccl, auto_nccl, asked_nccl}, &reason));
  CHECK(reason.empty());
  CHECK_FALSE(settle_backend({auto_mpi, asked_mpi}, &reason));
  CHECK(reason.empty());
  // A host without a usable GPU (rank 2) takes the NCCL ranks of the other hosts to MPI with it.
  CHECK_FALSE(settle_backend({auto_nccl, auto_nccl, auto_mpi, auto_mpi}, &reason));
  CHECK_THAT(reason, Contains("ranks 2, 3 cannot use NCCL"));
  CHECK_FALSE(settle_backend({auto_nccl, asked_mpi}, &reason));
  CHECK_THAT(reason, Contains("rank 1 cannot use NCCL"));
  // Asked for by name, NCCL is never silently dropped.
  CHECK_THROWS_WITH(settle_backend({asked_nccl, asked_nccl, auto_mpi}),
                    Contains("backend \"nccl\" was asked for on ranks 0, 1, but MPI is used on rank 2") &&
                        Contains("all must use the same backend"));
  CHECK_THROWS_WITH(settle_backend({auto_nccl, asked_nccl, asked_mpi}),
                    Contains("asked for on rank 1, but MPI is used on rank 2"));
}
