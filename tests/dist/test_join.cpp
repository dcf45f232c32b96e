// ddp::Join: data parallelism on uneven inputs. Each rank trains on its own number of batches (none
// included); the ranks that finish early shadow the others' steps. Every test compares with an
// oracle that every rank computes locally: one process that, at each step, sums the gradients of the
// ranks that still have a batch and divides by the world size (or by their number), with buffers
// taken from the lowest such rank's forward.
#include <torch/torch.h>
#include <catch2/catch.hpp>

#include <functional>
#include <string>
#include <vector>

#include "core/torch_compat.hpp"
#include "lockstep/ddp/data_parallel.hpp"
#include "lockstep/ddp/join.hpp"
#include "lockstep/ddp/powersgd.hpp"
#include "lockstep/ddp/sync_batch_norm.hpp"
#include "lockstep/ddp/zero_optimizer.hpp"
#include "support/dist.hpp"
#include "support/fixtures.hpp"

namespace {

using lockstep::testing::bitwise_equal;
using Catch::Matchers::Contains;
using lockstep::ddp::DataParallel;
using lockstep::ddp::DataParallelOptions;
using lockstep::ddp::Join;
using lockstep::ddp::JoinOptions;
using lockstep::ddp::JoinResult;
using lockstep::testing::comm;
using lockstep::testing::comm_ptr;
using lockstep::testing::communicator_healthy;
using lockstep::testing::error_of;

// Linear -> [BatchNorm1d] -> tanh -> Linear, in float64 so the oracle's different summation order
// stays within 1e-12.
struct NetImpl : torch::nn::Module {
  explicit NetImpl(bool batch_norm) {
    fc1 = register_module("fc1", torch::nn::Linear(6, 8));
    if (batch_norm) bn = register_module("bn", torch::nn::BatchNorm1d(8));
    fc2 = register_module("fc2", torch::nn::Linear(8, 3));
  }
  torch::Tensor forward(torch::Tensor x) {
    x = fc1(x);
    if (bn) x = bn(x);
    return fc2(torch::tanh(x));
  }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
  torch::nn::BatchNorm1d bn{nullptr};
};
TORCH_MODULE(Net);

Net make_net(bool batch_norm) {
  torch::manual_seed(5);
  Net net(batch_norm);
  net->to(torch::kFloat64);
  return net;
}

// Rank r's batch at step s: the same on every rank that asks.
std::pair<torch::Tensor, torch::Tensor> batch(int rank, int step) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1000 * rank + step + 1);
  torch::Tensor x = at::randn({5, 6}, gen, torch::kFloat64);
  torch::Tensor y = at::randint(0, 3, {5}, gen, torch::kLong);
  return {x, y};
}

torch::Tensor loss_of(Net& net, int rank, int step) {
  auto [x, y] = batch(rank, step);
  return torch::nn::functional::cross_entropy(net->forward(x), y);
}

using OptimizerFactory = std::function<std::shared_ptr<torch::optim::Optimizer>(std::vector<torch::Tensor>)>;

OptimizerFactory sgd() {
  return [](std::vector<torch::Tensor> params) {
    return std::make_shared<torch::optim::SGD>(params, torch::optim::SGDOptions(0.1).momentum(0.9).weight_decay(1e-3));
  };
}

std::vector<torch::Tensor> state(torch::nn::Module& m) {
  std::vector<torch::Tensor> out;
  for (const auto& p : m.parameters()) out.push_back(p.detach().clone());
  for (const auto& b : m.buffers()) out.push_back(b.detach().clone());
  return out;
}

std::vector<torch::Tensor> momenta(torch::optim::Optimizer& opt, torch::nn::Module& m) {
  std::vector<torch::Tensor> out;
  for (const auto& p : m.parameters()) {
    const auto& states = opt.state();
    auto it = states.find(lockstep::compat::optimizer_state_key<std::decay_t<decltype(states)>>(p));
    out.push_back(it == states.end()
                      ? torch::Tensor()
                      : static_cast<torch::optim::SGDParamState&>(*it->second).momentum_buffer().clone());
  }
  return out;
}

bool close(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].defined() != b[i].defined()) return false;
    if (a[i].defined() && !torch::allclose(a[i], b[i], 1e-12, 1e-12)) return false;
  }
  return true;
}

// The oracle: one process running every rank's steps. Returns the final state (parameters, then
// buffers) and the optimizer's momenta.
struct Oracle {
  std::vector<torch::Tensor> state;
  std::vector<torch::Tensor> momenta;
};

Oracle oracle(const std::vector<int>& batches, bool batch_norm, bool divide_by_world) {
  Net net = make_net(batch_norm);
  auto opt = sgd()(net->parameters());
  const int world = static_cast<int>(batches.size());
  int steps = 0;
  for (int b : batches) steps = std::max(steps, b);
  for (int s = 0; s < steps; ++s) {
    std::vector<int> active;
    for (int r = 0; r < world; ++r) {
      if (batches[r] > s) active.push_back(r);
    }
    std::vector<torch::Tensor> before = state(*net);
    std::vector<torch::Tensor> sum, root_buffers;
    for (int r : active) {
      {
        torch::NoGradGuard no_grad;  // every rank's forward starts from the same buffers
        auto buffers = net->buffers();
        for (size_t i = 0; i < buffers.size(); ++i) buffers[i].copy_(before[net->parameters().size() + i]);
      }
      opt->zero_grad();
      loss_of(net, r, s).backward();
      for (size_t i = 0; i < net->parameters().size(); ++i) {
        torch::Tensor g = net->parameters()[i].grad().clone();
        if (sum.size() <= i) sum.push_back(g); else sum[i] += g;
      }
      if (r == active.front()) root_buffers = state(*net);
    }
    {
      torch::NoGradGuard no_grad;
      auto params = net->parameters();
      for (size_t i = 0; i < params.size(); ++i)
        params[i].mutable_grad() = sum[i] / (divide_by_world ? world : static_cast<int>(active.size()));
      auto buffers = net->buffers();
      for (size_t i = 0; i < buffers.size(); ++i) buffers[i].copy_(root_buffers[params.size() + i]);
    }
    opt->step();
  }
  return {state(*net), momenta(*opt, *net)};
}

struct Outcome {
  std::vector<torch::Tensor> before_finish;  // the state as finish() began
  std::vector<torch::Tensor> state;
  std::vector<torch::Tensor> momenta;
  JoinResult result;
};

// This rank's side of a job in which rank r has batches[r] batches.
Outcome train(const std::vector<int>& batches, bool batch_norm, JoinOptions options, bool shadow,
              DataParallelOptions dp_options = {}, bool zero = false) {
  Net net = make_net(batch_norm);
  DataParallel dp(net, comm_ptr(), dp_options);
  std::shared_ptr<torch::optim::Optimizer> opt;
  if (zero) {
    opt = std::make_shared<lockstep::ddp::ZeroRedundancyOptimizer>(
        net->parameters(), comm_ptr(),
        [](std::vector<torch::Tensor> shard) -> std::unique_ptr<torch::optim::Optimizer> {
          return std::make_unique<torch::optim::SGD>(shard,
                                                     torch::optim::SGDOptions(0.1).momentum(0.9).weight_decay(1e-3));
        });
  } else {
    opt = sgd()(net->parameters());
  }
  const int rank = comm().rank();
  Outcome out;
  Join join(dp, options);
  for (int s = 0; s < batches[rank]; ++s) {
    opt->zero_grad();
    loss_of(net, rank, s).backward();
    opt->step();
  }
  std::function<void()> step;
  if (shadow) step = [&] { opt->step(); };
  out.before_finish = state(*net);
  out.result = join.finish(step);
  out.state = state(*net);
  if (!zero) out.momenta = momenta(*opt, *net);
  return out;
}

// Uneven per-rank batch counts for this world size: rank 0 has the most, rank 1 the fewest.
std::vector<int> uneven(int world) {
  std::vector<int> b(world);
  for (int r = 0; r < world; ++r) b[r] = r == 0 ? world + 1 : r == 1 ? 1 : r + 1;
  return b;
}

int max_of(const std::vector<int>& b) { return *std::max_element(b.begin(), b.end()); }

}  // namespace

TEST_CASE("Join: uneven inputs train as one process summing the ranks that still have a batch", "[join]") {
  const int world = comm().size();
  const int rank = comm().rank();
  const std::vector<int> batches = uneven(world);
  for (bool divide_by_world : {true, false}) {
    INFO("divide_by_initial_world_size " << divide_by_world);
    JoinOptions options;
    options.divide_by_initial_world_size = divide_by_world;
    DataParallelOptions one_per_bucket;  // several buckets, so their order matters
    one_per_bucket.bucket_cap_mb = 0;
    one_per_bucket.first_bucket_cap_mb = 0;
    const Outcome got = train(batches, /*batch_norm=*/false, options, /*shadow=*/true, one_per_bucket);
    const Oracle want = oracle(batches, false, divide_by_world);
    CHECK(got.result.shadowed_steps == max_of(batches) - batches[rank]);
    CHECK(got.result.source_rank == 0);  // rank 0 has the most batches
    CHECK(close(got.state, want.state));
    // The shadow step kept the optimizer state of the ranks that finished early in step too.
    CHECK(close(got.momenta, want.momenta));
  }
}

TEST_CASE("Join: without a shadow step the model still ends equal, from a rank that trained last", "[join]") {
  const int world = comm().size();
  const int rank = comm().rank();
  // The last rank has the most batches, rank 0 none: buffers and the final model must come from the
  // lowest rank still training, never from rank 0.
  std::vector<int> batches(world);
  for (int r = 0; r < world; ++r) batches[r] = r == 0 ? 0 : r + 1;
  const Outcome got = train(batches, /*batch_norm=*/true, {}, /*shadow=*/false);
  const Oracle want = oracle(batches, true, true);
  CHECK(got.result.source_rank == world - 1);
  CHECK(got.result.shadowed_steps == max_of(batches) - batches[rank]);
  CHECK(close(got.state, want.state));  // parameters and batch norm statistics
  if (rank == world - 1) CHECK(close(got.momenta, want.momenta));
  if (rank == 0) {
    for (const auto& m : got.momenta) CHECK_FALSE(m.defined());  // it never stepped: the caveat of no shadow step
  }
}

TEST_CASE("Join with broadcast_buffers off: finish() shares the parameters and leaves each rank its own buffers",
          "[join]") {
  const int rank = comm().rank();
  const std::vector<int> batches = uneven(comm().size());
  DataParallelOptions local_buffers;
  local_buffers.broadcast_buffers = false;
  const Outcome got = train(batches, /*batch_norm=*/true, {}, /*shadow=*/false, local_buffers);
  // Batch norm in training mode normalises with the batch's statistics, so the parameters do not
  // depend on the running statistics: they are the oracle's.
  const Oracle want = oracle(batches, true, true);
  const size_t params = make_net(true)->parameters().size();
  REQUIRE(got.state.size() > params);
  CHECK(got.result.source_rank == 0);
  CHECK(close({got.state.begin(), got.state.begin() + params}, {want.state.begin(), want.state.begin() + params}));
  // The running statistics are what this rank's own forwards left (rank 1, with one batch, would
  // otherwise get rank 0's).
  CHECK(bitwise_equal({got.state.begin() + params, got.state.end()},
                      {got.before_finish.begin() + params, got.before_finish.end()}));
  if (rank == 1) {
    CHECK_FALSE(close({got.state.begin() + params, got.state.end()}, {want.state.begin() + params, want.state.end()}));
  }
}

TEST_CASE("Join: even inputs give bitwise the run without Join, batch norm buffers included", "[join]") {
  const int rank = comm().rank();
  std::vector<int> batches(comm().size(), 3);
  const Outcome joined = train(batches, /*batch_norm=*/true, {}, /*shadow=*/true);
  CHECK(joined.result.shadowed_steps == 0);
  CHECK(joined.result.source_rank == 0);

  Net net = make_net(true);
  DataParallel dp(net, comm_ptr());
  auto opt = sgd()(net->parameters());
  for (int s = 0; s < 3; ++s) {
    opt->zero_grad();
    loss_of(net, rank, s).backward();
    opt->step();
  }
  CHECK(bitwise_equal(joined.state, state(*net)));
}

TEST_CASE("Join: a sharded optimizer steps on the ranks that finished early (its step is collective)", "[join]") {
  const std::vector<int> batches = uneven(comm().size());
  const Outcome got = train(batches, false, {}, /*shadow=*/true, {}, /*zero=*/true);
  CHECK(close(got.state, oracle(batches, false, true).state));
}

TEST_CASE("Join: a PowerSGD hook keeps its collectives in step with the ranks that finished", "[join]") {
  const int world = comm().size();
  const int rank = comm().rank();
  lockstep::ddp::PowerSGDOptions ps;
  ps.start_iteration = 1;  // a plain step, then compressed ones
  ps.min_compression_rate = 1.0;
  DataParallelOptions o;
  o.comm_hook = lockstep::ddp::powersgd_hook(ps);
  const std::vector<int> batches = uneven(world);
  const Outcome got = train(batches, false, {}, /*shadow=*/true, o);
  CHECK(got.result.shadowed_steps == max_of(batches) - batches[rank]);
  for (const auto& p : got.state) CHECK(torch::isfinite(p).all().item<bool>());

  // The values: the same job without Join, where a rank out of batches takes part with a zero
  // gradient (its loss times 0), is what a joined rank's shadow step feeds the hook (its residual
  // included): the parameters and momenta must match. A fresh hook, whose PowerSGD state is its own.
  Net net = make_net(false);
  DataParallelOptions fresh;
  fresh.comm_hook = lockstep::ddp::powersgd_hook(ps);
  DataParallel dp(net, comm_ptr(), fresh);
  auto opt = sgd()(net->parameters());
  for (int s = 0; s < max_of(batches); ++s) {
    opt->zero_grad();
    const torch::Tensor loss = loss_of(net, rank, std::max(0, std::min(s, batches[rank] - 1)));
    (s < batches[rank] ? loss : loss * 0).backward();
    opt->step();
  }
  CHECK(close(got.state, state(*net)));
  CHECK(close(got.momenta, momenta(*opt, *net)));
  CHECK(communicator_healthy());
}

TEST_CASE("Join with throw_on_early_termination: every rank raises, naming who ran out", "[join]") {
  const int world = comm().size();
  std::vector<int> batches(world, 2);
  batches[1] = 1;
  JoinOptions options;
  options.throw_on_early_termination = true;
  const std::string error = error_of([&] { train(batches, false, options, true); });
  INFO(error);
  CHECK_THAT(error, Contains("uneven inputs: rank(s) 1 ran out of inputs"));
  CHECK_THAT(error, Contains("synchronised backward 1"));
  CHECK(communicator_healthy());

  // Even inputs under the same option: no error.
  std::vector<int> even(world, 2);
  CHECK(error_of([&] { train(even, false, options, true); }).empty());
}

TEST_CASE("Join refuses SyncBatchNorm and a second Join", "[join]") {
  struct WithSyncBn : torch::nn::Module {
    WithSyncBn() {
      conv = register_module("conv", torch::nn::Conv2d(1, 2, 3));
      bn = register_module("bn", lockstep::ddp::SyncBatchNorm(2));
    }
    torch::nn::Conv2d conv{nullptr};
    lockstep::ddp::SyncBatchNorm bn{nullptr};
  };
  auto model = std::make_shared<WithSyncBn>();
  DataParallelOptions o;
  o.sync_batch_norm = true;
  {
    DataParallel dp(model, comm_ptr(), o);
    CHECK_THROWS_WITH(Join(dp), Contains("SyncBatchNorm"));
  }
  {
    // Attached by hand after DataParallel was built without them: as collective (it was let through,
    // and a training rank's all-gather met a joined rank's join all-gather).
    DataParallel dp(model, comm_ptr());
    lockstep::ddp::attach_sync_batch_norm(*model, comm_ptr());
    CHECK_THROWS_WITH(Join(dp), Contains("the model has 1 synchronised SyncBatchNorm layer(s)"));
    lockstep::ddp::detach_sync_batch_norm(*model);
    Join join(dp);  // per-rank batch norm again
    join.finish();
  }
  Net net = make_net(false);
  DataParallel dp(net, comm_ptr());
  Join join(dp);
  CHECK_THROWS_WITH(Join(dp), Contains("a Join is already active"));
  join.finish();
  CHECK_THROWS_WITH(join.finish(), Contains("called twice"));
  CHECK(communicator_healthy());
}

namespace {

struct Stopped {
  Outcome outcome;
  int own_steps = 0;                     // steps this rank trained before it stopped or ran out
  bool seen_in_loop = false;             // stop_requested() when the loop broke
  std::vector<std::int32_t> in_finish;   // stop_codes() as the shadow step saw them (joined ranks)
  std::vector<std::int32_t> after;       // stop_codes() after finish()
};

// Note [Stop in a Join]: rank r has batches[r] batches; `code_at(rank, own_steps_done, joined)` is
// this rank's stop code for the step about to start. The loop breaks when the Join says stop.
Stopped train_with_stop(const std::vector<int>& batches,
                        const std::function<std::int32_t(int, int, bool)>& code_at) {
  Net net = make_net(false);
  DataParallel dp(net, comm_ptr());
  auto opt = sgd()(net->parameters());
  const int rank = comm().rank();
  Stopped out;
  bool joined = false;
  JoinOptions options;
  options.stop_code = [&] { return code_at(rank, out.own_steps, joined); };
  Join join(dp, options);
  for (int s = 0; s < batches[rank]; ++s) {
    opt->zero_grad();
    loss_of(net, rank, s).backward();
    opt->step();
    ++out.own_steps;
    if (join.stop_requested()) {
      out.seen_in_loop = true;
      break;
    }
  }
  joined = true;
  out.outcome.result = join.finish([&] {
    opt->step();
    out.in_finish = join.stop_codes();
  });
  out.outcome.state = state(*net);
  out.after = join.stop_codes();
  return out;
}

}  // namespace

TEST_CASE("Join: a stop code from a training rank stops every rank after the same step", "[join]") {
  const int world = comm().size();
  const int rank = comm().rank();
  const std::vector<int> batches = uneven(world);  // rank 0 trains the longest, rank 1 one step
  // Rank 0 asks to stop as its second step starts: the ranks still training break after that step.
  const Stopped got = train_with_stop(batches, [](int r, int done, bool) { return r == 0 && done >= 1 ? 7 : 0; });
  std::vector<int> truncated(batches);
  for (int& b : truncated) b = std::min(b, 2);
  CHECK(got.own_steps == truncated[rank]);
  CHECK(got.seen_in_loop == (batches[rank] >= 2));  // rank 1 ran out after step 1, before the stop
  std::vector<std::int32_t> want(world, 0);
  want[0] = 7;
  CHECK(got.after == want);
  CHECK(got.outcome.result.stop_codes == want);
  CHECK(got.outcome.result.shadowed_steps == 2 - truncated[rank]);
  // The model is the one of a job whose inputs ended at that step.
  CHECK(close(got.outcome.state, oracle(truncated, false, true).state));
  CHECK(communicator_healthy());
}

TEST_CASE("Join: a stop code from a joined rank reaches the ranks still training in the next step", "[join]") {
  const int world = comm().size();
  const int rank = comm().rank();
  const std::vector<int> batches = uneven(world);  // rank 1: one step, then it shadows
  const Stopped got = train_with_stop(batches, [](int r, int, bool joined) { return r == 1 && joined ? 9 : 0; });
  // Rank 1's first shadow step is step 2: every rank still training stops after it.
  std::vector<int> truncated(batches);
  for (int& b : truncated) b = std::min(b, 2);
  CHECK(got.own_steps == truncated[rank]);
  std::vector<std::int32_t> want(world, 0);
  want[1] = 9;
  CHECK(got.after == want);
  if (rank == 1) CHECK(got.in_finish == want);  // its shadow step saw its own code come back
  CHECK(close(got.outcome.state, oracle(truncated, false, true).state));

  // Without a stop code, the same job runs to its end, and no rank sees a stop.
  const Stopped plain = train_with_stop(batches, [](int, int, bool) { return 0; });
  CHECK(plain.own_steps == batches[rank]);
  CHECK_FALSE(plain.seen_in_loop);
  CHECK(plain.after == std::vector<std::int32_t>(world, 0));
  CHECK(close(plain.outcome.state, oracle(batches, false, true).state));
}

TEST_CASE("Join: on a joined rank, a parameter no rank used has in the shadow steps the gradient the training "
          "ranks hold (zero, or none after zero_grad set to none), with gradients copied out of the buckets too",
          "[join]") {
  // `b` is used in step 0 only; the last rank has that one step, rank 0 three. In the shadow steps the
  // joined rank's b.grad() must not still hold step 0's average (its optimizer step would apply it
  // again), and where the training ranks reset gradients to none (LibTorch 2.x's zero_grad) it must
  // hold none either: its momentum would move `b` while their SGD skips it, and Join::finish
  // re-broadcasts the parameters but not the momentum buffers, so one more step where every rank uses
  // `b` would part the models.
  struct Branchy : torch::nn::Module {
    Branchy() {
      a = register_module("a", torch::nn::Linear(4, 4));
      b = register_module("b", torch::nn::Linear(4, 4));
    }
    torch::nn::Linear a{nullptr}, b{nullptr};
  };
  for (bool set_to_none : {false, true}) {
    for (bool as_view : {true, false}) {
      INFO("set_to_none " << set_to_none << ", gradient_as_bucket_view " << as_view);
      torch::manual_seed(8);
      auto model = std::make_shared<Branchy>();
      DataParallelOptions options;
      options.find_unused_parameters = true;
      options.gradient_as_bucket_view = as_view;
      DataParallel dp(model, comm_ptr(), options);
      torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
      auto zero_grad = [&] {
        if (!set_to_none) return opt.zero_grad();
        for (auto& p : model->parameters()) p.mutable_grad() = torch::Tensor();
      };
      double stale = 0;
      int shadow_steps = 0;
      {
        Join join(dp);
        const int steps = comm().rank() == comm().size() - 1 ? 1 : 3;
        for (int step = 0; step < steps; ++step) {
          zero_grad();
          torch::Tensor h = model->a(torch::ones({2, 4}) * (comm().rank() + 1));
          if (step == 0) h = model->b(h);
          h.sum().backward();
          opt.step();
        }
        join.finish([&] {
          ++shadow_steps;
          const torch::Tensor& grad = model->b->weight.grad();
          CHECK(grad.defined() == !set_to_none);
          if (grad.defined()) stale = std::max(stale, grad.abs().max().item<double>());
          opt.step();
        });
      }
      CHECK(shadow_steps == (comm().rank() == comm().size() - 1 ? 2 : 0));  // else the checks prove nothing
      CHECK(stale == 0.0);
      CHECK(lockstep::testing::identical_across_ranks(*model));
      zero_grad();
      model->b(model->a(torch::ones({2, 4}))).sum().backward();
      opt.step();
      CHECK(lockstep::testing::identical_across_ranks(*model));
    }
  }
}

TEST_CASE("Join: ranks whose JoinOptions differ get the same error on every rank", "[join]") {
  // With another divisor the last rank's gradients would differ from the others' with no error.
  torch::manual_seed(9);
  torch::nn::Linear model(4, 2);
  DataParallel dp(model.ptr(), comm_ptr());
  JoinOptions options;
  options.divide_by_initial_world_size = comm().rank() != comm().size() - 1;
  Join join(dp, options);
  const std::string error = error_of([&] { model->forward(torch::ones({2, 4})).sum().backward(); });
  INFO(error);
  CHECK_THAT(error, Contains("Join: the ranks' JoinOptions differ: divide_by_initial_world_size is true on rank 0 "
                             "and false on rank " + std::to_string(comm().size() - 1)));
  // finish() (here every rank at once) meets the same difference.
  CHECK_THAT(error_of([&] { join.finish(); }), Contains("the ranks' JoinOptions differ"));
  CHECK(communicator_healthy());
}

TEST_CASE("Join: JoinOptions that differ on a rank with no batch at all: the same error on every rank, after the "
          "step's collectives",
          "[join]") {
  // The last rank joins at once. Had it raised right after the Join all-gather, the others' buckets,
  // launched by then, would have waited for it until the timeout.
  torch::manual_seed(9);
  torch::nn::Linear model(4, 2);
  DataParallelOptions dp_options;
  dp_options.bucket_cap_mb = 0;  // a bucket per parameter
  dp_options.first_bucket_cap_mb = 0;
  DataParallel dp(model.ptr(), comm_ptr(), dp_options);
  const int last = comm().size() - 1;
  JoinOptions options;
  options.throw_on_early_termination = comm().rank() == last;
  Join join(dp, options);
  const std::string expected = "Join: the ranks' JoinOptions differ: throw_on_early_termination is false on rank 0 "
                               "and true on rank " + std::to_string(last);
  if (comm().rank() == last) {
    CHECK_THAT(error_of([&] { join.finish(); }), Contains(expected));
  } else {
    CHECK_THAT(error_of([&] { model->forward(torch::ones({2, 4})).sum().backward(); }), Contains(expected));
    // The next step of this Join, and finish(), raise it at once: the last rank has left.
    CHECK_THAT(error_of([&] { model->forward(torch::ones({2, 4})).sum().backward(); }), Contains(expected));
    CHECK_THAT(error_of([&] { join.finish(); }), Contains(expected));
  }
  CHECK(communicator_healthy());
}
