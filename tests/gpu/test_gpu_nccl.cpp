// The NCCL communicator on real GPUs: closed forms for every collective and dtype, CPU tensors
// through it, stream semantics (Note [NCCL stream semantics]) and the timeout abort (Note [NCCL
// watchdog]). Needs one GPU per rank on the host; otherwise each case says so and returns.
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <catch2/catch.hpp>
#include <cuda_runtime_api.h>
#include <torch/torch.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <thread>

#include "lockstep/comm/mpi_communicator.hpp"
#include "lockstep/comm/nccl_communicator.hpp"
#include "lockstep/comm/stop_vote.hpp"
#include "lockstep/core/device.hpp"
#include "lockstep/core/error.hpp"
#include "lockstep/ddp/data_parallel.hpp"
#include "lockstep/train/foreach_optim.hpp"
#include "support/dist.hpp"
#include "stream_gate.hpp"
#include "support/fixtures.hpp"

using Catch::Matchers::Contains;
using lockstep::comm::ReduceOp;
using lockstep::testing::StreamGate;

namespace {

// One NCCL communicator for the cases below (created collectively on first use), or null with a
// message where this host has fewer GPUs than ranks.
lockstep::comm::CommunicatorPtr nccl() {
  static lockstep::comm::CommunicatorPtr comm = [] () -> lockstep::comm::CommunicatorPtr {
    const auto& world = lockstep::testing::runtime().world();
    if (!lockstep::comm::nccl_available()) return nullptr;
    // The runtime's own choice first: with one visible GPU per rank (CUDA_VISIBLE_DEVICES set per task)
    // each rank counts 1 device although the host's ranks use several.
    if (lockstep::testing::runtime().backend() == "nccl") return lockstep::testing::comm_ptr();
    if (world.local_size > lockstep::cuda_device_count()) return nullptr;
    lockstep::comm::NcclCommunicatorOptions o;
    o.device = world.device.index();
    return lockstep::comm::make_nccl_communicator(o);
  }();
  if (!comm) {
    WARN("skipped: NCCL needs one GPU per rank (" << lockstep::testing::runtime().world().local_size << " ranks, "
                                                 << lockstep::cuda_device_count() << " GPUs) or this build lacks it: "
                                                 << lockstep::comm::nccl_build_info());
  }
  return comm;
}

// The values' period: bfloat16 holds integers exactly up to 256 only, so its sums over 8 or more ranks
// (NCCL's partial sums included) stay exact with a shorter period.
int64_t period(torch::ScalarType type) { return type == torch::kBFloat16 ? 8 : 64; }

torch::Tensor ramp(int64_t n, int rank, torch::ScalarType type, const torch::Device& device) {
  return (torch::arange(n, torch::kLong).remainder(period(type)) + rank).to(type).to(device);
}

bool equal_as_double(const torch::Tensor& a, const torch::Tensor& b) {
  return torch::equal(a.cpu().to(torch::kDouble), b.cpu().to(torch::kDouble));
}

torch::Device device() { return lockstep::testing::runtime().world().device; }

}  // namespace

TEST_CASE("NCCL allreduce: closed forms for every op and dtype", "[gpu][nccl]") {
  auto comm = nccl();
  if (!comm) return;
  const int n = comm->size(), r = comm->rank();
  for (auto type : {torch::kFloat, torch::kDouble, torch::kHalf, torch::kBFloat16, torch::kInt, torch::kLong,
                    torch::kChar, torch::kByte}) {
    for (int64_t size : {int64_t{0}, int64_t{1}, int64_t{7919}, int64_t{4'000'037}}) {
      INFO("dtype " << type << ", " << size << " elements");
      if (type == torch::kChar || type == torch::kByte) {
        if (size > 10000) continue;
      }
      auto t = ramp(size, r, type, device());
      comm->allreduce(t)->wait();
      auto expected = torch::arange(size, torch::kLong).remainder(period(type)) * n + n * (n - 1) / 2;
      if (type == torch::kChar || type == torch::kByte) expected = expected.to(type).to(torch::kLong);
      CHECK(t.scalar_type() == type);
      CHECK(equal_as_double(t, expected));
    }
    auto base = torch::arange(1031, torch::kLong).remainder(16);
    auto t = (base + r).to(type).to(device());
    comm->allreduce(t, {ReduceOp::Max})->wait();
    CHECK(equal_as_double(t, base + (n - 1)));
    t = (base + r).to(type).to(device());
    comm->allreduce(t, {ReduceOp::Min})->wait();
    CHECK(equal_as_double(t, base));
    if (c10::isFloatingType(type)) {
      t = (base * 2 + 2 * r).to(type).to(device());
      comm->allreduce(t, {ReduceOp::Average})->wait();
      CHECK(equal_as_double(t, base * 2 + (n - 1)));
    } else {
      CHECK_THROWS_WITH(comm->allreduce(t, {ReduceOp::Average}), Contains("floating-point"));
    }
    t = torch::full({17}, 2, torch::kLong).to(type).to(device());
    comm->allreduce(t, {ReduceOp::Product})->wait();
    CHECK(equal_as_double(t, torch::full({17}, 1L << n, torch::kLong)));
  }
}

TEST_CASE("NCCL broadcast, allgather and reduce_scatter, in and out of place", "[gpu][nccl]") {
  auto comm = nccl();
  if (!comm) return;
  const int n = comm->size(), r = comm->rank();
  for (int root = 0; root < n; ++root) {
    auto t = ramp(1000, r, torch::kFloat, device());
    comm->broadcast(t, {root})->wait();
    CHECK(equal_as_double(t, ramp(1000, root, torch::kFloat, torch::kCPU)));
  }
  const int64_t m = 513;
  for (auto type : {torch::kFloat, torch::kHalf, torch::kBFloat16, torch::kLong}) {
    INFO("dtype " << type);
    const auto expected_gather = [&] {
      std::vector<torch::Tensor> parts;
      for (int q = 0; q < n; ++q) parts.push_back(ramp(m, q, type, torch::kCPU).to(torch::kLong));
      return torch::cat(parts);
    }();
    auto out = torch::zeros({n * m}, torch::TensorOptions().dtype(type).device(device()));
    comm->allgather(ramp(m, r, type, device()), out)->wait();
    CHECK(equal_as_double(out, expected_gather));
    auto whole = torch::zeros({n * m}, torch::TensorOptions().dtype(type).device(device()));
    whole.narrow(0, r * m, m).copy_(ramp(m, r, type, device()));
    comm->allgather(whole.narrow(0, r * m, m), whole)->wait();
    CHECK(equal_as_double(whole, expected_gather));

    // reduce_scatter: rank q contributes ramp(n*m, q); slice s of the sum is n*(i%64) + n(n-1)/2 over i in slice s.
    auto sum = torch::arange(n * m, torch::kLong).remainder(period(type)) * n + n * (n - 1) / 2;
    auto in = ramp(n * m, r, type, device());
    auto mine = torch::zeros({m}, torch::TensorOptions().dtype(type).device(device()));
    comm->reduce_scatter(in, mine)->wait();
    CHECK(equal_as_double(mine, sum.narrow(0, r * m, m)));
    in = ramp(n * m, r, type, device());
    comm->reduce_scatter(in, in.narrow(0, r * m, m))->wait();
    CHECK(equal_as_double(in.narrow(0, r * m, m), sum.narrow(0, r * m, m)));
  }
}

TEST_CASE("CPU tensors go through the NCCL communicator too", "[gpu][nccl]") {
  auto comm = nccl();
  if (!comm) return;
  const int n = comm->size();
  auto t = torch::full({100}, comm->rank() + 1.0, torch::kDouble);
  comm->allreduce(t)->wait();  // the host reads it right after: wait() blocked until it was there
  CHECK(torch::allclose(t, torch::full({100}, n * (n + 1) / 2.0, torch::kDouble)));
  comm->barrier()->wait();
  auto wrong = torch::zeros({4}, torch::TensorOptions().device(device()));
  if (lockstep::cuda_device_count() > 1) {
    const int other = (device().index() + 1) % lockstep::cuda_device_count();
    auto elsewhere = torch::zeros({4}, torch::TensorOptions().device(torch::Device(torch::kCUDA, other)));
    CHECK_THROWS_WITH(comm->allreduce(elsewhere), Contains("runs on"));
  }
  CHECK_THROWS_WITH(comm->allreduce(wrong, torch::zeros({4})), Contains("same device"));
}

TEST_CASE("CPU tensors through NCCL go over the host: they neither wait for the GPU nor stall it", "[gpu][nccl]") {
  // Note [CPU tensors through NCCL]: staged through the GPU they waited for everything queued on the
  // caller's stream (here: held up by the gate for up to 20 s).
  auto comm = nccl();
  if (!comm) return;
  const int n = comm->size(), r = comm->rank();
  c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(false, device().index());
  c10::cuda::CUDAStreamGuard on_side(side);
  StreamGate gate;
  gate.close(side.stream());
  auto on_gpu = torch::full({1 << 16}, 1.0, torch::TensorOptions().device(device()));
  auto gpu_work = comm->allreduce(on_gpu);  // behind the gate
  const auto start = std::chrono::steady_clock::now();
  auto sum = torch::full({100}, r + 1.0, torch::kDouble);
  comm->allreduce(sum)->wait();
  auto gathered = torch::zeros({2 * n}, torch::kLong);
  comm->allgather(torch::full({2}, static_cast<int64_t>(r), torch::kLong), gathered)->wait();
  auto root = torch::full({3}, static_cast<float>(r));
  comm->broadcast(root, {n - 1})->wait();
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  CHECK(waited < 1.0);
  CHECK_FALSE(gpu_work->is_completed());
  CHECK(torch::allclose(sum, torch::full({100}, n * (n + 1) / 2.0, torch::kDouble)));
  CHECK(torch::equal(gathered, torch::arange(n, torch::kLong).repeat_interleave(2)));
  CHECK(torch::equal(root, torch::full({3}, static_cast<float>(n - 1))));
  gate.release();
  gpu_work->wait();
  side.synchronize();
  CHECK(torch::allclose(on_gpu.cpu(), torch::full({1 << 16}, static_cast<float>(n))));
  comm->barrier()->wait();
}

TEST_CASE("a DataParallel step over NCCL never blocks the host", "[gpu][nccl][ddp]") {
  // Forward, backward with its bucket all-reduces and the per-step bookkeeping, and a ForeachSGD step
  // are all queued while the stream is held up: no host synchronisation anywhere in a step, so the
  // host runs ahead of the GPU as in a process without DataParallel. Every rank has the same batch, so
  // the averaged gradients are each rank's own and a model without DataParallel is the reference.
  auto comm = nccl();
  if (!comm) return;
  c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(false, device().index());
  c10::cuda::CUDAStreamGuard on_side(side);
  torch::manual_seed(3);
  lockstep::testing::SmallConvNet model(/*batch_norm=*/true);
  torch::manual_seed(3);
  lockstep::testing::SmallConvNet plain(/*batch_norm=*/true);
  model->to(device());
  plain->to(device());
  lockstep::ddp::DataParallel dp(model, comm);
  const auto sgd = torch::optim::SGDOptions(0.1).momentum(0.9).weight_decay(1e-4);
  lockstep::train::ForeachSGD opt(model->parameters(), sgd);
  lockstep::train::ForeachSGD plain_opt(plain->parameters(), sgd);
  torch::manual_seed(7);
  const auto x = torch::randn({8, 1, 8, 8}).to(device());
  const auto y = torch::randint(0, 4, {8}, torch::kLong).to(device());
  auto step = [&](lockstep::testing::SmallConvNet& net, torch::optim::Optimizer& o) {
    o.zero_grad();
    torch::nn::functional::cross_entropy(net->forward(x), y).backward();
    o.step();
  };
  for (int i = 0; i < 2; ++i) step(model, opt);  // the first steps build and rebuild the buckets
  side.synchronize();
  StreamGate gate;
  gate.close(side.stream());
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < 3; ++i) step(model, opt);
  const double queued = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  gate.release();
  side.synchronize();
  CHECK(queued < 2.0);
  for (int i = 0; i < 5; ++i) step(plain, plain_opt);
  side.synchronize();
  auto ours = model->parameters();
  auto theirs = plain->parameters();
  for (std::size_t i = 0; i < ours.size(); ++i) {
    INFO("parameter " << i);
    CHECK(torch::allclose(ours[i].detach().cpu(), theirs[i].detach().cpu(), 1e-5, 1e-6));
  }
  comm->barrier()->wait();
}

TEST_CASE("wait() orders the caller's stream after the collective without blocking the host", "[gpu][nccl]") {
  auto comm = nccl();
  if (!comm) return;
  const int n = comm->size();
  c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(false, device().index());
  c10::cuda::CUDAStreamGuard on_side(side);
  auto t = torch::zeros({1 << 20}, torch::TensorOptions().device(device()));
  StreamGate gate;
  gate.close(side.stream());  // nothing queued on `side` after this runs until release()
  t.fill_(comm->rank() + 1.0);  // the producer: must run before the collective reads t
  auto work = comm->allreduce(t);
  const auto start = std::chrono::steady_clock::now();
  work->wait();  // must return although the collective cannot have run yet
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  CHECK(waited < 1.0);
  CHECK_FALSE(work->is_completed());
  auto copy = t * 1.0;  // the consumer, queued on `side` after wait(): must see the reduced values
  gate.release();
  side.synchronize();
  CHECK(work->is_completed());
  CHECK(torch::allclose(copy.cpu(), torch::full({1 << 20}, n * (n + 1) / 2.0)));

  // Out of place, so that it shows even at one rank (whose in-place all-reduce NCCL skips: the values
  // above are then right whatever the ordering): `out` holds -7 until the collective writes it, and
  // the collective reads `in` only after the gated fill. Without the producer event the sum is of
  // zeros; without wait()'s event the consumer may read -7.
  auto in = torch::zeros({1 << 20}, torch::TensorOptions().device(device()));
  auto out = torch::full({1 << 20}, -7.0, torch::TensorOptions().device(device()));
  side.synchronize();
  StreamGate gate2;
  gate2.close(side.stream());
  in.fill_(comm->rank() + 1.0);
  auto work2 = comm->allreduce(in, out);
  work2->wait();
  auto copy2 = out * 1.0;
  gate2.release();
  side.synchronize();
  CHECK(torch::allclose(copy2.cpu(), torch::full({1 << 20}, n * (n + 1) / 2.0)));

  // A tensor dropped right after issuing keeps its memory until the collective is done (the Work's
  // state holds it; recordStream keeps the caching allocator from handing its block out after).
  StreamGate gate3;
  gate3.close(side.stream());  // the collective waits for `side`: it cannot be done before release()
  void* dropped = nullptr;
  {
    auto temp = torch::full({1 << 18}, 1.0, torch::TensorOptions().device(device()));
    dropped = temp.data_ptr();
    comm->allreduce(temp);
  }
  auto again = torch::empty({1 << 18}, torch::TensorOptions().device(device()));  // same size, same stream
  CHECK(again.data_ptr() != dropped);
  gate3.release();
  side.synchronize();
  comm->barrier()->wait();
}

TEST_CASE("nccl_device_index names the NCCL communicator's GPU, and DataParallel refuses a model on another",
          "[gpu][nccl][ddp]") {
  auto comm = nccl();
  if (!comm) return;
  CHECK(lockstep::comm::nccl_device_index(*comm) == device().index());
  lockstep::comm::MpiCommunicator mpi;
  CHECK(lockstep::comm::nccl_device_index(mpi) == -1);
  if (lockstep::cuda_device_count() < 2) {
    WARN("the model on another GPU: skipped, this host has one GPU");
    return;
  }
  const int other = (device().index() + 1) % lockstep::cuda_device_count();
  lockstep::testing::SmallConvNet model;
  model->to(torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(other)));
  const std::string error = lockstep::testing::error_of([&] { lockstep::ddp::DataParallel dp(model, comm); });
  INFO(error);
  CHECK_THAT(error, Contains("the NCCL communicator on cuda:" + std::to_string(device().index())));
  CHECK(lockstep::testing::communicator_healthy());
}

TEST_CASE("StopVote over NCCL: posting never blocks the host; the codes come back `lag` posts later",
          "[gpu][nccl]") {
  auto comm = nccl();
  if (!comm) return;
  const int n = comm->size();
  c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(false, device().index());
  c10::cuda::CUDAStreamGuard on_side(side);
  lockstep::comm::StopVote vote(comm, device(), 2);
  StreamGate gate;
  gate.close(side.stream());  // the votes' kernels, all-gathers and copies queue up behind this
  const auto start = std::chrono::steady_clock::now();
  CHECK(vote.post(comm->rank() == n - 1 ? 10 : 0).empty());
  CHECK(vote.post(comm->rank() == 0 ? -1 : 0).empty());
  CHECK(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < 1.0);
  gate.release();
  const std::vector<std::int32_t> first = vote.post(0);  // waits for the first vote's copy, now released
  REQUIRE(first.size() == static_cast<size_t>(n));
  CHECK(first[n - 1] == 10);
  for (int r = 0; r + 1 < n; ++r) CHECK(first[r] == 0);
  const std::vector<std::int32_t> rest = vote.finish();
  CHECK(rest[0] == -1);
  comm->barrier()->wait();
}

TEST_CASE("StopVote over NCCL raises a timed-out all-gather's error instead of reading codes nobody wrote",
          "[gpu][nccl]") {
  if (!nccl()) return;
  lockstep::comm::NcclCommunicatorOptions o;
  o.device = device().index();
  o.timeout = std::chrono::milliseconds(1500);
  auto comm = lockstep::comm::make_nccl_communicator(o);
  c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(false, device().index());
  c10::cuda::CUDAStreamGuard on_side(side);
  lockstep::comm::StopVote vote(comm, device(), 1);
  StreamGate gate;
  gate.close(side.stream());  // the first vote's all-gather never starts: the watchdog aborts it
  CHECK(vote.post(7).empty());
  const auto start = std::chrono::steady_clock::now();
  // Reads the first vote: before, this spun until the gate opened (20 s), then returned whatever the
  // output held once the aborted communicator let the stream drain.
  try {
    vote.post(0);
    FAIL("the vote's timed-out all-gather was read as codes");
  } catch (const lockstep::Error& e) {
    CHECK_THAT(e.message(), Contains("allgather #0") && Contains("1500 ms"));
  }
  CHECK(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < 10.0);
  gate.release();
  side.synchronize();
}

TEST_CASE("blocking_wait: wait() and a barrier return only once the collective is done", "[gpu][nccl]") {
  if (!nccl()) return;
  lockstep::comm::NcclCommunicatorOptions o;
  o.device = device().index();
  o.blocking_wait = true;
  auto comm = lockstep::comm::make_nccl_communicator(o);
  c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(false, device().index());
  c10::cuda::CUDAStreamGuard on_side(side);
  // Each collective waits for `side`, held up until a thread opens the gate 300 ms later.
  auto held_wait = [&](const std::function<lockstep::comm::WorkPtr()>& issue) {
    StreamGate gate;
    gate.close(side.stream());
    auto work = issue();
    gate.release_after(std::chrono::milliseconds(300));
    const auto start = std::chrono::steady_clock::now();
    work->wait();
    const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    CHECK(waited >= 0.25);
    CHECK(work->is_completed());
  };
  auto t = torch::full({8}, comm->rank() + 1.0, torch::TensorOptions().device(device()));
  held_wait([&] { return comm->allreduce(t); });
  const int n = comm->size();
  CHECK(torch::allclose(t.cpu(), torch::full({8}, n * (n + 1) / 2.0)));
  held_wait([&] { return comm->barrier(); });
  side.synchronize();
}

TEST_CASE("a collective that outlives its timeout aborts the communicator with a clear error", "[gpu][nccl]") {
  if (!nccl()) return;
  lockstep::comm::NcclCommunicatorOptions o;
  o.device = device().index();
  o.timeout = std::chrono::milliseconds(1500);
  o.blocking_wait = true;
  auto comm = lockstep::comm::make_nccl_communicator(o);
  comm->allreduce(torch::ones({8}, torch::TensorOptions().device(device())))->wait();  // seq 0 works
  c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(false, device().index());
  c10::cuda::CUDAStreamGuard on_side(side);
  StreamGate gate;
  gate.close(side.stream());  // the next collective waits for this stream, which is held up
  auto t = torch::ones({8}, torch::TensorOptions().device(device()));
  auto work = comm->allreduce(t);
  const auto start = std::chrono::steady_clock::now();
  CHECK_THROWS_AS(work->wait(), lockstep::TimeoutError);
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  CHECK(waited < 10.0);
  CHECK_THROWS_WITH(work->wait(), Contains("allreduce #1") && Contains("rank " + std::to_string(comm->rank())) &&
                                      Contains("aborted") && Contains("1500 ms"));
  CHECK_THROWS_WITH(comm->allreduce(t), Contains("allreduce #1"));  // the communicator stays failed
  // CPU tensors too (they would go over MPI: Note [CPU tensors through NCCL]).
  CHECK_THROWS_WITH(comm->allreduce(torch::ones({2})), Contains("allreduce #1"));
  gate.release();
  side.synchronize();
}
