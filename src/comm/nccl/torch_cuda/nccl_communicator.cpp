// NcclCommunicator: the Communicator over CUDA tensors, on top of nccl::Core (which knows nothing of
// LibTorch). This file needs a CUDA-enabled LibTorch: the current stream, the caching allocator's
// recordStream, device guards. Note [NCCL stream semantics] (nccl_core.hpp) is what it implements.
#include "lockstep/comm/nccl_communicator.hpp"

#include <ATen/ATen.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <string>

#include "comm/nccl/nccl_check.hpp"
#include "comm/nccl/nccl_compat.hpp"
#include "comm/nccl/nccl_core.hpp"
#include "comm/nccl/nccl_types.hpp"
#include "comm/validate.hpp"
#include "lockstep/comm/mpi_communicator.hpp"
#include "lockstep/core/error.hpp"

namespace lockstep::comm {

namespace {

bool env_on(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr) return false;
  const std::string text(value);
  return text == "1" || text == "on" || text == "ON" || text == "true" || text == "yes";
}

// Note [CPU tensors through NCCL]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// A collective on CPU tensors (DataParallel's per-step flags of which parameters got gradients, a
// metric's sums, a model check's digests) runs over MPI on the host, through an MpiCommunicator of
// the communicator's own. Staging it through the GPU instead, as the first version did, costs a host
// synchronisation with the caller's stream: a pageable host-to-device copy first waits for everything
// queued on the stream, and the host then waits for the collective, which the communication stream
// runs only after that same work. At the end of each backward that drained the GPU's queue of work
// and left it idle while the host queued the next step. Over MPI the host waits only for the other
// ranks' hosts to reach the same call. The two channels are matched independently, each in issue
// order; since every rank issues the same sequence, each channel sees the same sub-sequence on every
// rank, and a host that blocks on one never holds back a collective already queued on the other.
class NcclCommunicator final : public Communicator {
 public:
  explicit NcclCommunicator(NcclCommunicatorOptions options)
      : device_(c10::kCUDA, static_cast<c10::DeviceIndex>(options.device)),
        stream_(c10::cuda::getStreamFromPool(/*isHighPriority=*/true, device_.index())) {
    nccl::CoreOptions core;
    core.device = options.device;
    core.timeout = options.timeout;
    core.blocking_wait = options.blocking_wait || env_on("LOCKSTEP_NCCL_BLOCKING_WAIT");
    core.stream = stream_.stream();
    const c10::DeviceIndex index = device_.index();
    core_ = nccl::Core::create(core, [index] { return c10::cuda::getCurrentCUDAStream(index).stream(); });
    // Note [CPU tensors through NCCL]: the host's collectives go over MPI, on its own duplicate of
    // MPI_COMM_WORLD (the communicator NCCL was bootstrapped over, so the ranks are the same).
    MpiCommunicatorOptions host;
    host.timeout = core_->timeout();
    host_ = std::make_shared<MpiCommunicator>(host);
  }

  int rank() const override { return core_->rank(); }
  int size() const override { return core_->size(); }
  std::string backend() const override { return "nccl"; }
  std::chrono::milliseconds timeout() const override { return core_->timeout(); }
  nccl::Core& core() { return *core_; }
  const c10::cuda::CUDAStream& stream() const { return stream_; }
  const c10::Device& device() const { return device_; }

  using Communicator::allreduce;
  WorkPtr allreduce(at::Tensor tensor, const AllreduceOptions& options) override {
    check(tensor, "allreduce", "tensor");
    return allreduce(tensor, tensor, options);
  }

  WorkPtr allreduce(const at::Tensor& input, at::Tensor output, const AllreduceOptions& options) override {
    check(input, "allreduce", "input");
    check(output, "allreduce", "output");
    check_same_device(input, output, "allreduce");
    if (on_host(input)) return host_->allreduce(input, output, options);
    detail::check_same(input, output, "allreduce", rank());
    const nccl::NcclReduction reduction = nccl::nccl_reduction(options.op, input.scalar_type(), "allreduce", rank());
    const ncclDataType_t type = nccl::nccl_dtype(input.scalar_type(), "allreduce");
    const bool in_place = input.data_ptr() == output.data_ptr();
    LOCKSTEP_CHECK(in_place || !detail::overlaps(input, output),
                   "allreduce: input and output overlap without being the same buffer (rank ", rank(), ")");
    return launch_allreduce(input, output, reduction, type);
  }

  WorkPtr broadcast(at::Tensor tensor, const BroadcastOptions& options) override {
    check(tensor, "broadcast", "tensor");
    LOCKSTEP_CHECK(options.root >= 0 && options.root < size(), "broadcast: root ", options.root,
                   " is out of range for a world of ", size(), " ranks (rank ", rank(), ")");
    if (on_host(tensor)) return host_->broadcast(tensor, options);
    const ncclDataType_t type = nccl::nccl_dtype(tensor.scalar_type(), "broadcast");
    const int root = options.root;
    nccl::LaunchSpec spec = spec_for("broadcast", tensor, {tensor});
    spec.issue = [tensor, type, root](ncclComm_t comm, cudaStream_t stream) {
      if (tensor.numel() == 0) return;
      LOCKSTEP_NCCL_CHECK_COMM(ncclBroadcast(tensor.data_ptr(), tensor.data_ptr(), static_cast<size_t>(tensor.numel()),
                                             type, root, comm, stream),
                               comm);
    };
    return core_->launch(std::move(spec));
  }

  WorkPtr allgather(const at::Tensor& input, at::Tensor output, const AllgatherOptions& options) override {
    check(input, "allgather", "input");
    check(output, "allgather", "output");
    check_same_device(input, output, "allgather");
    if (on_host(input)) return host_->allgather(input, output, options);
    detail::check_gather_sizes(input, output, size(), rank(), "allgather");
    const bool in_place = detail::is_rank_slice(input, output, rank());
    LOCKSTEP_CHECK(in_place || !detail::overlaps(input, output),
                   "allgather: input overlaps output without being exactly this rank's slice of it (rank ", rank(), ")");
    const ncclDataType_t type = nccl::nccl_dtype(input.scalar_type(), "allgather");
    nccl::LaunchSpec spec = spec_for("allgather", input, {input, output});
    spec.issue = [input, output, type](ncclComm_t comm, cudaStream_t stream) {
      if (input.numel() == 0) return;
      LOCKSTEP_NCCL_CHECK_COMM(
          ncclAllGather(input.data_ptr(), output.data_ptr(), static_cast<size_t>(input.numel()), type, comm, stream),
          comm);
    };
    return core_->launch(std::move(spec));
  }

  WorkPtr reduce_scatter(const at::Tensor& input, at::Tensor output, const ReduceScatterOptions& options) override {
    check(input, "reduce_scatter", "input");
    check(output, "reduce_scatter", "output");
    check_same_device(input, output, "reduce_scatter");
    if (on_host(input)) return host_->reduce_scatter(input, output, options);
    detail::check_gather_sizes(output, input, size(), rank(), "reduce_scatter");
    const nccl::NcclReduction reduction =
        nccl::nccl_reduction(options.op, input.scalar_type(), "reduce_scatter", rank());
    const bool in_place = detail::is_rank_slice(output, input, rank());
    LOCKSTEP_CHECK(in_place || !detail::overlaps(input, output),
                   "reduce_scatter: output overlaps input without being exactly this rank's slice of it (rank ", rank(), ")");
    const ncclDataType_t type = nccl::nccl_dtype(input.scalar_type(), "reduce_scatter");
    const int world = size();
    nccl::LaunchSpec spec = spec_for("reduce_scatter", input, {input, output});
    spec.issue = [this, input, output, type, reduction, world](ncclComm_t comm, cudaStream_t stream) {
      if (output.numel() == 0) return;
      LOCKSTEP_NCCL_CHECK_COMM(ncclReduceScatter(input.data_ptr(), output.data_ptr(), static_cast<size_t>(output.numel()), type,
                                                 reduction.op, comm, stream),
                               comm);
      if (reduction.divide_after) divide_on_stream(output, world);
    };
    return core_->launch(std::move(spec));
  }

  WorkPtr barrier() override {
    // NCCL has no barrier: a one-element all-reduce that the host waits for (as c10d does).
    at::Tensor token = at::zeros({1}, at::TensorOptions().dtype(at::kFloat).device(device_));
    nccl::LaunchSpec spec = spec_for("barrier", token, {token});
    spec.host_result = true;
    spec.info.numel = 0;
    spec.info.bytes = 0;
    spec.info.dtype.clear();
    spec.issue = [token](ncclComm_t comm, cudaStream_t stream) {
      LOCKSTEP_NCCL_CHECK_COMM(ncclAllReduce(token.data_ptr(), token.data_ptr(), 1, ncclFloat32, ncclSum, comm, stream),
                               comm);
    };
    return core_->launch(std::move(spec));
  }

 private:
  void check(const at::Tensor& tensor, const char* op, const char* what) const {
    detail::check_tensor(tensor, op, what, rank(), {c10::DeviceType::CUDA, c10::DeviceType::CPU});
    LOCKSTEP_CHECK(!tensor.is_cuda() || tensor.device() == device_, op, ": the ", what, " tensor is on ",
                   tensor.device(), " but this rank's NCCL communicator runs on ", device_, " (rank ", rank(), ")");
  }
  void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op) const {
    LOCKSTEP_CHECK(a.device() == b.device(), op, ": input is on ", a.device(), " but output is on ", b.device(),
                   "; both must be on the same device (rank ", rank(), ")");
  }

  // Note [NCCL stream semantics], point 3: the caching allocator must not reuse these blocks until the
  // communication stream is past the collective, even if the caller drops the tensors at once.
  void record(const at::Tensor& tensor) const {
    if (tensor.defined() && tensor.is_cuda() && tensor.storage()) {
      c10::cuda::CUDACachingAllocator::recordStream(tensor.storage().data_ptr(), stream_);
    }
  }

  // Note [CPU tensors through NCCL]: true for a CPU tensor, after making sure the NCCL communicator
  // has not failed (an aborted communicator refuses every later call, on the host or not).
  bool on_host(const at::Tensor& tensor) const {
    if (!tensor.is_cpu()) return false;
    if (std::exception_ptr failure = core_->failure()) std::rethrow_exception(failure);
    return true;
  }

  nccl::LaunchSpec spec_for(const char* op, const at::Tensor& described, std::vector<at::Tensor> tensors) const {
    nccl::LaunchSpec spec;
    spec.info.op = op;
    spec.info.numel = described.numel();
    spec.info.bytes = static_cast<std::int64_t>(described.nbytes());
    spec.info.dtype = detail::dtype_name(described.scalar_type());
    spec.producer = c10::cuda::getCurrentCUDAStream(device_.index()).stream();
    for (const auto& t : tensors) record(t);
    spec.keep_alive = std::move(tensors);
    return spec;
  }

  void divide_on_stream(const at::Tensor& tensor, int world) const {
    c10::cuda::CUDAStreamGuard guard(stream_);
    // As the MPI communicator (Note [Results past autograd]): `tensor` may be a parameter or an inference
    // tensor, and the caller's thread may have grad mode on.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    tensor.div_(world);
  }

  WorkPtr launch_allreduce(const at::Tensor& input, const at::Tensor& output, nccl::NcclReduction reduction,
                           ncclDataType_t type) {
    nccl::LaunchSpec spec = spec_for("allreduce", input, {input, output});
    const int world = size();
    spec.issue = [this, input, output, reduction, type, world](ncclComm_t comm, cudaStream_t stream) {
      if (input.numel() == 0) return;
      LOCKSTEP_NCCL_CHECK_COMM(ncclAllReduce(input.data_ptr(), output.data_ptr(), static_cast<size_t>(input.numel()),
                                             type, reduction.op, comm, stream),
                               comm);
      if (reduction.divide_after) divide_on_stream(output, world);
    };
    return core_->launch(std::move(spec));
  }

  c10::Device device_;
  c10::cuda::CUDAStream stream_;
  std::shared_ptr<nccl::Core> core_;
  CommunicatorPtr host_;  // Note [CPU tensors through NCCL]
};

}  // namespace

int nccl_device_index(const Communicator& comm) {
  const auto* nccl = dynamic_cast<const NcclCommunicator*>(&comm);
  return nccl != nullptr ? nccl->device().index() : -1;
}

namespace {

NcclCommunicator& as_nccl(Communicator& comm, const char* who) {
  auto* nccl = dynamic_cast<NcclCommunicator*>(&comm);
  LOCKSTEP_CHECK(nccl != nullptr, who, " needs the NCCL communicator, found backend '", comm.backend(), "'");
  return *nccl;
}

}  // namespace

bool nccl_available() { return true; }

std::string cuda_pci_bus_id(int device) {
  char id[64] = {0};
  if (cudaDeviceGetPCIBusId(id, static_cast<int>(sizeof id), device) != cudaSuccess) {
    cudaGetLastError();  // not sticky; the caller counts devices instead
    return "";
  }
  return id;
}

std::string nccl_build_info() {
  int runtime = 0;
  cudaRuntimeGetVersion(&runtime);
  return ::lockstep::detail::str_cat("NCCL ", nccl::compat::runtime_version_code(), " (compiled against ", NCCL_MAJOR, ".",
                         NCCL_MINOR, ".", NCCL_PATCH, "), CUDA runtime ", runtime, ", LibTorch with CUDA");
}

CommunicatorPtr make_nccl_communicator(NcclCommunicatorOptions options) {
  nccl::cuda_device_count("the NCCL communicator");
  if (options.device < 0) options.device = static_cast<int>(c10::cuda::current_device());
  nccl::check_device(options.device);  // before the constructor takes a stream of the device's pool
  return std::make_shared<NcclCommunicator>(options);
}

void nccl_raw_allreduce(Communicator& comm, const at::Tensor& tensor) {
  NcclCommunicator& nccl = as_nccl(comm, "nccl_raw_allreduce");
  LOCKSTEP_CHECK(tensor.is_cuda() && tensor.device() == nccl.device() && tensor.is_contiguous(),
                 "nccl_raw_allreduce: expected a contiguous tensor on ", nccl.device(), ", found one on ",
                 tensor.device());
  const ncclDataType_t type = nccl::nccl_dtype(tensor.scalar_type(), "nccl_raw_allreduce");
  ncclComm_t handle = nccl.core().handle();
  LOCKSTEP_NCCL_CHECK_COMM(ncclAllReduce(tensor.data_ptr(), tensor.data_ptr(), static_cast<size_t>(tensor.numel()),
                                         type, ncclSum, handle, nccl.stream().stream()),
                           handle);
}

void nccl_synchronize(Communicator& comm) { as_nccl(comm, "nccl_synchronize").stream().synchronize(); }

}  // namespace lockstep::comm
