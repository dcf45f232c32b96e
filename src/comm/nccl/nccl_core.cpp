#include "comm/nccl/nccl_core.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>

#include "comm/nccl/nccl_check.hpp"
#include "comm/nccl/nccl_compat.hpp"
#include "core/exception_text.hpp"
#include "lockstep/comm/communicator.hpp"
#include "lockstep/core/error.hpp"

namespace lockstep::comm::nccl {

namespace {

int mpi_rank_or(int fallback) {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized || finalized) return fallback;
  int rank = fallback;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

// Makes `device` current for the lifetime of the guard, restoring the caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device) {
    LOCKSTEP_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device_) LOCKSTEP_CUDA_CHECK(cudaSetDevice(device_));
  }
  // Only when it changed: setting device 0 back on a thread that never used it would make a context there.
  ~DeviceGuard() {
    if (previous_ != device_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_ = 0;
  int previous_ = 0;
};

}  // namespace

int cuda_device_count(const char* who) {
  int count = 0;
  const cudaError_t rc = cudaGetDeviceCount(&count);
  const int rank = mpi_rank_or(-1);
  const std::string where = rank >= 0 ? " on rank " + std::to_string(rank) : std::string();
  if (rc != cudaSuccess) {
    cudaGetLastError();
    LOCKSTEP_FAIL(who, " needs a CUDA device, but none is usable", where, ": cudaGetDeviceCount: ",
                  cudaGetErrorString(rc), " (", cudaGetErrorName(rc),
                  "). Use the MPI communicator (backend: mpi) on machines without a GPU.");
  }
  LOCKSTEP_CHECK(count > 0, who, " needs a CUDA device, but this host has none", where,
                 ". Use the MPI communicator (backend: mpi) on machines without a GPU.");
  return count;
}

// The Core whose watchdog runs on this thread, if any (Note [Abort off the waiting thread]).
static thread_local const Core* watchdog_of_this_thread = nullptr;

// Note [Nothing freed on the watchdog]: dropping the last reference to a CUDA tensor enters the
// caching allocator, which takes its mutex; a thread holding that mutex may be waiting on the GPU
// (freeing cached blocks synchronises events, cudaFree the device) behind a collective spinning on a
// dead peer, which only the watchdog's abort can end. So the watchdog releases no tensor and destroys
// no state (its events): a state completed or failed there keeps its tensors until a user thread
// drops it (CoreWork::wait, the graveyard drained by launch() and the destructor). PyTorch's c10d
// moved its watchdog's frees off that thread for the same reason.
struct Core::State {
  std::mutex mutex;
  WorkInfo info;
  bool host_result = false;
  bool recorded = false;  // the end event has been recorded (before that, cudaEventQuery means nothing)
  bool done = false;
  std::exception_ptr error;
  cudaEvent_t start = nullptr;
  cudaEvent_t end = nullptr;
  std::vector<at::Tensor> keep_alive;
  Clock::time_point issued{}, started{}, ended{};
  Clock::time_point deadline{};

  ~State() {
    if (start) cudaEventDestroy(start);
    if (end) cudaEventDestroy(end);
  }

  // Called with `mutex` held once the end event has completed.
  void complete() {
    done = true;
    ended = Clock::now();
    float ms = 0.0f;
    started = issued;
    if (cudaEventElapsedTime(&ms, start, end) == cudaSuccess) {
      const auto elapsed = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double, std::milli>(ms));
      started = std::max(issued, ended - elapsed);
    } else {
      cudaGetLastError();
    }
    release_tensors();
  }
  void fail(std::exception_ptr why) {
    if (done) return;
    done = true;
    error = std::move(why);
    ended = Clock::now();
    if (started == Clock::time_point{}) started = issued;
    release_tensors();
  }
  // Not on a watchdog (Note [Nothing freed on the watchdog]): there they stay until a user thread.
  void release_tensors() {
    if (watchdog_of_this_thread == nullptr) keep_alive.clear();
  }
  // With `mutex` held: the tensors to drop once it is released (none on a watchdog), so that a free
  // that waits for the allocator never holds the lock the watchdog's poll takes.
  std::vector<at::Tensor> take_tensors() {
    std::vector<at::Tensor> out;
    if (watchdog_of_this_thread == nullptr) out.swap(keep_alive);
    return out;
  }
};

// The Work a launch returns (Note [NCCL stream semantics], point 2).
class CoreWork final : public Work {
 public:
  CoreWork(std::shared_ptr<Core> core, std::shared_ptr<Core::State> state, std::chrono::milliseconds timeout)
      : Work(state->info, timeout), core_(std::move(core)), state_(std::move(state)) {}

  using Work::wait;
  void wait(std::chrono::milliseconds timeout) override {
    if (state_->host_result || core_->blocking_wait()) {
      host_wait(timeout);
      return;
    }
    std::vector<at::Tensor> released;  // declared before the lock: dropped after it is released
    std::lock_guard<std::mutex> lock(state_->mutex);
    if (state_->error) std::rethrow_exception(state_->error);
    if (state_->done) {
      released = state_->take_tensors();  // what the watchdog kept (Note [Nothing freed on the watchdog])
      return;
    }
    // On the communicator's device: the default stream is the null handle, which names the legacy
    // stream of whichever device is current on this thread (a thread of the program's own starts on 0).
    DeviceGuard guard(core_->device());
    cudaStream_t waiter = core_->current_stream_ ? core_->current_stream_() : nullptr;
    const cudaError_t rc = cudaStreamWaitEvent(waiter, state_->end, 0);
    if (rc != cudaSuccess) {
      cudaGetLastError();
      LOCKSTEP_FAIL(state_->info.describe(), ": the caller's stream cannot wait for its end: ",
                    cuda_error_text("cudaStreamWaitEvent", rc));
    }
  }

  bool is_completed() const override { return core_->poll(*state_); }

  Clock::time_point start_time() const override {
    std::lock_guard<std::mutex> lock(state_->mutex);
    return state_->done ? state_->started : state_->issued;
  }
  Clock::time_point end_time() const override {
    std::lock_guard<std::mutex> lock(state_->mutex);
    return state_->done ? state_->ended : state_->issued;
  }

 private:
  void host_wait(std::chrono::milliseconds timeout) {
    timeout = bounded_timeout(timeout);
    const Clock::time_point deadline = Clock::now() + timeout;
    auto pause = std::chrono::microseconds(0);
    while (!core_->poll(*state_)) {
      if (Clock::now() >= deadline) core_->fail_timed_out(*state_, timeout);
      if (pause.count() == 0) {
        std::this_thread::yield();
        pause = std::chrono::microseconds(1);
      } else {
        std::this_thread::sleep_for(pause);
        pause = std::min(pause * 2, std::chrono::microseconds(1000));
      }
    }
    std::vector<at::Tensor> released;  // declared before the lock: dropped after it is released
    std::lock_guard<std::mutex> lock(state_->mutex);
    if (state_->error) std::rethrow_exception(state_->error);
    released = state_->take_tensors();  // what the watchdog kept (Note [Nothing freed on the watchdog])
  }

  std::shared_ptr<Core> core_;
  std::shared_ptr<Core::State> state_;
};

Core::Core(CoreOptions options, CurrentStreamFn current_stream)
    : options_(options), current_stream_(std::move(current_stream)) {
  options_.timeout = options_.timeout.count() > 0 ? bounded_timeout(options_.timeout) : default_timeout();
  if (options_.watchdog_interval.count() <= 0) options_.watchdog_interval = std::chrono::milliseconds(5);
}

void check_device(int device) {
  const int devices = cuda_device_count("the NCCL communicator");
  LOCKSTEP_CHECK(device >= 0 && device < devices, "the NCCL communicator: CUDA device ", device,
                 " does not exist (this host has ", devices, " device(s)) on rank ", mpi_rank_or(-1));
}

std::shared_ptr<Core> Core::create(CoreOptions options, CurrentStreamFn current_stream) {
  // Checked before anything collective, so that a machine without a GPU gets a clear error.
  check_device(options.device);
  std::shared_ptr<Core> core(new Core(options, std::move(current_stream)));
  core->initialise();
  return core;
}

void Core::initialise() {
  int initialized = 0;
  MPI_Initialized(&initialized);
  LOCKSTEP_CHECK(initialized, "the NCCL communicator bootstraps over MPI: initialise MPI first (create a "
                              "lockstep::Runtime)");
  MPI_Comm bootstrap = options_.bootstrap == MPI_COMM_NULL ? MPI_COMM_WORLD : options_.bootstrap;
  LOCKSTEP_MPI_CHECK(MPI_Comm_rank(bootstrap, &rank_));
  LOCKSTEP_MPI_CHECK(MPI_Comm_size(bootstrap, &size_));

  // Rank 0's id reaches everyone even when rank 0 failed to make one: a zeroed id plus a flag, so that
  // every rank raises instead of some of them waiting in ncclCommInitRank.
  ncclUniqueId id;
  std::memset(&id, 0, sizeof id);
  int ok = 1;
  std::string why;
  if (rank_ == 0) {
    const ncclResult_t rc = ncclGetUniqueId(&id);
    if (rc != ncclSuccess) {
      ok = 0;
      why = nccl_error_text("ncclGetUniqueId", rc);
    }
  }
  LOCKSTEP_MPI_CHECK(MPI_Bcast(&ok, 1, MPI_INT, 0, bootstrap));
  LOCKSTEP_CHECK(ok, "the NCCL communicator could not be created: rank 0 failed to make a unique id",
                 why.empty() ? "" : ": " + why);
  LOCKSTEP_MPI_CHECK(MPI_Bcast(&id, static_cast<int>(sizeof id), MPI_BYTE, 0, bootstrap));

  DeviceGuard guard(options_.device);
  const ncclResult_t rc = ncclCommInitRank(&comm_, size_, id, rank_);
  if (rc != ncclSuccess) {
    LOCKSTEP_FAIL("the NCCL communicator could not be created on rank ", rank_, " of ", size_, " (CUDA device ",
                  options_.device, "): ", nccl_error_text("ncclCommInitRank", rc, comm_));
  }
  if (options_.stream != nullptr) {
    stream_ = options_.stream;
  } else {
    int least = 0, greatest = 0;
    LOCKSTEP_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    LOCKSTEP_CUDA_CHECK(cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking, greatest));
    owns_stream_ = true;
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    watchdog_running_ = true;
  }
  watchdog_ = std::thread([this] { watchdog_loop(); });
}

Core::~Core() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  stop_cv_.notify_all();
  if (watchdog_.joinable()) {
    // Bounded: the watchdog may be inside ncclCommAbort, which can block until the peers abort too
    // (18 s seen on an H200; NCCL issues 829 and 863 report longer). Joining a watchdog stuck there
    // would hang this rank, error handled or not: end the process instead, so the launcher ends the job.
    constexpr std::chrono::seconds kWatchdogExitLimit{120};
    bool exited = false;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      exited = watchdog_exited_cv_.wait_for(lock, kWatchdogExitLimit, [this] { return !watchdog_running_; });
    }
    if (!exited) {
      std::fprintf(stderr, "lockstep: rank %d: the NCCL communicator's watchdog did not stop within %lld s (inside "
                           "ncclCommAbort, waiting for peers that never abort); ending this process so that it does "
                           "not hang\n", rank_, static_cast<long long>(kWatchdogExitLimit.count()));
      std::fflush(stderr);
      std::_Exit(1);
    }
    watchdog_.join();
  }
  run_nccl_abort();  // an abort the watchdog was asked for but had not begun (no-op otherwise)
  // Let what is still running finish (bounded by the timeout) before the communicator goes away;
  // not while an exception unwinds this rank: its peers may never issue the collectives these wait
  // for, and waiting the whole timeout would only delay the job's end (Note [Failing fast]).
  const Clock::time_point deadline =
      std::uncaught_exceptions() > 0 ? Clock::now() : Clock::now() + options_.timeout;
  for (;;) {
    std::vector<std::shared_ptr<State>> pending;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      pending = pending_;
    }
    bool all_done = true;
    for (auto& state : pending) all_done = poll(*state) && all_done;
    // A peer that died shows here at once, not after the whole timeout (the watchdog has stopped).
    if (!all_done && !aborted_) check_async_error();
    if (all_done || aborted_) break;
    if (Clock::now() >= deadline) {
      std::fprintf(stderr, "lockstep: rank %d: NCCL communicator destroyed with collectives still running after %lld ms; "
                           "aborting it\n", rank_, static_cast<long long>(options_.timeout.count()));
      abort(std::make_exception_ptr(Error("NCCL communicator destroyed while collectives were running", __FILE__,
                                          __LINE__)));
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  if (!aborted_ && comm_ != nullptr) ncclCommDestroy(comm_);
  if (owns_stream_ && stream_ != nullptr) cudaStreamDestroy(stream_);
}

ncclComm_t Core::handle() const {
  if (aborted_) std::rethrow_exception(failure());
  return comm_;
}

std::exception_ptr Core::failure() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return failure_;
}

WorkPtr Core::launch(LaunchSpec spec) {
  LOCKSTEP_CHECK(static_cast<bool>(spec.issue), "NcclCore::launch: nothing to issue for ", spec.info.op);
  {
    // Note [Nothing freed on the watchdog]: what it set aside is released here, on this thread.
    std::vector<std::shared_ptr<State>> released;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      released.swap(graveyard_);
    }
    std::vector<at::Tensor> dropped;  // after the states' locks
    for (auto& state : released) {
      std::lock_guard<std::mutex> lock(state->mutex);
      if (!state->done) continue;  // never an in-flight collective's
      for (at::Tensor& t : state->take_tensors()) dropped.push_back(std::move(t));
    }
  }
  auto state = std::make_shared<State>();
  state->host_result = spec.host_result;
  state->keep_alive = std::move(spec.keep_alive);
  {
    // On the communicator's device: an event belongs to the device current when it is created, and
    // recording it on another device's stream fails (a thread of the program's own starts on device 0).
    DeviceGuard guard(options_.device);
    LOCKSTEP_CUDA_CHECK(cudaEventCreateWithFlags(&state->start, cudaEventDefault));
    LOCKSTEP_CUDA_CHECK(cudaEventCreateWithFlags(&state->end, cudaEventDefault));
  }

  std::lock_guard<std::mutex> issue_lock(launch_mutex_);
  if (aborted_) std::rethrow_exception(failure());
  spec.info.seq = next_seq_++;
  spec.info.rank = rank_;
  spec.info.size = size_;
  state->info = spec.info;
  state->issued = Clock::now();
  state->deadline = state->issued + options_.timeout;
  {
    // Registered before the NCCL call: an enqueue that blocks (a peer that never connects) is timed too.
    // Checked again under mutex_: an abort() since the check above (it takes mutex_, not launch_mutex_)
    // has failed what was pending, and a state pushed after it would never be failed.
    std::lock_guard<std::mutex> lock(mutex_);
    if (aborted_) std::rethrow_exception(failure_);
    pending_.push_back(state);
  }
  try {
    DeviceGuard guard(options_.device);
    // Note [NCCL stream semantics], point 1.
    cudaEvent_t produced = state->start;  // reused: recorded on the producer first, then on our stream
    LOCKSTEP_CUDA_CHECK(cudaEventRecord(produced, spec.producer));
    LOCKSTEP_CUDA_CHECK(cudaStreamWaitEvent(stream_, produced, 0));
    LOCKSTEP_CUDA_CHECK(cudaEventRecord(state->start, stream_));
    spec.issue(comm_, stream_);
    LOCKSTEP_CUDA_CHECK(cudaEventRecord(state->end, stream_));
  } catch (...) {
    // The other ranks may have issued their side of it: they would wait for this rank until the
    // timeout. Abort now, naming the collective, as a failure found later would. An enqueue that
    // failed because the watchdog aborted the communicator meanwhile (it blocked past the timeout)
    // reports that cause instead.
    if (aborted_) {
      std::exception_ptr cause = failure();
      {
        std::lock_guard<std::mutex> lock(state->mutex);
        state->fail(cause);
      }
      std::rethrow_exception(cause);
    }
    auto error = std::make_exception_ptr(Error(state->info.describe() + " could not be issued: " +
                                                   ::lockstep::detail::current_exception_text() +
                                                   "; the NCCL communicator was aborted",
                                               __FILE__, __LINE__));
    {
      std::lock_guard<std::mutex> lock(state->mutex);
      state->fail(error);
    }
    abort(error);
    std::rethrow_exception(error);
  }
  {
    std::lock_guard<std::mutex> lock(state->mutex);
    state->recorded = true;
  }
  return std::make_shared<CoreWork>(shared_from_this(), state, options_.timeout);
}

bool Core::poll(State& state) {
  {
    std::lock_guard<std::mutex> lock(state.mutex);
    if (state.done) return true;
    if (state.recorded) {
      const cudaError_t rc = cudaEventQuery(state.end);
      if (rc == cudaSuccess) {
        state.complete();
        return true;
      }
      if (rc != cudaErrorNotReady) {
        cudaGetLastError();
        const std::string text = state.info.describe() + " failed: " + cuda_error_text("cudaEventQuery", rc);
        state.fail(std::make_exception_ptr(Error(text, __FILE__, __LINE__)));
        // Fall through to abort below, without the state's lock.
      } else {
        return false;
      }
    } else {
      return false;
    }
  }
  std::exception_ptr error;
  {
    std::lock_guard<std::mutex> lock(state.mutex);
    error = state.error;
  }
  abort(error);
  return true;
}

void Core::check_async_error() {
  if (aborted_ || comm_ == nullptr) return;
  ncclResult_t async = ncclSuccess;
  const ncclResult_t rc = ncclCommGetAsyncError(comm_, &async);
  if (rc == ncclSuccess && (async == ncclSuccess || compat::is_in_progress(async))) return;
  const ncclResult_t code = rc != ncclSuccess ? rc : async;
  std::string pending_text;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& state : pending_) {
      std::lock_guard<std::mutex> state_lock(state->mutex);
      if (!state->done) {
        pending_text = " while " + state->info.describe() + " was pending";
        break;
      }
    }
  }
  abort(std::make_exception_ptr(Error(detail::str_cat("NCCL reported an asynchronous error on rank ", rank_, pending_text,
                                                      ": ", nccl_error_text("ncclCommGetAsyncError", code, comm_),
                                                      "; the communicator was aborted"),
                                      __FILE__, __LINE__)));
}

void Core::fail_timed_out(State& state, std::chrono::milliseconds timeout) {
  const std::string text = detail::str_cat(
      state.info.describe(), " did not complete within ", timeout.count(),
      " ms; the NCCL communicator was aborted (a peer may have died, or ranks issued different collectives; set "
      "LOCKSTEP_TIMEOUT_S to change the limit)");
  auto error = std::make_exception_ptr(TimeoutError(text, __FILE__, __LINE__));
  {
    std::lock_guard<std::mutex> lock(state.mutex);
    // A last look: it may have completed since it was polled, and aborting then would end a
    // communicator whose work all finished. The caller polls again and finds it done.
    if (!state.done && state.recorded) {
      const cudaError_t rc = cudaEventQuery(state.end);
      if (rc == cudaSuccess) {
        state.complete();
      } else if (rc != cudaErrorNotReady) {
        cudaGetLastError();
      }
    }
    if (state.done) return;
    state.fail(error);
  }
  abort(error);
  std::rethrow_exception(error);
}

void Core::abort(std::exception_ptr error) {
  std::vector<std::shared_ptr<State>> pending;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (aborted_) return;
    failure_ = error ? error
                     : std::make_exception_ptr(Error(detail::str_cat("the NCCL communicator on rank ", rank_,
                                                                     " was aborted"),
                                                     __FILE__, __LINE__));
    aborted_ = true;
    pending.swap(pending_);
  }
  std::string cause = "an earlier failure";
  try {
    std::rethrow_exception(failure_);
  } catch (const std::exception& e) {
    cause = e.what();
  } catch (...) {
  }
  std::vector<at::Tensor> dropped;  // declared before the loop's locks: dropped at the end, unlocked
  for (auto& state : pending) {
    std::lock_guard<std::mutex> lock(state->mutex);
    if (state->done) {
      // One the watchdog completed and kept (nothing is taken on the watchdog itself).
      for (at::Tensor& t : state->take_tensors()) dropped.push_back(std::move(t));
      continue;
    }
    state->fail(std::make_exception_ptr(
        Error(state->info.describe() + " failed: the NCCL communicator was aborted because: " + cause, __FILE__,
              __LINE__)));
  }
  if (watchdog_of_this_thread != nullptr) {  // Note [Nothing freed on the watchdog]
    std::lock_guard<std::mutex> lock(mutex_);
    graveyard_.insert(graveyard_.end(), pending.begin(), pending.end());
  }
  // Every Work has its error now; ncclCommAbort (which makes kernels spinning on a missing peer return,
  // so the streams drain) runs on the watchdog (Note [Abort off the waiting thread]), inline only on the
  // watchdog itself or once it has stopped (the destructor).
  bool inline_abort = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    nccl_abort_requested_ = true;
    inline_abort = stop_ || !watchdog_running_ || watchdog_of_this_thread == this;
  }
  if (inline_abort) {
    run_nccl_abort();
  } else {
    stop_cv_.notify_all();
  }
}

void Core::run_nccl_abort() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!nccl_abort_requested_ || nccl_aborted_) return;
    nccl_aborted_ = true;
  }
  if (comm_ == nullptr) return;
  const ncclResult_t rc = ncclCommAbort(comm_);
  if (rc != ncclSuccess) {
    std::fprintf(stderr, "lockstep: rank %d: ncclCommAbort failed: %s\n", rank_, ncclGetErrorString(rc));
  }
}

void Core::watchdog_loop() {
  watchdog_of_this_thread = this;
  cudaSetDevice(options_.device);
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stop_) {
    stop_cv_.wait_for(lock, options_.watchdog_interval, [this] { return stop_ || nccl_abort_requested_; });
    if (nccl_abort_requested_) {
      // Nothing is left to watch once the communicator is aborted; only the abort itself.
      lock.unlock();
      run_nccl_abort();
      lock.lock();
      break;
    }
    if (stop_) break;
    std::vector<std::shared_ptr<State>> pending = pending_;
    lock.unlock();
    check_async_error();
    const Clock::time_point now = Clock::now();
    for (auto& state : pending) {
      if (aborted_) break;
      if (poll(*state)) continue;
      if (now >= state->deadline) {
        try {
          fail_timed_out(*state, options_.timeout);
        } catch (...) {
          // The error now belongs to the Work and the communicator; wait() raises it.
        }
      }
    }
    lock.lock();
    // Done states leave the list, for a user thread to release (Note [Nothing freed on the watchdog]).
    std::vector<std::shared_ptr<State>> still;
    for (auto& state : pending_) {
      std::lock_guard<std::mutex> state_lock(state->mutex);
      if (!state->done) {
        still.push_back(state);
      } else {
        graveyard_.push_back(state);
      }
    }
    pending_.swap(still);
    still.clear();  // the done states, now in the graveyard too: not the last reference
    // This loop's copies: one that a user thread's abort() took out of pending_ meanwhile may be
    // the last reference (its Work dropped): the graveyard keeps it for a user thread to drop.
    for (auto& state : pending) {
      std::lock_guard<std::mutex> state_lock(state->mutex);
      // Once: those still in pending_ a moment ago were put there just above.
      if (state->done && std::find(graveyard_.begin(), graveyard_.end(), state) == graveyard_.end()) {
        graveyard_.push_back(std::move(state));
      }
    }
    pending.clear();  // not done: still in pending_ as well
  }
  watchdog_running_ = false;  // under the lock: from here on abort() runs ncclCommAbort itself
  watchdog_exited_cv_.notify_all();
}

}  // namespace lockstep::comm::nccl
