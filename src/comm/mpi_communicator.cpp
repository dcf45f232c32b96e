#include "lockstep/comm/mpi_communicator.hpp"

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <mpi.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <cmath>
#include <limits>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "comm/validate.hpp"
#include "lockstep/core/error.hpp"

namespace lockstep::comm {

namespace {

// A failure every rank raises alike before any runs the collective (Note [Checked collectives]): it
// leaves the communicator in step, unlike any other (Note [No collective after an MPI error]).
class SameOnEveryRank : public Error {
 public:
  explicit SameOnEveryRank(const std::string& message) : Error(message, __FILE__, __LINE__) {}
};

// ---- Floating-point Min and Max: Note [Min and max are symmetric]. MPI's built-in MPI_MIN and MPI_MAX
// compute `out = out < in ? out : in`, so a NaN survives only when it arrives as `in`, and -0 against
// +0 keeps whichever comes first: in a pairwise exchange the two ranks see the arguments swapped, and
// end up with different values (one NaN, one finite), which breaks the rule that every rank of an
// all-reduce holds the same result. These give one answer whatever the order: NaN when either is NaN
// (as torch.minimum / torch.maximum), and -0 below +0.
template <typename T>
struct MinOf {
  T operator()(T a, T b) const {
    if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<T>::quiet_NaN();
    if (a == b) return std::signbit(a) ? a : b;
    return b < a ? b : a;
  }
};
template <typename T>
struct MaxOf {
  T operator()(T a, T b) const {
    if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<T>::quiet_NaN();
    if (a == b) return std::signbit(a) ? b : a;
    return b > a ? b : a;
  }
};

template <typename T, typename F>
void reduce_native(void* in, void* inout, int* len, MPI_Datatype*) {
  const T* a = static_cast<const T*>(in);
  T* b = static_cast<T*>(inout);
  F f;
  for (int i = 0; i < *len; ++i) b[i] = f(a[i], b[i]);
}

// ---- 16-bit floats: MPI has no such type, so they travel as 16-bit words and are reduced by
// user-defined operations that compute in float and round once per pairwise step.

template <typename T, typename F>
void reduce_16bit(void* in, void* inout, int* len, MPI_Datatype*) {
  const T* a = static_cast<const T*>(in);
  T* b = static_cast<T*>(inout);
  F f;
  for (int i = 0; i < *len; ++i) b[i] = T(f(static_cast<float>(a[i]), static_cast<float>(b[i])));
}
struct AddF { float operator()(float a, float b) const { return a + b; } };
struct MulF { float operator()(float a, float b) const { return a * b; } };

struct UserOps {
  MPI_Op half[4];      // sum, product, min, max
  MPI_Op bfloat16[4];
  MPI_Op float32[2];   // min, max
  MPI_Op float64[2];
};

const UserOps& user_ops() {
  static const UserOps ops = [] {
    UserOps o{};
    LOCKSTEP_MPI_CHECK(MPI_Op_create(&reduce_16bit<c10::Half, AddF>, 1, &o.half[0]));
    LOCKSTEP_MPI_CHECK(MPI_Op_create(&reduce_16bit<c10::Half, MulF>, 1, &o.half[1]));
    LOCKSTEP_MPI_CHECK(MPI_Op_create(&reduce_16bit<c10::Half, MinOf<float>>, 1, &o.half[2]));
    LOCKSTEP_MPI_CHECK(MPI_Op_create(&reduce_16bit<c10::Half, MaxOf<float>>, 1, &o.half[3]));
    LOCKSTEP_MPI_CHECK(MPI_Op_create(&reduce_16bit<c10::BFloat16, AddF>, 1, &o.bfloat16[0]));
    LOCKSTEP_MPI_CHECK(MPI_Op_create(&reduce_16bit<c10::BFloat16, MulF>, 1, &o.bfloat16[1]));
    LOCKSTEP_MPI_CHECK(MPI_Op_create(&reduce_16bit<c10::BFloat16, MinOf<float>>, 1, &o.bfloat16[2]));
    LOCKSTEP_MPI_CHECK(MPI_Op_create(&reduce_16bit<c10::BFloat16, MaxOf<float>>, 1, &o.bfloat16[3]));
    LOCKSTEP_MPI_CHECK(MPI_Op_create(&reduce_native<float, MinOf<float>>, 1, &o.float32[0]));
    LOCKSTEP_MPI_CHECK(MPI_Op_create(&reduce_native<float, MaxOf<float>>, 1, &o.float32[1]));
    LOCKSTEP_MPI_CHECK(MPI_Op_create(&reduce_native<double, MinOf<double>>, 1, &o.float64[0]));
    LOCKSTEP_MPI_CHECK(MPI_Op_create(&reduce_native<double, MaxOf<double>>, 1, &o.float64[1]));
    return o;
  }();
  return ops;
}

MPI_Datatype mpi_type(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return MPI_FLOAT;
    case at::kDouble: return MPI_DOUBLE;
    case at::kInt: return MPI_INT32_T;
    case at::kLong: return MPI_INT64_T;
    case at::kChar: return MPI_INT8_T;
    case at::kByte: return MPI_UINT8_T;
    case at::kHalf:
    case at::kBFloat16: return MPI_UINT16_T;
    default: LOCKSTEP_FAIL("MpiCommunicator does not support dtype ", c10::toString(type));
  }
}

// The MPI operation that carries `op` (Average travels as Sum and is divided afterwards).
MPI_Op mpi_op(ReduceOp op, at::ScalarType type) {
  int index = 0;
  MPI_Op builtin = MPI_SUM;
  switch (op) {
    case ReduceOp::Sum:
    case ReduceOp::Average: index = 0; builtin = MPI_SUM; break;
    case ReduceOp::Product: index = 1; builtin = MPI_PROD; break;
    case ReduceOp::Min: index = 2; builtin = MPI_MIN; break;
    case ReduceOp::Max: index = 3; builtin = MPI_MAX; break;
  }
  if (type == at::kHalf) return user_ops().half[index];
  if (type == at::kBFloat16) return user_ops().bfloat16[index];
  if (index >= 2 && type == at::kFloat) return user_ops().float32[index - 2];
  if (index >= 2 && type == at::kDouble) return user_ops().float64[index - 2];
  return builtin;
}

// Note [float16 average]: Average is a sum, then a division. A float16 sum overflows at 65504 even
// where the average fits (two ranks' 40000 average to 40000, but sum to inf), so float16 is divided
// by the world size first, as NCCL's ncclAvg does; values below float16's normal range lose bits to
// that, as with NCCL. bfloat16 has float32's range and sums first, like every other type.
bool divides_first(ReduceOp op, at::ScalarType type) { return op == ReduceOp::Average && type == at::kHalf; }

struct Task {
  std::shared_ptr<AsyncWork> work;
  std::function<void()> run;
};

// MPI counts are ints: large buffers go in pieces.
template <typename F>
void in_chunks(std::int64_t count, std::size_t element_size, F&& f) {
  constexpr std::int64_t kMaxCount = INT_MAX / 2;
  std::int64_t offset = 0;
  do {
    const std::int64_t n = std::min(kMaxCount, count - offset);
    f(offset * static_cast<std::int64_t>(element_size), static_cast<int>(n));
    offset += n;
  } while (offset < count);
}

// Note [CUDA tensors through MPI]: Debian's OpenMPI is not CUDA-aware, so a CUDA tensor is staged
// through pinned host memory: copied to the host when the collective is issued (on the caller's
// thread and current stream, so after the work that produced it), reduced by MPI on the progress
// thread, and copied back by the first wait() (comm::then), on the waiting thread's current stream,
// so the work that follows sees the result. Mixed set-ups and single-GPU machines work this way; the
// NCCL communicator is the fast path for CUDA tensors.
at::Tensor to_host(const at::Tensor& tensor) {
  at::Tensor host = at::empty(tensor.sizes(), tensor.options().device(at::kCPU).pinned_memory(true));
  host.copy_(tensor);
  return host;
}

// The staged result into the caller's tensor, on the waiting thread, below autograd (Note [Results
// past autograd]): that thread may have grad mode on while `to` is a parameter.
void copy_back(const at::Tensor& to, const at::Tensor& host) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  to.copy_(host);
}

at::Tensor host_slice(const at::Tensor& whole, int rank, std::int64_t n) {
  return whole.view({-1}).narrow(0, rank * n, n);
}

void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, int rank) {
  LOCKSTEP_CHECK(a.device() == b.device(), op, ": input is on ", a.device(), " but output is on ", b.device(),
                 "; both must be on the same device (rank ", rank, ")");
}

}  // namespace

struct MpiCommunicator::Impl {
  MPI_Comm comm = MPI_COMM_NULL;
  int rank = 0;
  int size = 1;
  std::chrono::milliseconds timeout{0};
  std::uint64_t next_seq = 0;  // guarded by mutex: the issue order is the execution order

  std::mutex mutex;
  std::condition_variable cv;
  std::deque<Task> queue;
  std::atomic<std::size_t> queued{0};  // queue.size() readable without the lock (Note [Short spin])
  bool stop = false;
  bool exited = false;
  // Works given up on (a wait() timed out) that have not completed since (AsyncWork::report_timeouts_to).
  std::shared_ptr<std::atomic<int>> given_up = std::make_shared<std::atomic<int>>(0);
  std::condition_variable exited_cv;
  std::thread thread;
  // Note [No collective after an MPI error]: MPI_ERRORS_RETURN turns an MPI failure into an error
  // code instead of ending the process, but MPI leaves the communicator in an undefined state, and
  // the failure may be this rank's alone: a count mismatch truncates the receive on one rank while
  // the sender's side completes. Running on would pair this rank's next collective with whatever the
  // others issue next. So the first MPI error breaks the communicator: every later collective fails
  // at once with this text (read and written by the progress thread only) naming the first failure.
  // A mismatch that checked collectives catch (Note [Checked collectives]) is found before MPI runs
  // it and does not break it. Any other failure does, not only MPI's: an error on this rank alone
  // before its MPI call (out of memory for fp16 Average's scaled copy, a staging copy) leaves the
  // others inside the collective, and the next one this rank issued would pair with it.
  std::string broken;

  void loop() {
    // Note [Results past autograd]: a collective writes its result into the caller's tensor, which may
    // be a parameter (a leaf that requires grad: model averaging under NoGradGuard) or an inference
    // tensor. A new thread has grad mode on and is outside inference mode whatever the caller set, so
    // Average's in-place division (and a staging copy back) would be refused there, leaving the sum.
    // MPI writes through the pointer anyway: so does the division, below autograd.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (;;) {
      Task task;
      // Note [Short spin] (work.cpp): the next collective often follows at once (a bucket after
      // a bucket, a benchmark loop); catching it without a futex wake-up saves microseconds each.
      if (queued.load(std::memory_order_acquire) == 0) {
        const auto spin_end = Clock::now() + std::chrono::microseconds(50);
        while (queued.load(std::memory_order_acquire) == 0 && Clock::now() < spin_end) std::this_thread::yield();
      }
      {
        std::unique_lock<std::mutex> lock(mutex);
        cv.wait(lock, [this] { return stop || !queue.empty(); });
        if (queue.empty()) break;  // stop requested and nothing left to run
        task = std::move(queue.front());
        queue.pop_front();
        queued.store(queue.size(), std::memory_order_release);
      }
      task.work->mark_started();
      if (!broken.empty()) {  // Note [No collective after an MPI error]
        task.run = nullptr;
        task.work->mark_failed(std::make_exception_ptr(
            Error(::lockstep::detail::str_cat(task.work->info().describe(), " was not run: ", broken), __FILE__,
                  __LINE__)));
        continue;
      }
      try {
        task.run();
        task.run = nullptr;  // release the tensors before waking the waiter
        task.work->mark_completed();
      } catch (const MpiError& e) {
        task.run = nullptr;
        broken = ::lockstep::detail::str_cat(
            "this MpiCommunicator runs no collective since ", task.work->info().describe(),
            " failed inside MPI (", e.message(), "). After an MPI error the ranks may be out of step (the "
            "collective may have completed on other ranks), so a later collective could pair with another "
            "rank's different one: wrong numbers or a hang. End the job; a checkpoint resumes it");
        task.work->mark_failed(std::make_exception_ptr(
            MpiError(task.work->info().describe() + " failed: " + e.what(), __FILE__, __LINE__)));
      } catch (const SameOnEveryRank& e) {  // Note [Checked collectives]: no rank ran it
        task.run = nullptr;
        task.work->mark_failed(std::make_exception_ptr(
            Error(task.work->info().describe() + " failed: " + e.what(), __FILE__, __LINE__)));
      } catch (const std::exception& e) {
        task.run = nullptr;
        broken = ::lockstep::detail::str_cat(
            "this MpiCommunicator runs no collective since ", task.work->info().describe(),
            " failed on this rank (", e.what(), "), maybe before its MPI call while the other ranks made "
            "theirs, so a later collective could pair with another rank's different one: wrong numbers or a "
            "hang. End the job; a checkpoint resumes it");
        task.work->mark_failed(std::make_exception_ptr(
            Error(task.work->info().describe() + " failed: " + e.what(), __FILE__, __LINE__)));
      }
    }
    std::lock_guard<std::mutex> lock(mutex);
    exited = true;
    exited_cv.notify_all();
  }

  WorkInfo make_info(const char* op, const at::Tensor* tensor) {
    WorkInfo info;
    info.op = op;
    info.rank = rank;
    info.size = size;
    if (tensor != nullptr) {
      info.numel = tensor->numel();
      info.bytes = static_cast<std::int64_t>(tensor->nbytes());
      info.dtype = detail::dtype_name(tensor->scalar_type());
    }
    return info;
  }

  // Note [Checked collectives]: `signature` describes the call (built by the callers only while
  // checking: no string per collective otherwise); every rank's is compared before any rank runs it. The same error on every rank where they differ, so none runs it and the
  // communicator stays in step.
  bool check = false;
  static constexpr std::size_t kSignatureBytes = 128;
  void verify(const std::string& signature, const std::string& op, std::uint64_t seq) const {
    std::vector<char> mine(kSignatureBytes, '\0');
    std::copy_n(signature.begin(), std::min(signature.size(), kSignatureBytes - 1), mine.begin());
    std::vector<char> all(kSignatureBytes * static_cast<std::size_t>(size), '\0');
    LOCKSTEP_MPI_CHECK(MPI_Allgather(mine.data(), static_cast<int>(kSignatureBytes), MPI_CHAR, all.data(),
                                     static_cast<int>(kSignatureBytes), MPI_CHAR, comm));
    auto row = [&](int r) { return std::string(all.data() + static_cast<std::size_t>(r) * kSignatureBytes); };
    bool same = true;
    for (int r = 1; r < size && same; ++r) same = row(r) == row(0);
    if (same) return;
    std::string table;
    for (int r = 0; r < size; ++r) table += ::lockstep::detail::str_cat(r == 0 ? "" : "; ", "rank ", r, ": ", row(r));
    throw SameOnEveryRank(::lockstep::detail::str_cat(
        op, " #", seq, ": the ranks issued different collectives here (", table,
        "); none ran it (checked collectives, LOCKSTEP_CHECK_COLLECTIVES) (rank ", rank, ")"));
  }

  WorkPtr enqueue(WorkInfo info, std::function<void()> run, std::string signature = {}) {
    std::shared_ptr<AsyncWork> work;
    {
      std::lock_guard<std::mutex> lock(mutex);
      LOCKSTEP_CHECK(!stop, "MpiCommunicator is shutting down; no new ", info.op, " can be issued");
      info.seq = next_seq++;
      if (check) {
        if (signature.empty()) signature = info.op;
        run = [this, signature = std::move(signature), op = info.op, seq = info.seq, inner = std::move(run)] {
          verify(signature, op, seq);
          inner();
        };
      }
      work = std::make_shared<AsyncWork>(std::move(info), timeout);
      work->report_timeouts_to(given_up);
      queue.push_back(Task{work, std::move(run)});
      queued.store(queue.size(), std::memory_order_release);
    }
    cv.notify_one();
    return work;
  }
};

MpiCommunicator::MpiCommunicator(MpiCommunicatorOptions options) : impl_(std::make_unique<Impl>()) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  LOCKSTEP_CHECK(initialized, "MpiCommunicator needs MPI to be initialised first (create a lockstep::Runtime)");
  int provided = MPI_THREAD_SINGLE;
  LOCKSTEP_MPI_CHECK(MPI_Query_thread(&provided));
  LOCKSTEP_CHECK(provided == MPI_THREAD_MULTIPLE,
                 "MpiCommunicator runs MPI on a background thread and needs MPI_THREAD_MULTIPLE; MPI was "
                 "initialised with thread level ", provided, " (initialise with MPI_Init_thread, or let "
                 "lockstep::Runtime do it)");
  LOCKSTEP_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &impl_->comm));
  // Errors come back as codes (and become exceptions) instead of killing the process inside MPI.
  LOCKSTEP_MPI_CHECK(MPI_Comm_set_errhandler(impl_->comm, MPI_ERRORS_RETURN));
  LOCKSTEP_MPI_CHECK(MPI_Comm_rank(impl_->comm, &impl_->rank));
  LOCKSTEP_MPI_CHECK(MPI_Comm_size(impl_->comm, &impl_->size));
  impl_->timeout = options.timeout.count() > 0 ? bounded_timeout(options.timeout) : default_timeout();
  const char* check = std::getenv("LOCKSTEP_CHECK_COLLECTIVES");
  impl_->check = options.check_collectives || (check != nullptr && std::string(check) == "1");
  user_ops();  // create the user operations now, on a thread that may call MPI
  impl_->thread = std::thread([impl = impl_.get()] { impl->loop(); });
}

MpiCommunicator::~MpiCommunicator() {
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    impl_->stop = true;
  }
  impl_->cv.notify_all();
  // During exception unwinding, or after a wait() on one of ours timed out (its error caught further
  // up, and the program leaving), a collective still in flight is almost surely the stuck one: a
  // short grace, not another whole timeout, before the abort.
  const bool unwinding = std::uncaught_exceptions() > 0;
  const bool given_up = unwinding || impl_->given_up->load() > 0;
  const std::chrono::milliseconds limit =
      given_up ? std::min(impl_->timeout, std::chrono::milliseconds(1000)) : impl_->timeout;
  bool exited = false;
  {
    std::unique_lock<std::mutex> lock(impl_->mutex);
    exited = impl_->exited_cv.wait_for(lock, limit, [this] { return impl_->exited; });
  }
  if (!exited) {
    // A collective is stuck (a peer died or ranks diverged). Joining would hang this rank
    // forever, and so would MPI_Finalize: end the whole job instead.
    std::fprintf(stderr,
                 "lockstep: rank %d: MpiCommunicator destroyed%s while a collective is still running after "
                 "%lld ms; aborting the job so that no rank hangs\n",
                 impl_->rank,
                 unwinding ? " during exception unwinding" : given_up ? " after a wait() on it timed out" : "",
                 static_cast<long long>(limit.count()));
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  impl_->thread.join();
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Comm_free(&impl_->comm);
}

int MpiCommunicator::rank() const { return impl_->rank; }
int MpiCommunicator::size() const { return impl_->size; }
std::chrono::milliseconds MpiCommunicator::timeout() const { return impl_->timeout; }

WorkPtr MpiCommunicator::allreduce(at::Tensor tensor, const AllreduceOptions& options) {
  detail::check_tensor(tensor, "allreduce", "tensor", rank());
  detail::check_reduce_op(tensor.scalar_type(), options.op, "allreduce", rank());
  return allreduce(tensor, tensor, options);
}

WorkPtr MpiCommunicator::allreduce(const at::Tensor& input, at::Tensor output, const AllreduceOptions& options) {
  detail::check_tensor(input, "allreduce", "input", rank());
  detail::check_tensor(output, "allreduce", "output", rank());
  check_same_device(input, output, "allreduce", rank());
  detail::check_same(input, output, "allreduce", rank());
  detail::check_reduce_op(input.scalar_type(), options.op, "allreduce", rank());
  const bool in_place = input.data_ptr() == output.data_ptr();
  LOCKSTEP_CHECK(in_place || !detail::overlaps(input, output),
                 "allreduce: input and output overlap without being the same buffer (rank ", rank(), ")");
  if (input.is_cuda()) {  // Note [CUDA tensors through MPI]
    at::Tensor host = to_host(input);
    return then(allreduce(host, host, options), [output = output.detach(), host] { copy_back(output, host); });
  }
  const MPI_Datatype type = mpi_type(input.scalar_type());
  const MPI_Op op = mpi_op(options.op, input.scalar_type());
  const std::size_t element_size = input.element_size();
  Impl* impl = impl_.get();
  const bool divide_first = divides_first(options.op, input.scalar_type());
  // Note [Tensors as issued]: the task holds its own handles to the tensors as they are now, so a
  // caller that re-points its tensor before the task runs (set_data, resize_) changes nothing here:
  // the collective reads and writes the storage it was issued on, which the handles keep alive.
  return impl->enqueue(impl->make_info("allreduce", &input), [=, input = input.detach(), output = output.detach()] {
    if (input.numel() > 0) {
      char* out = static_cast<char*>(output.data_ptr());
      const char* in = static_cast<const char*>(input.data_ptr());
      if (divide_first) {  // Note [float16 average]
        if (!in_place) output.copy_(input);
        output.div_(impl->size);
      }
      const bool reduce_in_place = in_place || divide_first;
      in_chunks(input.numel(), element_size, [&](std::int64_t offset, int count) {
        LOCKSTEP_MPI_CHECK(MPI_Allreduce(reduce_in_place ? MPI_IN_PLACE : in + offset, out + offset, count, type, op,
                                         impl->comm));
      });
      if (options.op == ReduceOp::Average && !divide_first) output.div_(impl->size);
    }
  }, !impl->check ? std::string()
                  : ::lockstep::detail::str_cat("allreduce ", to_string(options.op), " ",
                                                detail::dtype_name(input.scalar_type()), " x", input.numel()));
}

WorkPtr MpiCommunicator::broadcast(at::Tensor tensor, const BroadcastOptions& options) {
  detail::check_tensor(tensor, "broadcast", "tensor", rank());
  LOCKSTEP_CHECK(options.root >= 0 && options.root < size(), "broadcast: root ", options.root,
                 " is out of range for a world of ", size(), " ranks (rank ", rank(), ")");
  if (tensor.is_cuda()) {  // Note [CUDA tensors through MPI]
    at::Tensor host = to_host(tensor);
    return then(broadcast(host, options), [tensor = tensor.detach(), host] { copy_back(tensor, host); });
  }
  const MPI_Datatype type = mpi_type(tensor.scalar_type());
  const std::size_t element_size = tensor.element_size();
  Impl* impl = impl_.get();
  const int root = options.root;
  return impl->enqueue(impl->make_info("broadcast", &tensor), [=, tensor = tensor.detach()] {  // Note [Tensors as issued]
    if (tensor.numel() > 0) {
      char* data = static_cast<char*>(tensor.data_ptr());
      in_chunks(tensor.numel(), element_size, [&](std::int64_t offset, int count) {
        LOCKSTEP_MPI_CHECK(MPI_Bcast(data + offset, count, type, root, impl->comm));
      });
    }
  }, !impl->check ? std::string()
                  : ::lockstep::detail::str_cat("broadcast from rank ", options.root, " ",
                                                detail::dtype_name(tensor.scalar_type()), " x", tensor.numel()));
}

WorkPtr MpiCommunicator::allgather(const at::Tensor& input, at::Tensor output, const AllgatherOptions&) {
  detail::check_tensor(input, "allgather", "input", rank());
  detail::check_tensor(output, "allgather", "output", rank());
  detail::check_gather_sizes(input, output, size(), rank(), "allgather");
  LOCKSTEP_CHECK(input.numel() <= INT_MAX, "allgather: ", input.numel(), " elements per rank exceed MPI's limit of ",
                 INT_MAX);
  check_same_device(input, output, "allgather", rank());
  const bool in_place = detail::is_rank_slice(input, output, rank());
  LOCKSTEP_CHECK(in_place || !detail::overlaps(input, output),
                 "allgather: input overlaps output without being exactly this rank's slice of it (rank ", rank(), ")");
  if (input.is_cuda()) {  // Note [CUDA tensors through MPI]
    at::Tensor host_out = in_place ? to_host(output) : at::empty(output.sizes(), output.options().device(at::kCPU).pinned_memory(true));
    at::Tensor host_in = in_place ? host_slice(host_out, rank(), input.numel()) : to_host(input);
    return then(allgather(host_in, host_out), [output = output.detach(), host_out] { copy_back(output, host_out); });
  }
  const MPI_Datatype type = mpi_type(input.scalar_type());
  Impl* impl = impl_.get();
  return impl->enqueue(impl->make_info("allgather", &input), [=, input = input.detach(), output = output.detach()] {
    if (input.numel() > 0) {
      const int count = static_cast<int>(input.numel());
      LOCKSTEP_MPI_CHECK(MPI_Allgather(in_place ? MPI_IN_PLACE : input.data_ptr(), count, type, output.data_ptr(),
                                       count, type, impl->comm));
    }
  }, !impl->check ? std::string()
                  : ::lockstep::detail::str_cat("allgather ", detail::dtype_name(input.scalar_type()), " x",
                                                input.numel(), " per rank"));
}

WorkPtr MpiCommunicator::reduce_scatter(const at::Tensor& input, at::Tensor output,
                                        const ReduceScatterOptions& options) {
  detail::check_tensor(input, "reduce_scatter", "input", rank());
  detail::check_tensor(output, "reduce_scatter", "output", rank());
  detail::check_gather_sizes(output, input, size(), rank(), "reduce_scatter");
  detail::check_reduce_op(input.scalar_type(), options.op, "reduce_scatter", rank());
  LOCKSTEP_CHECK(output.numel() <= INT_MAX, "reduce_scatter: ", output.numel(),
                 " elements per rank exceed MPI's limit of ", INT_MAX);
  check_same_device(input, output, "reduce_scatter", rank());
  const bool in_place = detail::is_rank_slice(output, input, rank());
  LOCKSTEP_CHECK(in_place || !detail::overlaps(input, output),
                 "reduce_scatter: output overlaps input without being exactly this rank's slice of it (rank ", rank(), ")");
  if (input.is_cuda()) {  // Note [CUDA tensors through MPI]
    at::Tensor host_in = to_host(input);
    at::Tensor host_out = in_place ? host_slice(host_in, rank(), output.numel())
                                   : at::empty(output.sizes(), output.options().device(at::kCPU).pinned_memory(true));
    return then(reduce_scatter(host_in, host_out, options),
                [output = output.detach(), host_out] { copy_back(output, host_out); });
  }
  const MPI_Datatype type = mpi_type(input.scalar_type());
  const MPI_Op op = mpi_op(options.op, input.scalar_type());
  Impl* impl = impl_.get();
  const bool divide_first = divides_first(options.op, input.scalar_type());
  return impl->enqueue(impl->make_info("reduce_scatter", &input), [=, input = input.detach(), output = output.detach()] {
    if (output.numel() > 0) {
      const int count = static_cast<int>(output.numel());
      // Note [float16 average]: in place the input is the result's buffer; otherwise a scaled copy.
      const at::Tensor source = !divide_first ? input : in_place ? input.div_(impl->size) : input.div(impl->size);
      if (in_place) {
        // MPI_IN_PLACE leaves the result at the start of the buffer; move it to this rank's slice.
        LOCKSTEP_MPI_CHECK(MPI_Reduce_scatter_block(MPI_IN_PLACE, input.data_ptr(), count, type, op, impl->comm));
        if (impl->rank != 0) {
          std::memmove(output.data_ptr(), input.data_ptr(), output.nbytes());
        }
      } else {
        LOCKSTEP_MPI_CHECK(
            MPI_Reduce_scatter_block(source.data_ptr(), output.data_ptr(), count, type, op, impl->comm));
      }
      if (options.op == ReduceOp::Average && !divide_first) output.div_(impl->size);
    }
  }, !impl->check ? std::string()
                  : ::lockstep::detail::str_cat("reduce_scatter ", to_string(options.op), " ",
                                                detail::dtype_name(input.scalar_type()), " x", output.numel(),
                                                " per rank"));
}

WorkPtr MpiCommunicator::barrier() {
  Impl* impl = impl_.get();
  return impl->enqueue(impl->make_info("barrier", nullptr), [impl] { LOCKSTEP_MPI_CHECK(MPI_Barrier(impl->comm)); });
}

}  // namespace lockstep::comm
