#pragma once
// Note [One backend for all ranks]: the device and backend are chosen per rank from its host's GPUs
// and ranks (Note [Device and backend choice]), so two hosts can choose differently: a node whose
// driver is broken (no GPU: MPI), one with fewer GPUs than ranks. Ranks on NCCL and ranks on MPI build
// different communicators over MPI_COMM_WORLD (the NCCL ones broadcast an ncclUniqueId where the MPI
// ones duplicate the communicator) and the job would hang inside communicator creation, where no
// timeout runs. So the choices are all-gathered (one int per rank) and settled here: NCCL only when
// every rank chose it; ranks that chose it by `auto` otherwise use MPI too (it takes CUDA tensors,
// staged); a rank that asked for NCCL by name while another uses MPI is an error on every rank.

#include <string>
#include <vector>

namespace lockstep::detail {

struct BackendChoice {
  bool nccl = false;   // this rank's own choice
  bool asked = false;  // RuntimeOptions::backend named it ("mpi" or "nccl"), rather than "auto"
};

// The one backend every rank uses: true for NCCL. Throws lockstep::Error (the same text on every
// rank) when a rank asked for NCCL by name and another rank uses MPI. `reason_for_mpi` (if given)
// receives, when NCCL was chosen by some ranks but not all, a reason naming the ranks that use MPI.
bool settle_backend(const std::vector<BackendChoice>& choices, std::string* reason_for_mpi = nullptr);

// Note [GPUs of their own]: how many distinct GPUs the ranks of one host use, given each rank's GPU
// PCI bus id ("" for a rank without one, or where this build cannot tell). By bus id when every rank
// has one: ranks that each see a single GPU through their own CUDA_VISIBLE_DEVICES (SLURM's
// --gpus-per-task, a launcher that pins GPUs) all use "device 0", which counting visible devices would
// take for one GPU shared. Otherwise the visible device count. NCCL needs one per rank.
int host_gpu_count(const std::vector<std::string>& bus_ids, int visible_devices);

// Note [Threads from the CPUs a rank may use]: RuntimeOptions::threads = 0 gives each rank the CPUs
// it may run on (its affinity: a batch system's cpuset, mpirun's binding, taskset), shared among the
// host's ranks whose CPUs overlap its own; at least 1. Counting the host's cores instead gave a rank
// that SLURM confined to 8 of 128 cores 128 threads, and each of two ranks bound to a core of its own
// (plain mpirun -np 2 binds) threads for both cores. `cpus` holds each local rank's CPU numbers, by
// local rank.
// `cpu_limit` > 0 is a cgroup CPU quota over this rank (cgroup_cpu_limit()), shared by `quota_sharing`
// of the host's ranks (those under the same limiting cgroup): the rank then runs at most its share of
// the quota's ceiling (at least 1), whatever its affinity says. A container started with `--cpus=4` on a
// 64-core host gives its 4 ranks 1 thread each, not 16 that the kernel would throttle in turn, and
// ranks bound to a socket each inside it share the quota as well as the unbound do.
int default_threads(const std::vector<std::vector<int>>& cpus, int local_rank, double cpu_limit = 0.0,
                    int quota_sharing = 1);

// Note [CPU quota]: the CPU bandwidth limits over this process, in CPUs: cgroup v2's `cpu.max` and
// v1's `cpu.cfs_quota_us` / `cpu.cfs_period_us` (the cpu controller at /sys/fs/cgroup/cpu or
// cpu,cpuacct), read from the process's cgroup (/proc/self/cgroup) up to the hierarchy's root: every
// level that sets one (a job's cgroup over a task's), deepest first, each cgroup once. A cgroup
// directory that is not there is passed over, so that a container whose /proc/self/cgroup names its
// path on the host while its own cgroup is mounted at the root still finds the limit. `cgroup` names
// the directory that sets the limit by device and inode, the same for every process under it whatever
// cgroup namespace each sees it through: the Runtime counts the host's ranks under each level and
// shares that level's limit among them. Empty where there is none ("max", -1) or nothing can be read.
// `root` is prefixed to every path (tests give a directory made to look like /proc and /sys).
struct CpuLimit {
  double cpus = 0.0;
  std::string cgroup;
};
std::vector<CpuLimit> cgroup_cpu_limits(const std::string& root = "");
// The smallest of them ({0, ""} for none).
CpuLimit cgroup_cpu_limit(const std::string& root = "");
// The Runtime's default: default_threads() capped by each of this rank's `limits` (cgroup_cpu_limits()),
// shared among the host's ranks under that level's cgroup: those whose `cgroups` (each local rank's
// limits' identities, by local rank) hold it. A job's cgroup of 4 CPUs over 4 ranks, each in a task
// cgroup of 2, gives 1 each; two ranks bound to a socket each inside one container share its quota.
int threads_under_quotas(const std::vector<std::vector<int>>& cpus, int local_rank, const std::vector<CpuLimit>& limits,
                         const std::vector<std::vector<std::string>>& cgroups);

}  // namespace lockstep::detail
