#pragma once
// NcclCore: the part of the NCCL communicator that needs only the CUDA runtime, NCCL and MPI (no
// CUDA-enabled LibTorch), so that it compiles and links wherever CUDA and NCCL are installed.
//
// It owns one ncclComm_t (its unique id broadcast over MPI from rank 0), the communication stream and
// a watchdog thread. Callers (torch_cuda/nccl_communicator.cpp) describe each collective as a
// LaunchSpec; launch() orders it after the producer stream, issues it, and returns a Work.
//
// Note [NCCL stream semantics]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~
//   1. The communication stream first waits, through an event, for the work already queued on the
//      producer stream (the caller's current stream): no host synchronisation.
//   2. Work::wait() makes the waiting thread's current stream wait for the collective's end event and
//      returns at once; the host blocks only when the result is read by the host (barrier) or with
//      blocking_wait. (CPU tensors do not come here: Note [CPU tensors through NCCL].)
//   3. Tensors stay referenced by the Work's state until the end event has completed, and the caller
//      also marks them used on the communication stream (recordStream), so the caching allocator
//      never hands their memory out while the collective may still touch it.
//
// Note [NCCL watchdog]
// ~~~~~~~~~~~~~~~~~~~~
// NCCL reports failures asynchronously (ncclCommGetAsyncError) and a collective whose peer never
// shows up spins forever on the GPU. The watchdog polls both every few milliseconds. When a
// collective outlives its timeout, or NCCL reports an error, the communicator is aborted
// (ncclCommAbort makes the spinning kernels return), every pending Work fails with an error naming the
// operation, its sequence number and the rank, and every later call on the communicator raises it
// again: the program gets an exception instead of a hang.

#include <ATen/core/Tensor.h>
#include <cuda_runtime_api.h>
#include <mpi.h>
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "lockstep/comm/work.hpp"

namespace lockstep::comm::nccl {

struct CoreOptions {
  int device = 0;                        // CUDA device index
  std::chrono::milliseconds timeout{0};  // per collective; 0 = comm::default_timeout()
  bool blocking_wait = false;            // wait() blocks the host until the collective is done
  std::chrono::milliseconds watchdog_interval{5};
  cudaStream_t stream = nullptr;  // the communication stream; nullptr = the core creates its own
  MPI_Comm bootstrap = MPI_COMM_NULL;  // where the unique id travels; MPI_COMM_NULL = MPI_COMM_WORLD
};

// The waiting thread's current stream (LibTorch's current CUDA stream), asked by Work::wait().
using CurrentStreamFn = std::function<cudaStream_t()>;

struct LaunchSpec {
  WorkInfo info;                    // op, numel, bytes, dtype; seq, rank and size are filled in
  cudaStream_t producer = nullptr;  // the stream the inputs were written on
  // Enqueues the NCCL call(s) (and anything else) on the communication stream.
  std::function<void(ncclComm_t, cudaStream_t)> issue;
  std::vector<at::Tensor> keep_alive;  // Note [NCCL stream semantics], point 3
  bool host_result = false;            // the host reads the result: wait() blocks until done
};

// The number of CUDA devices; throws a clear lockstep::Error (naming `who`, the rank when MPI is up,
// and CUDA's reason) when there are none or the driver is unusable.
int cuda_device_count(const char* who);
// Throws a clear lockstep::Error when `device` is not one of this host's CUDA devices.
void check_device(int device);

class Core : public std::enable_shared_from_this<Core> {
 public:
  // Collective over the bootstrap communicator: every rank must call it.
  static std::shared_ptr<Core> create(CoreOptions options, CurrentStreamFn current_stream);
  ~Core();
  Core(const Core&) = delete;
  Core& operator=(const Core&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  int device() const { return options_.device; }
  std::chrono::milliseconds timeout() const { return options_.timeout; }
  bool blocking_wait() const { return options_.blocking_wait; }
  cudaStream_t stream() const { return stream_; }
  // The raw communicator, for baselines that bypass Lockstep's bookkeeping; throws after an abort.
  ncclComm_t handle() const;

  // Issues one collective (Note [NCCL stream semantics]); thread-safe, issue order = sequence order.
  WorkPtr launch(LaunchSpec spec);

  // Aborts the communicator: pending Works fail with `error` (or a note pointing at it), later calls
  // rethrow it. Idempotent; the first cause wins.
  void abort(std::exception_ptr error);
  // The error that aborted the communicator, or null.
  std::exception_ptr failure() const;

  struct State;  // one collective's events, tensors and outcome (nccl_core.cpp)

 private:
  Core(CoreOptions options, CurrentStreamFn current_stream);
  void initialise();
  void watchdog_loop();
  // Checks `state`'s end event; marks it done. Returns true once it is done (or failed).
  bool poll(State& state);
  void check_async_error();
  // Fails `state` with a TimeoutError, aborts the communicator and throws it; returns instead when
  // `state` turns out to be done (it completed after its last poll).
  void fail_timed_out(State& state, std::chrono::milliseconds timeout);

  friend class CoreWork;

  CoreOptions options_;
  CurrentStreamFn current_stream_;
  int rank_ = 0;
  int size_ = 1;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  bool owns_stream_ = false;

  std::mutex launch_mutex_;  // issue order; held while NCCL calls are enqueued
  std::uint64_t next_seq_ = 0;

  mutable std::mutex mutex_;  // pending_, failure_, stop_
  std::condition_variable stop_cv_;
  std::vector<std::shared_ptr<State>> pending_;
  std::exception_ptr failure_;
  std::atomic<bool> aborted_{false};
  bool stop_ = false;
  // Note [Abort off the waiting thread]: ncclCommAbort itself can block (seen on an H200 with NCCL
  // 2.28: 18 s, until the stream a collective waited for drained), so abort() hands it to the watchdog
  // and the thread that noticed the failure raises at once.
  bool nccl_abort_requested_ = false;  // under mutex_
  bool nccl_aborted_ = false;          // under mutex_
  bool watchdog_running_ = false;      // under mutex_
  std::condition_variable watchdog_exited_cv_;
  // Note [Nothing freed on the watchdog]: states that left pending_ on the watchdog thread, released
  // on a user thread (the next launch(), the destructor). Under mutex_.
  std::vector<std::shared_ptr<State>> graveyard_;
  void run_nccl_abort();
  std::thread watchdog_;
};

}  // namespace lockstep::comm::nccl
