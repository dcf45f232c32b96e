// Multi-rank tests of the MPI communicator. Expected values come from closed forms over ranks.
#include <catch2/catch.hpp>
#include <torch/torch.h>
#include <dlfcn.h>
#include <sched.h>
#include <algorithm>
#include <cstdlib>
#include <vector>
#include <cmath>
#include <limits>

#include <mpi.h>

#include <thread>

#include "core/backend_choice.hpp"
#include "lockstep/comm/mpi_communicator.hpp"
#include "lockstep/core/error.hpp"
#include "support/dist.hpp"

using lockstep::comm::ReduceOp;

namespace {

// Sizes: empty, one element, a prime, and tens of MB (float32: 40 MB).
const std::vector<int64_t> kSizes = {0, 1, 7919, 10'000'003};

// Values that every dtype (bf16 included: 8 significant bits) holds exactly: rank + (i % 64).
torch::Tensor ramp(int64_t n, int rank, torch::ScalarType type) {
  return (torch::arange(n, torch::kLong).remainder(64) + rank).to(type);
}

bool equal_as_double(const torch::Tensor& a, const torch::Tensor& b) {
  return torch::equal(a.to(torch::kDouble), b.to(torch::kDouble));
}

}  // namespace

TEST_CASE("allreduce sums match the closed form for every dtype and size", "[comm]") {
  auto& comm = lockstep::testing::comm();
  const int n = comm.size();
  for (auto type : {torch::kFloat, torch::kDouble, torch::kHalf, torch::kBFloat16, torch::kInt, torch::kLong}) {
    for (int64_t size : kSizes) {
      if (size > 100'000 && (type == torch::kHalf || type == torch::kBFloat16 || type == torch::kDouble)) continue;
      INFO("dtype " << type << ", " << size << " elements");
      auto tensor = ramp(size, comm.rank(), type);
      comm.allreduce(tensor)->wait();
      // sum over r of (r + i%64) = n(n-1)/2 + n*(i%64)
      auto expected = torch::arange(size, torch::kLong).remainder(64) * n + n * (n - 1) / 2;
      CHECK(tensor.scalar_type() == type);
      CHECK(equal_as_double(tensor, expected));
    }
  }
}

TEST_CASE("allreduce min, max, product and average", "[comm]") {
  auto& comm = lockstep::testing::comm();
  const int n = comm.size();
  const int r = comm.rank();
  for (auto type : {torch::kFloat, torch::kDouble, torch::kHalf, torch::kBFloat16, torch::kInt, torch::kLong}) {
    INFO("dtype " << type);
    const int64_t size = 1031;
    auto base = torch::arange(size, torch::kLong).remainder(16);
    auto t = (base + r).to(type);
    comm.allreduce(t, {ReduceOp::Min})->wait();
    CHECK(equal_as_double(t, base));
    t = (base + r).to(type);
    comm.allreduce(t, {ReduceOp::Max})->wait();
    CHECK(equal_as_double(t, base + (n - 1)));
    // product over r of (r + 1) = n!
    t = torch::full({size}, r + 1, torch::kLong).to(type);
    comm.allreduce(t, {ReduceOp::Product})->wait();
    int64_t factorial = 1;
    for (int k = 2; k <= n; ++k) factorial *= k;
    CHECK(equal_as_double(t, torch::full({size}, factorial, torch::kLong)));
    if (torch::isFloatingType(type)) {
      // average over r of (r + i%16) * 2 = (n - 1) + 2 * (i%16): exact in every float type
      t = ((base + r) * 2).to(type);
      comm.allreduce(t, {ReduceOp::Average})->wait();
      CHECK(equal_as_double(t, base * 2 + (n - 1)));
    }
  }
}

TEST_CASE("allreduce min and max give every rank one result with a nan or a signed zero on one rank (Note [Min and "
          "max are symmetric])", "[comm]") {
  auto& comm = lockstep::testing::comm();
  const int n = comm.size();
  const int r = comm.rank();
  for (auto type : {torch::kFloat, torch::kDouble, torch::kHalf, torch::kBFloat16}) {
    for (const int64_t size : {int64_t{5}, int64_t{1} << 16}) {  // short and long messages: other algorithms
      INFO("dtype " << type << ", " << size << " elements");
      // Element 0: a nan on the last rank only. Element 1: -0 on rank 0, +0 elsewhere. The rest: r.
      auto input = torch::full({size}, static_cast<double>(r), torch::kDouble);
      if (r == n - 1) input[0] = std::numeric_limits<double>::quiet_NaN();
      input[1] = r == 0 ? -0.0 : 0.0;
      input = input.to(type);
      for (const auto op : {ReduceOp::Min, ReduceOp::Max}) {
        INFO(lockstep::comm::to_string(op));
        auto t = input.clone();
        comm.allreduce(t, {op})->wait();
        const auto result = t.to(torch::kDouble);
        CHECK(std::isnan(result[0].item<double>()));
        CHECK(result[1].item<double>() == 0.0);
        CHECK(std::signbit(result[1].item<double>()) == (op == ReduceOp::Min));
        CHECK(result[2].item<double>() == (op == ReduceOp::Min ? 0.0 : n - 1.0));
        // Bitwise the same on every rank.
        auto all = torch::empty({n * size}, t.options());
        comm.allgather(t, all)->wait();
        const auto bits = all.view({n, size}).to(torch::kDouble).nan_to_num(12345.0);
        for (int k = 1; k < n; ++k) CHECK(torch::equal(bits[k], bits[0]));
      }
    }
  }
}

TEST_CASE("a tensor re-pointed after its collective was issued: the collective uses the storage it was issued on "
          "(Note [Tensors as issued])", "[comm]") {
  auto& comm = lockstep::testing::comm();
  const int n = comm.size();
  // A large collective first keeps the progress thread busy, so the next one runs after set_data (in
  // practice always: 32 MB to reduce against a few microseconds; were the task to run first, the test
  // would pass on any code, never fail on correct code).
  auto busy = torch::ones({1 << 23});
  auto t = torch::full({4096}, 1.0f);
  const auto issued = t.detach();  // the storage the collective was issued on
  auto w_busy = comm.allreduce(busy);
  auto w = comm.allreduce(t);
  t.set_data(torch::zeros({2}, torch::kHalf));  // 4 bytes where the task would have written 16 KiB
  w_busy->wait();
  w->wait();
  CHECK(torch::equal(issued, torch::full({4096}, static_cast<float>(n))));
  CHECK(torch::equal(t, torch::zeros({2}, torch::kHalf)));  // the new data is not touched
}

TEST_CASE("checked collectives: ranks that issue different collectives get one error naming each rank's call, "
          "and the communicator stays in step (Note [Checked collectives])", "[comm]") {
  using Catch::Matchers::Contains;
  lockstep::comm::MpiCommunicatorOptions options;
  options.check_collectives = true;
  lockstep::comm::MpiCommunicator checked(options);
  const int n = checked.size();
  const int r = checked.rank();
  auto error_of_wait = [](const lockstep::comm::WorkPtr& work) {
    try {
      work->wait();
    } catch (const lockstep::Error& e) {
      return e.message();
    }
    return std::string("(no error)");
  };
  // Matched calls run as usual.
  auto t = torch::full({8}, 1.0f);
  checked.allreduce(t)->wait();
  CHECK(torch::equal(t, torch::full({8}, static_cast<float>(n))));
  // float16 against bfloat16: the same 16-bit words, reduced as garbage without the check.
  auto mixed = torch::ones({8}, r == 0 ? torch::kHalf : torch::kBFloat16);
  std::string error = error_of_wait(checked.allreduce(mixed));
  INFO(error);
  CHECK_THAT(error, Contains("allreduce #1: the ranks issued different collectives here (rank 0: allreduce sum float16 "
                             "x8; rank 1: allreduce sum bfloat16 x8") && Contains("none ran it"));
  // Sum against Average, a broadcast from different roots, and different sizes.
  lockstep::comm::AllreduceOptions op;
  op.op = r == 0 ? ReduceOp::Sum : ReduceOp::Average;
  CHECK_THAT(error_of_wait(checked.allreduce(torch::ones({4}), op)),
             Contains("rank 0: allreduce sum float32 x4; rank 1: allreduce average float32 x4"));
  lockstep::comm::BroadcastOptions root;
  root.root = r == 0 ? 0 : n - 1;
  CHECK_THAT(error_of_wait(checked.broadcast(torch::ones({3}), root)),
             Contains("rank 0: broadcast from rank 0 float32 x3; rank 1: broadcast from rank " + std::to_string(n - 1)));
  CHECK_THAT(error_of_wait(checked.allgather(torch::ones({r == 0 ? 2 : 3}), torch::empty({n * (r == 0 ? 2 : 3)}))),
             Contains("rank 0: allgather float32 x2 per rank; rank 1: allgather float32 x3 per rank"));
  // None of them ran: the next matched call pairs up.
  auto after = torch::full({5}, static_cast<float>(r + 1));
  checked.allreduce(after)->wait();
  CHECK(torch::equal(after, torch::full({5}, static_cast<float>(n * (n + 1) / 2))));
}

TEST_CASE("float16 average fits where the float16 sum would overflow (Note [float16 average])", "[comm]") {
  auto& comm = lockstep::testing::comm();
  const int n = comm.size();
  // Every rank holds 40000 + 1000 r: the sum (>= 80000) is past float16's 65504, the average is not.
  const double want = 40000 + 1000 * (n - 1) / 2.0;
  auto near = [&](const torch::Tensor& t) {
    return torch::allclose(t.to(torch::kDouble), torch::full({t.numel()}, want, torch::kDouble), 2e-3, 0);
  };
  const auto mine = torch::full({12 * n}, 40000 + 1000 * comm.rank(), torch::kHalf);
  auto t = mine.clone();
  comm.allreduce(t, {ReduceOp::Average})->wait();
  CHECK(near(t));
  auto output = torch::empty_like(mine);
  auto input = mine.clone();
  comm.allreduce(input, output, {ReduceOp::Average})->wait();
  CHECK(near(output));
  CHECK(torch::equal(input, mine));  // out of place: the input is left alone
  auto slice = torch::empty({12}, torch::kHalf);
  comm.reduce_scatter(input, slice, {ReduceOp::Average})->wait();
  CHECK(near(slice));
  CHECK(torch::equal(input, mine));
  auto scratch = mine.clone();
  comm.reduce_scatter(scratch, scratch.narrow(0, 12 * comm.rank(), 12), {ReduceOp::Average})->wait();
  CHECK(near(scratch.narrow(0, 12 * comm.rank(), 12)));
  // Sum still overflows, as float16 does.
  t = mine.clone();
  comm.allreduce(t)->wait();
  CHECK(torch::isinf(t).all().item<bool>());
}

TEST_CASE("an average into a parameter or an inference tensor is the average (Note [Results past autograd])",
          "[comm]") {
  // Model averaging: the division runs on the progress thread, where grad mode is on whatever the
  // caller set. Before, it raised "a leaf Variable that requires grad..." and left the sum.
  auto& comm = lockstep::testing::comm();
  const int n = comm.size();
  const double want = (n - 1) / 2.0 + 1.0;  // ranks hold r + 1
  for (const auto dtype : {torch::kFloat, torch::kHalf}) {
    INFO(dtype);
    torch::Tensor parameter = torch::full({5}, comm.rank() + 1.0, dtype).requires_grad_();
    {
      torch::NoGradGuard no_grad;
      comm.allreduce(parameter, {ReduceOp::Average})->wait();
      CHECK(torch::allclose(parameter.to(torch::kDouble), torch::full({5}, want, torch::kDouble), 1e-3, 0));
      torch::Tensor output = torch::zeros({5}, dtype).requires_grad_();
      comm.allreduce(torch::full({5}, comm.rank() + 1.0, dtype), output, {ReduceOp::Average})->wait();
      CHECK(torch::allclose(output.to(torch::kDouble), torch::full({5}, want, torch::kDouble), 1e-3, 0));
    }
    torch::Tensor inference;
    {
      c10::InferenceMode inference_mode;
      inference = torch::full({5}, comm.rank() + 1.0, dtype);
    }
    comm.allreduce(inference, {ReduceOp::Average})->wait();
    CHECK(torch::allclose(inference.to(torch::kDouble), torch::full({5}, want, torch::kDouble), 1e-3, 0));
  }
}

TEST_CASE("out-of-place allreduce leaves the input untouched", "[comm]") {
  auto& comm = lockstep::testing::comm();
  const int n = comm.size();
  for (int64_t size : kSizes) {
    auto input = ramp(size, comm.rank(), torch::kFloat);
    auto copy = input.clone();
    auto output = torch::full_like(input, -1);
    comm.allreduce(input, output)->wait();
    CHECK(torch::equal(input, copy));
    CHECK(equal_as_double(output, torch::arange(size, torch::kLong).remainder(64) * n + n * (n - 1) / 2));
  }
}

TEST_CASE("broadcast from every root", "[comm]") {
  auto& comm = lockstep::testing::comm();
  for (int root = 0; root < comm.size(); ++root) {
    for (int64_t size : {int64_t(0), int64_t(1), int64_t(7919), int64_t(3'000'017)}) {
      for (auto type : {torch::kFloat, torch::kBFloat16, torch::kLong}) {
        auto t = ramp(size, comm.rank() * 3, type);
        comm.broadcast(t, {root})->wait();
        CHECK(torch::equal(t, ramp(size, root * 3, type)));
      }
    }
  }
}

TEST_CASE("allgather, out of place and in place", "[comm]") {
  auto& comm = lockstep::testing::comm();
  const int n = comm.size();
  for (int64_t size : {int64_t(0), int64_t(1), int64_t(7919), int64_t(2'500'009)}) {
    auto input = ramp(size, comm.rank(), torch::kFloat);
    auto output = torch::empty({n * size});
    comm.allgather(input, output)->wait();
    auto inplace = torch::full({n * size}, -1.0f);
    auto mine = inplace.narrow(0, comm.rank() * size, size);
    mine.copy_(input);
    comm.allgather(mine, inplace)->wait();
    for (int r = 0; r < n; ++r) {
      CHECK(torch::equal(output.narrow(0, r * size, size), ramp(size, r, torch::kFloat)));
      CHECK(torch::equal(inplace.narrow(0, r * size, size), ramp(size, r, torch::kFloat)));
    }
  }
}

TEST_CASE("reduce_scatter, out of place and in place, sum and average", "[comm]") {
  auto& comm = lockstep::testing::comm();
  const int n = comm.size();
  const int r = comm.rank();
  for (int64_t size : {int64_t(0), int64_t(1), int64_t(7919), int64_t(1'000'003)}) {
    for (auto type : {torch::kFloat, torch::kHalf, torch::kLong}) {
      INFO("dtype " << type << ", " << size << " elements per rank");
      auto input = ramp(n * size, r, type);
      auto output = torch::empty({size}, type);
      comm.reduce_scatter(input, output)->wait();
      // slice r of input on rank q holds q + ((r*size + k) % 64); summed over q.
      auto expected = (torch::arange(size, torch::kLong) + r * size).remainder(64) * n + n * (n - 1) / 2;
      CHECK(equal_as_double(output, expected));
      auto scratch = ramp(n * size, r, type);
      auto slice = scratch.narrow(0, r * size, size);
      comm.reduce_scatter(scratch, slice)->wait();
      CHECK(equal_as_double(slice, expected));
    }
    auto input = (ramp(n * size, r, torch::kDouble) * 2);
    auto output = torch::empty({size}, torch::kDouble);
    comm.reduce_scatter(input, output, {ReduceOp::Average})->wait();
    auto expected = (torch::arange(size, torch::kLong) + r * size).remainder(64) * 2 + (n - 1);
    CHECK(equal_as_double(output, expected));
  }
}

TEST_CASE("many outstanding works complete, in issue order", "[comm]") {
  auto& comm = lockstep::testing::comm();
  const int n = comm.size();
  constexpr int kWorks = 64;
  std::vector<torch::Tensor> tensors;
  std::vector<lockstep::comm::WorkPtr> works;
  for (int k = 0; k < kWorks; ++k) {
    tensors.push_back(torch::full({1000 + 997 * k}, double(comm.rank() + k), torch::kDouble));
    works.push_back(comm.allreduce(tensors.back()));
  }
  for (int k = kWorks - 1; k >= 0; --k) works[k]->wait();  // waited in reverse on purpose
  for (int k = 0; k < kWorks; ++k) {
    CHECK(works[k]->is_completed());
    CHECK(torch::equal(tensors[k], torch::full_like(tensors[k], double(n * (n - 1) / 2 + n * k))));
    if (k > 0) {
      CHECK(works[k]->info().seq == works[k - 1]->info().seq + 1);
      CHECK(works[k]->start_time() >= works[k - 1]->end_time());
    }
  }
  comm.barrier()->wait();
}

TEST_CASE("work is asynchronous: the caller runs while a collective is in flight", "[comm]") {
  auto& comm = lockstep::testing::comm();
  // Rank 0 joins the collective late; the other ranks' allreduce() must still return at once.
  auto t = torch::ones({1000});
  if (comm.rank() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const auto before = std::chrono::steady_clock::now();
  auto work = comm.allreduce(t);
  const auto issue_time = std::chrono::steady_clock::now() - before;
  CHECK(issue_time < std::chrono::milliseconds(50));
  work->wait();
  CHECK(torch::equal(t, torch::full({1000}, float(comm.size()))));
}

TEST_CASE("wrong input is rejected before anything is sent", "[comm]") {
  auto& comm = lockstep::testing::comm();
  using Catch::Matchers::Contains;
  auto matrix = torch::ones({4, 6});
  // Each names this rank: a wrong input is often one rank's alone.
  const std::string me = "rank " + std::to_string(comm.rank());
  CHECK_THROWS_WITH(comm.allreduce(matrix.t()), Contains("contiguous") && Contains(me));
  CHECK_THROWS_WITH(comm.allreduce(torch::ones({4}), torch::ones({5})), Contains("sizes") && Contains(me));
  CHECK_THROWS_WITH(comm.allreduce(torch::ones({4}), torch::ones({4}, torch::kDouble)), Contains("dtype") && Contains(me));
  CHECK_THROWS_WITH(comm.allreduce(torch::ones({4}, torch::kBool)), Contains("not supported") && Contains(me));
  CHECK_THROWS_WITH(comm.allreduce(torch::ones({4}, torch::kInt), {ReduceOp::Average}), Contains("floating-point") && Contains(me));
  CHECK_THROWS_WITH(comm.allreduce(torch::Tensor()), Contains("undefined") && Contains(me));
  CHECK_THROWS_WITH(comm.allreduce(torch::empty({4}, torch::device(torch::kMeta))), Contains("this communicator takes cpu") && Contains(me));
  CHECK_THROWS_WITH(comm.broadcast(torch::ones({4}), {comm.size()}), Contains("root " + std::to_string(comm.size()) + " is out of range") && Contains(me));
  CHECK_THROWS_WITH(comm.broadcast(torch::ones({4}), {-1}), Contains("out of range") && Contains(me));
  CHECK_THROWS_WITH(comm.allgather(torch::ones({4}), torch::ones({4 * comm.size() + 1})), Contains("elements in the gathered tensor") && Contains(me));
  CHECK_THROWS_WITH(comm.reduce_scatter(torch::ones({4 * comm.size()}), torch::ones({5})), Contains("elements in the gathered tensor") && Contains(me));
  CHECK_THROWS_WITH(comm.allgather(torch::ones({4}), torch::ones({4 * comm.size()}, torch::kDouble)), Contains("dtypes differ") && Contains(me));
  auto buffer = torch::ones({8});
  CHECK_THROWS_WITH(comm.allreduce(buffer.narrow(0, 0, 4), buffer.narrow(0, 2, 4)), Contains("overlap") && Contains(me));
  // Nothing was sent: the next collective still lines up on every rank.
  auto t = torch::ones({3});
  comm.allreduce(t)->wait();
  CHECK(torch::equal(t, torch::full({3}, float(comm.size()))));
}

TEST_CASE("a collective that does not complete in time raises an error naming it", "[comm]") {
  auto& comm = lockstep::testing::comm();
  using Catch::Matchers::Contains;
  auto t = torch::ones({17});
  if (comm.rank() == 0) {
    // The other ranks join late, after rank 0 has given up waiting once.
    auto work = comm.allreduce(t);
    const auto seq = work->info().seq;
    CHECK_THROWS_AS(work->wait(std::chrono::milliseconds(100)), lockstep::TimeoutError);
    CHECK_THROWS_WITH(work->wait(std::chrono::milliseconds(1)),
                      Contains("allreduce #" + std::to_string(seq)) && Contains("float32, 17 elements") &&
                          Contains("rank 0 of " + std::to_string(comm.size())) && Contains("did not complete"));
    work->wait();  // the late ranks arrive: now it completes
  } else {
    std::this_thread::sleep_for(std::chrono::milliseconds(800));
    comm.allreduce(t)->wait();
  }
  CHECK(torch::equal(t, torch::full({17}, float(comm.size()))));
}

TEST_CASE("an error inside a work is rethrown from every wait", "[comm]") {
  auto& comm = lockstep::testing::comm();
  using Catch::Matchers::Contains;
  auto work = lockstep::comm::then(comm.barrier(), [] { throw std::runtime_error("cast back failed"); });
  CHECK_THROWS_WITH(work->wait(), Contains("cast back failed"));
  CHECK_THROWS_WITH(work->wait(), Contains("cast back failed"));
}

TEST_CASE("the runtime knows the world", "[runtime]") {
  auto& runtime = lockstep::testing::runtime();
  int size = 0, rank = -1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  CHECK(runtime.size() == size);
  CHECK(runtime.rank() == rank);
  CHECK(runtime.world().local_rank >= 0);
  CHECK(runtime.world().local_rank < runtime.world().local_size);
  CHECK(runtime.world().local_size == size);  // every rank of the test runs on this host
  CHECK_FALSE(runtime.world().host.empty());
  CHECK(runtime.world().device.is_cuda() == torch::cuda::is_available());
  CHECK(runtime.communicator()->backend() == runtime.backend());
  CHECK_FALSE(runtime.backend_reason().empty());
  if (!torch::cuda::is_available()) CHECK(runtime.backend() == "mpi");
  CHECK(runtime.communicator().get() == runtime.communicator().get());  // one communicator, not one per call
  CHECK(runtime.communicator()->rank() == rank);
  CHECK(runtime.communicator()->size() == size);
  CHECK(torch::get_num_threads() >= 1);
  // Note [Threads from the CPUs a rank may use]: where every rank may use the same CPUs (the tests'
  // mpirun binds none), each runs their count over the ranks; under `taskset -c 0` that is 1, whatever
  // the host's cores (dist.runtime_one_cpu).
  cpu_set_t mine;
  CPU_ZERO(&mine);
  REQUIRE(sched_getaffinity(0, sizeof(mine), &mine) == 0);
  std::vector<cpu_set_t> all(static_cast<std::size_t>(size));
  MPI_Allgather(&mine, sizeof(cpu_set_t), MPI_BYTE, all.data(), sizeof(cpu_set_t), MPI_BYTE, MPI_COMM_WORLD);
  const bool same_cpus = std::all_of(all.begin(), all.end(), [&mine](const cpu_set_t& c) { return CPU_EQUAL(&c, &mine); });
  bool openmp_binds = false;  // then the main thread's mask is one place's, and the runtime counts the host's
  for (const char* name : {"OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY"}) {
    openmp_binds = openmp_binds || std::getenv(name) != nullptr;
  }
  if (same_cpus && !openmp_binds) {
    // Note [CPU quota]: a CPU limit over the ranks' cgroup (all of the test's ranks share it) caps the
    // count; none on the project's machines, one in dist.runtime_cpu_quota.
    const double limit = lockstep::detail::cgroup_cpu_limit().cpus;
    const int quota = limit > 0.0 ? std::max(1, static_cast<int>(std::ceil(limit - 1e-9))) : CPU_COUNT(&mine);
    CHECK(torch::get_num_threads() == std::max(1, std::min(CPU_COUNT(&mine), quota) / size));
  } else {
    WARN("the ranks may run on different CPUs (mpirun bound them): the default thread count is not checked");
  }
  if (const char* expected = std::getenv("LOCKSTEP_TEST_EXPECT_THREADS")) {
    CHECK(torch::get_num_threads() == std::atoi(expected));
  }
  // Note [BLAS threads]: an OpenBLAS in the process runs with the runtime's thread count.
  using GetThreads = int (*)();
  auto openblas_threads = reinterpret_cast<GetThreads>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"));
  if (openblas_threads != nullptr && std::getenv("OPENBLAS_NUM_THREADS") == nullptr) {
    CHECK(openblas_threads() == torch::get_num_threads());
  }
}
