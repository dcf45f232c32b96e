#include "lockstep/runtime.hpp"

#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <malloc.h>
#include <mpi.h>
#include <sched.h>
#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "core/backend_choice.hpp"
#include "lockstep/comm/agree.hpp"
#include "lockstep/comm/mpi_communicator.hpp"
#include "lockstep/comm/nccl_communicator.hpp"
#include "lockstep/core/device.hpp"
#include "lockstep/core/error.hpp"

namespace lockstep {

namespace detail {

bool settle_backend(const std::vector<BackendChoice>& choices, std::string* reason_for_mpi) {
  std::vector<int> nccl, mpi, asked_nccl;
  for (int r = 0; r < static_cast<int>(choices.size()); ++r) {
    (choices[r].nccl ? nccl : mpi).push_back(r);
    if (choices[r].nccl && choices[r].asked) asked_nccl.push_back(r);
  }
  if (mpi.empty()) return true;
  if (nccl.empty()) return false;
  LOCKSTEP_CHECK(asked_nccl.empty(), "runtime: backend \"nccl\" was asked for on ", comm::rank_list(asked_nccl),
                 ", but MPI is used on ", comm::rank_list(mpi),
                 " (no usable GPU there, ranks sharing a GPU, a build without NCCL, or another "
                 "runtime.backend); one communicator spans every rank, so all must use the same backend. Ask for "
                 "\"mpi\" (it takes CUDA tensors too) or \"auto\", or give every rank a GPU of its own");
  if (reason_for_mpi != nullptr) {
    *reason_for_mpi = comm::rank_list(mpi) + " cannot use NCCL (or asked for MPI), and every rank must use the same backend";
  }
  return false;
}

int default_threads(const std::vector<std::vector<int>>& cpus, int local_rank, double cpu_limit, int quota_sharing) {
  const std::vector<int>& mine = cpus.at(static_cast<std::size_t>(local_rank));
  const std::set<int> own(mine.begin(), mine.end());
  int sharing = 0;  // the ranks whose CPUs overlap this rank's, itself included
  for (const auto& theirs : cpus) {
    if (std::any_of(theirs.begin(), theirs.end(), [&own](int cpu) { return own.count(cpu) != 0; })) ++sharing;
  }
  const int threads = std::max(1, static_cast<int>(own.size()) / std::max(1, sharing));
  if (cpu_limit <= 0.0) return threads;
  // Note [CPU quota]
  const int quota = std::max(1, static_cast<int>(std::ceil(cpu_limit - 1e-9)));
  return std::min(threads, std::max(1, quota / std::max(1, quota_sharing)));
}

namespace {

// The first line of `path`, or "" when it cannot be read.
std::string first_line(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  if (!in || !std::getline(in, line)) return {};
  return line;
}

// A limit in CPUs from a quota and a period (microseconds), 0 for none or nonsense.
double quota_over_period(const std::string& quota, const std::string& period) {
  char* end = nullptr;
  const double q = std::strtod(quota.c_str(), &end);
  if (quota.empty() || end == quota.c_str()) return 0.0;  // "max", or nothing
  const double p = std::strtod(period.c_str(), &end);
  if (period.empty() || end == period.c_str()) return 0.0;
  return q > 0.0 && p > 0.0 ? q / p : 0.0;
}

// The directory's identity (device and inode), "" when it cannot be read.
std::string identity_of(const std::string& dir) {
  struct stat info {};
  if (::stat(dir.c_str(), &info) != 0) return {};
  return std::to_string(static_cast<unsigned long long>(info.st_dev)) + ":" +
         std::to_string(static_cast<unsigned long long>(info.st_ino));
}

// Adds every limit that `read(dir)` finds from `mount` + `path` up to `mount` to `limits`.
template <typename Read>
void limits_along(const std::string& mount, std::string path, const Read& read, std::vector<CpuLimit>* limits) {
  while (true) {
    const std::string dir = mount + path;
    const double limit = read(dir);
    if (limit > 0.0) limits->push_back({limit, identity_of(dir)});
    if (path.empty() || path == "/") break;
    const std::size_t slash = path.find_last_of('/');
    path = slash == std::string::npos ? std::string() : path.substr(0, slash);
  }
}

}  // namespace

std::vector<CpuLimit> cgroup_cpu_limits(const std::string& root) {
  // Note [CPU quota]
  std::ifstream cgroups(root + "/proc/self/cgroup");
  std::vector<CpuLimit> limits;
  std::string line;
  while (std::getline(cgroups, line)) {
    // "hierarchy-id:controllers:path"; cgroup v2's line is "0::path".
    const std::size_t first = line.find(':');
    const std::size_t second = first == std::string::npos ? std::string::npos : line.find(':', first + 1);
    if (second == std::string::npos) continue;
    const std::string controllers = line.substr(first + 1, second - first - 1);
    const std::string path = line.substr(second + 1);
    if (controllers.empty()) {
      limits_along(root + "/sys/fs/cgroup", path, [](const std::string& dir) {
        std::istringstream fields(first_line(dir + "/cpu.max"));  // "max 100000" or "150000 100000"
        std::string quota, period;
        fields >> quota >> period;
        return quota_over_period(quota, period);
      }, &limits);
      continue;
    }
    std::istringstream names(controllers);
    std::string name;
    bool cpu = false;
    while (std::getline(names, name, ',')) cpu = cpu || name == "cpu";
    if (!cpu) continue;
    for (const char* mount : {"/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpuacct,cpu"}) {
      limits_along(root + mount, path, [](const std::string& dir) {
        return quota_over_period(first_line(dir + "/cpu.cfs_quota_us"), first_line(dir + "/cpu.cfs_period_us"));
      }, &limits);
    }
  }
  // One entry per cgroup (cpu and cpu,cpuacct may be one mount under two names).
  std::vector<CpuLimit> unique;
  for (const CpuLimit& limit : limits) {
    const bool seen = std::any_of(unique.begin(), unique.end(), [&limit](const CpuLimit& u) {
      return !limit.cgroup.empty() && u.cgroup == limit.cgroup;
    });
    if (!seen) unique.push_back(limit);
  }
  return unique;
}

int threads_under_quotas(const std::vector<std::vector<int>>& cpus, int local_rank, const std::vector<CpuLimit>& limits,
                         const std::vector<std::vector<std::string>>& cgroups) {
  int threads = default_threads(cpus, local_rank);
  for (const CpuLimit& limit : limits) {
    int sharing = 0;
    for (const auto& theirs : cgroups) {
      if (!limit.cgroup.empty() && std::find(theirs.begin(), theirs.end(), limit.cgroup) != theirs.end()) ++sharing;
    }
    threads = std::min(threads, default_threads(cpus, local_rank, limit.cpus, std::max(1, sharing)));
  }
  return threads;
}

CpuLimit cgroup_cpu_limit(const std::string& root) {
  CpuLimit smallest;
  for (const CpuLimit& limit : cgroup_cpu_limits(root)) {
    if (smallest.cpus == 0.0 || limit.cpus < smallest.cpus) smallest = limit;
  }
  return smallest;
}

int host_gpu_count(const std::vector<std::string>& bus_ids, int visible_devices) {
  const bool known = !bus_ids.empty() && std::none_of(bus_ids.begin(), bus_ids.end(),
                                                      [](const std::string& id) { return id.empty(); });
  if (!known) return visible_devices;
  return static_cast<int>(std::set<std::string>(bus_ids.begin(), bus_ids.end()).size());
}

}  // namespace detail

namespace {

// Collective over `comm`: every rank's `text`, by rank (raw MPI: for before a communicator exists).
std::vector<std::string> mpi_allgather_strings(MPI_Comm comm, const std::string& text) {
  int size = 1;
  LOCKSTEP_MPI_CHECK(MPI_Comm_size(comm, &size));
  const int length = static_cast<int>(text.size());
  std::vector<int> lengths(static_cast<std::size_t>(size)), offsets(static_cast<std::size_t>(size));
  LOCKSTEP_MPI_CHECK(MPI_Allgather(&length, 1, MPI_INT, lengths.data(), 1, MPI_INT, comm));
  int total = 0;
  for (int r = 0; r < size; ++r) {
    offsets[static_cast<std::size_t>(r)] = total;
    total += lengths[static_cast<std::size_t>(r)];
  }
  std::vector<char> all(static_cast<std::size_t>(std::max(total, 1)));
  LOCKSTEP_MPI_CHECK(MPI_Allgatherv(text.data(), length, MPI_CHAR, all.data(), lengths.data(), offsets.data(),
                                    MPI_CHAR, comm));
  std::vector<std::string> out;
  for (int r = 0; r < size; ++r) {
    const char* start = all.data() + offsets[static_cast<std::size_t>(r)];
    out.emplace_back(start, start + lengths[static_cast<std::size_t>(r)]);
  }
  return out;
}

// Collective over MPI_COMM_WORLD: the strings of the ranks on this host (those sharing its memory),
// indexed by local rank. Note [GPUs of their own].
std::vector<std::string> gather_on_host(const std::string& mine, int world_rank) {
  MPI_Comm local = MPI_COMM_NULL;
  LOCKSTEP_MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, world_rank, MPI_INFO_NULL, &local));
  struct Free {
    MPI_Comm& comm;
    ~Free() { MPI_Comm_free(&comm); }
  } free_local{local};
  return mpi_allgather_strings(local, mine);
}

// Note [BLAS threads]: at::set_num_threads sizes LibTorch's own pools, but not an OpenBLAS that LibTorch
// reaches as the system's libblas.so.3 (Debian's package): that one starts a thread per core in every
// rank, so N ranks on N cores run N x N BLAS threads and Linear layers (and PowerSGD's matmuls) crawl.
// The Runtime sets OpenBLAS to the same thread count, unless OPENBLAS_NUM_THREADS says otherwise. Found
// with dlsym, so there is no link dependency: without OpenBLAS this does nothing. Returns whether it did.
bool set_openblas_threads(int threads) {
  if (std::getenv("OPENBLAS_NUM_THREADS") != nullptr) return false;
  using SetThreads = void (*)(int);
  auto set = reinterpret_cast<SetThreads>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
  if (set == nullptr) return false;
  set(threads);
  return true;
}

std::atomic<int> g_rank{-1};
// MPI that detail::start_mpi_and_gather started and no Runtime has adopted yet.
bool g_started_mpi = false;
std::atomic<int> g_size{0};
std::terminate_handler g_previous_terminate = nullptr;

bool mpi_active() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  return initialized && !finalized;
}

// Note [Failing fast]: one rank's uncaught exception must not leave the others blocked in a
// collective forever. std::terminate runs without unwinding when nothing catches the exception,
// so this handler prints what went wrong, where, and ends every rank of the job with MPI_Abort.
[[noreturn]] void terminate_job() {
  std::string what = "std::terminate was called without an active exception";
  if (std::exception_ptr error = std::current_exception()) {
    try {
      std::rethrow_exception(error);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
      what = "an exception that is not a std::exception";
    }
  }
  std::fprintf(stderr, "lockstep: rank %d of %d: uncaught exception: %s\n", g_rank.load(), g_size.load(),
               what.c_str());
  std::fprintf(stderr, "lockstep: rank %d: aborting the whole job so that the other ranks do not wait forever\n",
               g_rank.load());
  std::fflush(stderr);
  if (mpi_active()) MPI_Abort(MPI_COMM_WORLD, 1);
  std::abort();
}

// Note [Threads from the CPUs a rank may use]: whether the OpenMP runtime binds its threads (and so
// the main thread) to places, which makes the main thread's affinity one place's.
bool openmp_binds_threads() {
  const char* bind = std::getenv("OMP_PROC_BIND");
  if (bind != nullptr) {
    const std::string value(bind);
    if (value != "false" && value != "FALSE" && value != "False") return true;
  }
  for (const char* name : {"OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY"}) {
    if (std::getenv(name) != nullptr) return true;
  }
  return false;
}

bool env_flag_off(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr) return false;
  const std::string text(value);
  return text == "0" || text == "off" || text == "OFF" || text == "false" || text == "no";
}

}  // namespace

void tune_malloc() {
  if (env_flag_off("LOCKSTEP_TUNE_MALLOC")) return;
  // Note [Allocator]: keep freed blocks up to 1 GiB in the heap instead of unmapping them: every
  // ResNet step and every large MPI_Allreduce otherwise maps and page-faults fresh memory
  // (docs/performance.md). One arena: a thread's own arena grows in 64 MiB heaps, so any larger
  // block that the communicator's progress thread asks for (OpenMPI's temporary all-reduce buffer)
  // would be mmapped afresh on every call whatever the thresholds; measured 5x slower at 64 MiB.
  constexpr int kThreshold = 1 << 30;
  mallopt(M_MMAP_THRESHOLD, kThreshold);
  mallopt(M_TRIM_THRESHOLD, kThreshold);
  mallopt(M_ARENA_MAX, 1);
}

Runtime::Runtime(int& argc, char**& argv, RuntimeOptions options) : options_(std::move(options)) {
  if (options_.tune_malloc) tune_malloc();

  int initialized = 0;
  MPI_Initialized(&initialized);
  int provided = MPI_THREAD_SINGLE;
  if (!initialized) {
    LOCKSTEP_MPI_CHECK(MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided));
    owns_mpi_ = true;
  } else {
    LOCKSTEP_MPI_CHECK(MPI_Query_thread(&provided));
  }
  if (provided != MPI_THREAD_MULTIPLE) {
    std::fprintf(stderr,
                 "lockstep: this MPI provides thread level %d, but Lockstep's communicator runs MPI on a "
                 "background thread and needs MPI_THREAD_MULTIPLE (%d)\n",
                 provided, MPI_THREAD_MULTIPLE);
    MPI_Abort(MPI_COMM_WORLD, 1);
  }

  LOCKSTEP_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &world_.rank));
  LOCKSTEP_MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &world_.size));
  MPI_Comm local = MPI_COMM_NULL;
  LOCKSTEP_MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, world_.rank, MPI_INFO_NULL, &local));
  LOCKSTEP_MPI_CHECK(MPI_Comm_rank(local, &world_.local_rank));
  LOCKSTEP_MPI_CHECK(MPI_Comm_size(local, &world_.local_size));
  // Note [Threads from the CPUs a rank may use] (core/backend_choice.hpp): every rank takes part,
  // whatever its own RuntimeOptions::threads.
  const int host_threads = [&] {
    cpu_set_t mine;
    CPU_ZERO(&mine);
    // OpenMP told to bind (LibTorch's libgomp) pins this main thread to one place when the library
    // loads, before any of this: its mask says 1 CPU. Then, and where the kernel's mask outgrows a
    // cpu_set_t, count the host's CPUs as every rank's.
    if (openmp_binds_threads() || sched_getaffinity(0, sizeof(mine), &mine) != 0) {
      CPU_ZERO(&mine);
      const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
      for (int cpu = 0; cpu < std::min(cores, CPU_SETSIZE); ++cpu) CPU_SET(cpu, &mine);
    }
    std::vector<cpu_set_t> all(static_cast<std::size_t>(world_.local_size));
    LOCKSTEP_MPI_CHECK(MPI_Allgather(&mine, sizeof(cpu_set_t), MPI_BYTE, all.data(), sizeof(cpu_set_t), MPI_BYTE, local));
    std::vector<std::vector<int>> cpus(all.size());
    for (std::size_t r = 0; r < all.size(); ++r) {
      for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
        if (CPU_ISSET(cpu, &all[r])) cpus[r].push_back(cpu);
      }
    }
    // Note [CPU quota]: each limit along the rank's cgroups is shared by the host's ranks under that
    // cgroup (a job's over all of them, a task's over one); the tightest share decides.
    const std::vector<detail::CpuLimit> limits = detail::cgroup_cpu_limits();
    std::string my_limits;
    for (const auto& limit : limits) my_limits += limit.cgroup + "\n";
    std::vector<std::vector<std::string>> cgroups;
    for (const std::string& theirs : mpi_allgather_strings(local, my_limits)) {
      std::istringstream lines(theirs);
      cgroups.emplace_back();
      for (std::string id; std::getline(lines, id);) cgroups.back().push_back(id);
    }
    return detail::threads_under_quotas(cpus, world_.local_rank, limits, cgroups);
  }();
  MPI_Comm_free(&local);
  char host[MPI_MAX_PROCESSOR_NAME] = {0};
  int length = 0;
  LOCKSTEP_MPI_CHECK(MPI_Get_processor_name(host, &length));
  world_.host.assign(host, static_cast<std::size_t>(length));

  g_rank = world_.rank;
  g_size = world_.size;
  g_previous_terminate = std::set_terminate(terminate_job);

  LOCKSTEP_CHECK(options_.backend == "auto" || options_.backend == "mpi" || options_.backend == "nccl",
                 "RuntimeOptions::backend must be \"auto\", \"mpi\" or \"nccl\", found \"", options_.backend, "\"");
  LOCKSTEP_CHECK(options_.device == "auto" || options_.device == "cpu" || options_.device == "cuda",
                 "RuntimeOptions::device must be \"auto\", \"cpu\" or \"cuda\", found \"", options_.device, "\"");
  // A rank whose choice fails (nccl asked for on a host without a GPU) still takes part in the
  // all-gather below, so that the others raise at once too instead of waiting there for it.
  std::exception_ptr failed_here;
  try {
    select_device_and_backend();
  } catch (...) {
    if (world_.size == 1) throw;
    failed_here = std::current_exception();
  }
  if (world_.size > 1) {  // Note [One backend for all ranks]
    constexpr int kFailed = 4;
    const int mine = failed_here ? kFailed : (backend_ == "nccl" ? 1 : 0) | (options_.backend != "auto" ? 2 : 0);
    std::vector<int> all(static_cast<std::size_t>(world_.size));
    LOCKSTEP_MPI_CHECK(MPI_Allgather(&mine, 1, MPI_INT, all.data(), 1, MPI_INT, MPI_COMM_WORLD));
    if (failed_here) std::rethrow_exception(failed_here);
    std::vector<int> failed;
    for (int r = 0; r < world_.size; ++r) {
      if (all[static_cast<std::size_t>(r)] == kFailed) failed.push_back(r);
    }
    LOCKSTEP_CHECK(failed.empty(), "runtime: ", comm::rank_list(failed),
                   " could not choose a device and backend (the error there says why), so no communicator can "
                   "span the job (rank ", world_.rank, ")");
    std::vector<detail::BackendChoice> choices;
    for (int code : all) choices.push_back({(code & 1) != 0, (code & 2) != 0});
    std::string reason;
    if (!detail::settle_backend(choices, &reason) && backend_ == "nccl") {
      backend_ = "mpi";
      backend_reason_ = reason;
    }
  }
  const int threads = options_.threads > 0 ? options_.threads : host_threads;
  at::set_num_threads(threads);
  set_openblas_threads(threads);  // Note [BLAS threads]
  // Adopted last: should this constructor throw, the destructor does not run, and the exit handler
  // of program_config's start finalizes it instead.
  if (g_started_mpi) {  // program_config's agreement started it for this Runtime
    owns_mpi_ = true;
    g_started_mpi = false;
  }
}

Runtime::~Runtime() {
  if (std::uncaught_exceptions() > 0 && world_.size > 1 && mpi_active()) {
    // Unwinding past the Runtime with an exception in flight: this rank is leaving, the others
    // may be waiting in a collective (Note [Failing fast]). Before the communicator goes: its
    // destructor waits up to the whole timeout for a collective still in flight (one whose wait()
    // timed out, say), and that wait would only delay the abort.
    std::fprintf(stderr, "lockstep: rank %d: leaving with an exception in flight; aborting the job\n",
                 world_.rank);
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  communicator_.reset();
  std::set_terminate(g_previous_terminate);
  if (owns_mpi_ && mpi_active()) MPI_Finalize();
}

namespace detail {

Gathered start_mpi_and_gather(const std::string& text) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    int provided = MPI_THREAD_SINGLE;
    LOCKSTEP_MPI_CHECK(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &provided));
    g_started_mpi = true;
    // A program that makes no Runtime afterwards still leaves MPI as it should.
    std::atexit([] {
      if (g_started_mpi && mpi_active()) MPI_Finalize();
    });
  }
  Gathered out;
  LOCKSTEP_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &out.rank));
  out.texts = mpi_allgather_strings(MPI_COMM_WORLD, text);
  return out;
}

void end_started_mpi() {
  if (!g_started_mpi || !mpi_active()) return;
  MPI_Barrier(MPI_COMM_WORLD);  // rank 0's message is out before any rank leaves
  MPI_Finalize();
  g_started_mpi = false;
}

}  // namespace detail

void Runtime::select_device_and_backend() {
  // Note [Device and backend choice]: the same decision on every rank of a host (it depends only on the
  // host's GPUs and ranks), and NCCL only where each rank gets a GPU of its own: NCCL refuses two ranks
  // on one GPU, while MPI with staged CUDA tensors serves such set-ups. Whether they do is judged from
  // the host ranks' GPU bus ids (Note [GPUs of their own], core/backend_choice.hpp).
  const int devices = cuda_device_count();
  std::exception_ptr failed;
  try {
    if (options_.device == "cuda") {
      LOCKSTEP_CHECK(devices > 0, "runtime device \"cuda\" asked for, but CUDA is not usable on rank ", world_.rank,
                     " (host ", world_.host, "): a CPU-only LibTorch, no GPU, or no driver");
    }
    if (options_.device != "cpu" && devices > 0) {
      world_.device = c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(world_.local_rank % devices));
      set_current_cuda_device(world_.device);
    }
  } catch (...) {
    failed = std::current_exception();
  }
  // Note [GPUs of their own]: every rank of the host takes part, a failing one or one on the CPU too.
  const std::string bus_id = !failed && world_.device.is_cuda() ? comm::cuda_pci_bus_id(world_.device.index()) : "";
  const std::vector<std::string> host_gpus =
      world_.size > 1 ? gather_on_host(bus_id, world_.rank) : std::vector<std::string>{bus_id};
  if (failed) std::rethrow_exception(failed);
  const int gpus = detail::host_gpu_count(host_gpus, devices);
  const bool own_gpu = world_.device.is_cuda() && world_.local_size <= gpus;
  if (options_.backend == "mpi") {
    backend_ = "mpi";
    backend_reason_ = "asked for";
  } else if (options_.backend == "nccl") {
    LOCKSTEP_CHECK(world_.device.is_cuda(), "backend \"nccl\" needs a GPU, but rank ", world_.rank, " runs on ",
                   world_.device, " (runtime device \"", options_.device, "\", ", devices, " CUDA device(s))");
    // Here, not at communicator(): the Runtime would otherwise report a backend it cannot make.
    LOCKSTEP_CHECK(comm::nccl_available(), "backend \"nccl\" asked for, but this build has no NCCL communicator (",
                   comm::nccl_build_info(), "): rebuild with NCCL found, or use backend \"mpi\" or \"auto\"");
    // The same outcome on every rank of the host (host_gpus is the host's): an error here, rather than
    // NCCL's "invalid usage" (or a hang, by version) inside ncclCommInitRank.
    LOCKSTEP_CHECK(own_gpu, "backend \"nccl\" needs one GPU per rank, but ", world_.local_size, " ranks share ", gpus,
                   " GPU(s) on host ", world_.host, " (NCCL refuses two ranks on one GPU): start at most ", gpus,
                   " rank(s) per host, or use backend \"mpi\" (or \"auto\", which picks it here) for CUDA tensors "
                   "staged through host memory");
    backend_ = "nccl";
    backend_reason_ = "asked for";
  } else if (!world_.device.is_cuda()) {
    backend_ = "mpi";
    backend_reason_ = devices > 0 ? "runtime device is cpu" : "no usable GPU";
  } else if (!comm::nccl_available()) {
    backend_ = "mpi";
    backend_reason_ = "this build has no NCCL communicator (" + comm::nccl_build_info() + ")";
  } else if (!own_gpu) {
    backend_ = "mpi";
    backend_reason_ = std::to_string(world_.local_size) + " ranks share " + std::to_string(gpus) + " GPU(s) on host " +
                      world_.host + "; NCCL needs one GPU per rank";
  } else {
    backend_ = "nccl";
    backend_reason_ = "one GPU per rank";
  }
}

comm::CommunicatorPtr Runtime::communicator() {
  if (!communicator_) {
    if (backend_ == "nccl") {
      comm::NcclCommunicatorOptions nccl_options;
      nccl_options.device = world_.device.index();
      nccl_options.timeout = options_.timeout;
      communicator_ = comm::make_nccl_communicator(nccl_options);
    } else {
      comm::MpiCommunicatorOptions mpi_options;
      mpi_options.timeout = options_.timeout;
      communicator_ = std::make_shared<comm::MpiCommunicator>(mpi_options);
    }
  }
  return communicator_;
}

}  // namespace lockstep
