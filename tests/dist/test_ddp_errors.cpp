// DataParallel's failures: parameters without gradients and models that differ across ranks.
// Each must raise on EVERY rank (no rank left waiting in a collective) with a message that names
// the culprit, and leave the communicator usable.
#include <torch/torch.h>
#include <catch2/catch.hpp>

#include <memory>
#include <string>
#include <vector>

#include "lockstep/ddp/data_parallel.hpp"
#include "support/dist.hpp"

namespace {

using lockstep::ddp::DataParallel;
using lockstep::ddp::DataParallelOptions;
using lockstep::testing::comm;
using lockstep::testing::comm_ptr;
using lockstep::testing::communicator_healthy;
using lockstep::testing::error_of;

// `always` takes part in every forward; `sometimes` only when asked; `never` not at all.
struct BranchyImpl : torch::nn::Module {
  BranchyImpl()
      : always(register_module("always", torch::nn::Linear(5, 4))),
        sometimes(register_module("sometimes", torch::nn::Linear(4, 4))),
        never(register_module("never", torch::nn::Linear(4, 4))),
        head(register_module("head", torch::nn::Linear(4, 2))) {}
  torch::Tensor forward(torch::Tensor x, bool use_sometimes) {
    x = torch::tanh(always(x));
    if (use_sometimes) x = x + torch::tanh(sometimes(x));
    return head(x);
  }
  torch::nn::Linear always, sometimes, never, head;
};
TORCH_MODULE(Branchy);

Branchy make_branchy() {
  torch::manual_seed(11);
  Branchy model;
  model->to(torch::kFloat64);
  return model;
}

}  // namespace

TEST_CASE("A parameter without a gradient is an error on every rank, not a hang", "[ddp]") {
  const int n = comm().size();
  const int rank = comm().rank();
  Branchy model = make_branchy();
  DataParallelOptions options;
  options.bucket_cap_mb = 0;
  options.first_bucket_cap_mb = 0;
  DataParallel dp(model, comm_ptr(), options);
  torch::Tensor x = torch::randn({3, 5}, torch::kFloat64);

  // Only the last rank skips `sometimes`; every rank leaves out `never`.
  const std::string error = error_of([&] { model->forward(x, rank != n - 1).sum().backward(); });
  INFO(error);
  CHECK(error.find("'never.weight'") != std::string::npos);
  CHECK(error.find("'never.bias'") != std::string::npos);
  CHECK(error.find("'sometimes.weight' (on 1 of " + std::to_string(n) + " ranks)") != std::string::npos);
  CHECK(error.find("find_unused_parameters") != std::string::npos);
  CHECK(communicator_healthy());

  // The failed step leaves the reducer ready for the next one (which fails the same way, since
  // `never` still gets no gradient) rather than stuck.
  const std::string again = error_of([&] { model->forward(x, true).sum().backward(); });
  CHECK(again.find("'never.weight' (on " + std::to_string(n) + " of ") != std::string::npos);
  CHECK(again.find("sometimes") == std::string::npos);
  CHECK(communicator_healthy());
}

TEST_CASE("Ranks whose gradients all arrived do not hang when another rank's did not", "[ddp]") {
  const int n = comm().size();
  const int rank = comm().rank();
  // No `never` layer here: every rank but the last has all its gradients, launches every bucket
  // during backward and waits; the last rank completes its buckets at the end of backward.
  Branchy branchy = make_branchy();
  branchy->unregister_module("never");
  DataParallelOptions options;
  options.bucket_cap_mb = 0;
  options.first_bucket_cap_mb = 0;
  DataParallel dp(branchy, comm_ptr(), options);
  torch::Tensor x = torch::randn({3, 5}, torch::kFloat64);
  const std::string error = error_of([&] { branchy->forward(x, rank != n - 1).sum().backward(); });
  INFO(error);
  CHECK(error.find("1 parameter(s)") == std::string::npos);
  CHECK(error.find("'sometimes.weight' (on 1 of " + std::to_string(n) + " ranks)") != std::string::npos);
  CHECK(error.find("'sometimes.bias' (on 1 of ") != std::string::npos);
  CHECK(error.find(rank == n - 1 ? "some of them" : "none of them") != std::string::npos);
  CHECK(communicator_healthy());
  // With every rank using it, the same model reduces normally.
  CHECK(error_of([&] { branchy->forward(x, true).sum().backward(); }).empty());
  CHECK(communicator_healthy());
}

TEST_CASE("A model whose parameters all take part trains after another model's error", "[ddp]") {
  // Same shape as above without the unused layer: no error, and the gradients are averaged.
  torch::manual_seed(5);
  auto model = torch::nn::Sequential(torch::nn::Linear(5, 4), torch::nn::Tanh(), torch::nn::Linear(4, 2));
  DataParallel dp(model, comm_ptr());
  torch::Tensor x = torch::full({2, 5}, static_cast<float>(comm().rank() + 1));
  CHECK(error_of([&] { model->forward(x).sum().backward(); }).empty());
  CHECK(communicator_healthy());
  // The oracle: every rank's gradient computed here, in one process, and averaged.
  auto copy = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(model->clone());
  REQUIRE(copy);
  std::vector<torch::Tensor> expected;
  for (const auto& p : copy->parameters()) expected.push_back(torch::zeros_like(p));
  for (int r = 0; r < comm().size(); ++r) {
    copy->zero_grad();
    copy->forward(torch::full({2, 5}, static_cast<float>(r + 1))).sum().backward();
    const auto params = copy->parameters();
    for (size_t i = 0; i < params.size(); ++i) expected[i] += params[i].grad() / comm().size();
  }
  const auto params = model->parameters();
  REQUIRE(params.size() == expected.size());
  for (size_t i = 0; i < params.size(); ++i) {
    INFO("parameter " << i);
    REQUIRE(params[i].grad().defined());
    CHECK(torch::allclose(params[i].grad(), expected[i], 1e-5, 1e-6));
  }
}

TEST_CASE("find_unused_parameters gives the single-process result", "[ddp]") {
  const int n = comm().size();
  const int rank = comm().rank();
  Branchy oracle = make_branchy();
  Branchy model = make_branchy();
  DataParallelOptions options;
  options.bucket_cap_mb = 0;
  options.first_bucket_cap_mb = 0;
  options.find_unused_parameters = true;
  DataParallel dp(model, comm_ptr(), options);
  const torch::Tensor never_before = model->never->weight.detach().clone();
  auto sgd = [](torch::nn::Module& m) {
    return torch::optim::SGD(m.parameters(), torch::optim::SGDOptions(0.1).momentum(0.9).weight_decay(0.01));
  };
  auto opt = sgd(*model);
  auto oracle_opt = sgd(*oracle);
  auto uses = [](int r, int step) { return (r + step) % 2 == 0; };  // rank- and step-dependent
  for (int step = 0; step < 4; ++step) {
    torch::manual_seed(200 + step);
    torch::Tensor x = torch::randn({2 * n, 5}, torch::kFloat64);
    torch::Tensor y = torch::randn({2 * n, 2}, torch::kFloat64);
    opt.zero_grad();
    torch::mse_loss(model->forward(x.narrow(0, 2 * rank, 2), uses(rank, step)), y.narrow(0, 2 * rank, 2)).backward();
    opt.step();
    // The oracle: the mean over ranks of each rank's loss, in one process.
    oracle_opt.zero_grad();
    torch::Tensor loss = torch::zeros({}, torch::kFloat64);
    for (int r = 0; r < n; ++r) {
      loss = loss + torch::mse_loss(oracle->forward(x.narrow(0, 2 * r, 2), uses(r, step)), y.narrow(0, 2 * r, 2));
    }
    (loss / n).backward();
    oracle_opt.step();
  }
  auto pa = model->named_parameters();
  auto pb = oracle->named_parameters();
  for (const auto& item : pa) {
    INFO(item.key());
    const torch::Tensor& expected = pb[item.key()];
    CHECK((item.value() - expected).abs().max().item<double>() <= 1e-10 * expected.abs().max().item<double>());
  }
  // No rank used `never`: its gradient stays undefined and weight decay leaves it alone, as in one process.
  CHECK_FALSE(model->never->weight.grad().defined());
  CHECK(torch::equal(model->never->weight, never_before));
  CHECK(communicator_healthy());
}

TEST_CASE("find_unused_parameters with no_sync: a parameter used in any micro-batch counts", "[ddp]") {
  const int n = comm().size();
  const int rank = comm().rank();
  Branchy oracle = make_branchy();
  Branchy model = make_branchy();
  DataParallelOptions options;
  options.find_unused_parameters = true;
  DataParallel dp(model, comm_ptr(), options);
  torch::manual_seed(300);
  torch::Tensor x = torch::randn({2, 2 * n, 5}, torch::kFloat64);
  {
    auto guard = dp.no_sync();
    model->forward(x[0].narrow(0, 2 * rank, 2), true).sum().backward();  // uses `sometimes`
  }
  model->forward(x[1].narrow(0, 2 * rank, 2), false).sum().backward();  // does not
  torch::Tensor loss = torch::zeros({}, torch::kFloat64);
  for (int r = 0; r < n; ++r) {
    loss = loss + oracle->forward(x[0].narrow(0, 2 * r, 2), true).sum() +
           oracle->forward(x[1].narrow(0, 2 * r, 2), false).sum();
  }
  (loss / n).backward();
  for (const std::string name : {"always.weight", "sometimes.weight", "sometimes.bias", "head.weight"}) {
    INFO(name);
    const torch::Tensor got = model->named_parameters()[name].grad();
    const torch::Tensor expected = oracle->named_parameters()[name].grad();
    CHECK(got.defined());
    if (got.defined()) CHECK(torch::allclose(got, expected, 1e-12, 1e-12));
  }
}

namespace {

torch::nn::Sequential make_mlp(std::int64_t hidden, bool extra_layer, const std::string& last_name = "2") {
  torch::manual_seed(1);
  torch::nn::Sequential model;
  model->push_back("0", torch::nn::Linear(6, hidden));
  model->push_back("1", torch::nn::Tanh());
  model->push_back(std::string(last_name), torch::nn::Linear(hidden, 3));
  if (extra_layer) model->push_back("3", torch::nn::Linear(3, 3));
  return model;
}

}  // namespace

TEST_CASE("Different models on different ranks: the error on every rank names the first difference", "[ddp]") {
  const int n = comm().size();
  const int rank = comm().rank();
  const int odd = n - 1;  // the rank with the different model
  const std::string odd_text = "rank " + std::to_string(odd) + ": ";
  const std::string others = n == 2 ? "rank 0: " : "ranks 0, 1: ";

  SECTION("a different shape") {
    auto model = make_mlp(rank == odd ? 9 : 8, false);
    const std::string error = error_of([&] { DataParallel dp(model, comm_ptr()); });
    INFO(error);
    CHECK(error.find("differ") != std::string::npos);
    CHECK(error.find(others + "parameter 0.weight: Float [8, 6]") != std::string::npos);
    CHECK(error.find(odd_text + "parameter 0.weight: Float [9, 6]") != std::string::npos);
    CHECK(error.find("This is rank " + std::to_string(rank)) != std::string::npos);
  }
  SECTION("an extra layer") {
    auto model = make_mlp(8, rank == odd);
    const std::string error = error_of([&] { DataParallel dp(model, comm_ptr()); });
    INFO(error);
    CHECK(error.find("rank " + std::to_string(odd) + " has 6") != std::string::npos);
    CHECK(error.find(odd_text + "parameter 3.weight") != std::string::npos);
    CHECK(error.find(others + "nothing") != std::string::npos);
  }
  SECTION("a different name") {
    auto model = make_mlp(8, false, rank == odd ? "out" : "2");
    const std::string error = error_of([&] { DataParallel dp(model, comm_ptr()); });
    INFO(error);
    CHECK(error.find(odd_text + "parameter out.weight") != std::string::npos);
    CHECK(error.find(others + "parameter 2.weight") != std::string::npos);
  }
  SECTION("a different dtype") {
    auto model = make_mlp(8, false);
    if (rank == odd) model->to(torch::kFloat64);
    const std::string error = error_of([&] { DataParallel dp(model, comm_ptr()); });
    INFO(error);
    CHECK(error.find(odd_text + "parameter 0.weight: Double [8, 6]") != std::string::npos);
  }
  SECTION("a different memory layout") {
    // Each parameter's bucket slice has its memory order: NHWC against NCHW would sum unrelated elements.
    torch::manual_seed(5);
    torch::nn::Conv2d conv(torch::nn::Conv2dOptions(3, 4, 3));
    if (rank == odd) conv->weight.set_data(conv->weight.contiguous(at::MemoryFormat::ChannelsLast));
    const std::string error = error_of([&] { DataParallel dp(conv.ptr(), comm_ptr()); });
    INFO(error);
    CHECK(error.find(odd_text + "parameter weight: Float [4, 3, 3, 3] on cpu, strides [27, 1, 9, 3], requires grad") !=
          std::string::npos);
    CHECK(error.find(others + "parameter weight: Float [4, 3, 3, 3] on cpu, requires grad") != std::string::npos);
    // The same layout everywhere, and strides that differ only in size-1 dimensions, pass.
    conv->weight.set_data(conv->weight.contiguous(at::MemoryFormat::ChannelsLast));
    CHECK(error_of([&] { DataParallel dp(conv.ptr(), comm_ptr()); }).empty());
    // A 1x3 kernel in NHWC order: [4, 3, 1, 3] with strides [9, 1, h, 3], where h (the size-1
    // height's stride) changes nothing in memory; non-contiguous, so its strides are described.
    torch::nn::Conv2d wide(torch::nn::Conv2dOptions(3, 4, {1, 3}));
    const at::Tensor nhwc = at::empty_strided({4, 3, 1, 3}, {9, 1, rank == odd ? 100 : 3, 3});
    nhwc.copy_(wide->weight.detach());
    wide->weight.set_data(nhwc);
    REQUIRE_FALSE(wide->weight.is_contiguous());
    const std::string wide_error = error_of([&] { DataParallel dp(wide.ptr(), comm_ptr()); });
    INFO(wide_error);
    CHECK(wide_error.empty());
  }
  CHECK(communicator_healthy());
}

// ---- Note [Abandoned backward]: a backward whose autograd pass fails partway through ----

namespace {

// The identity, whose backward throws when asked to: a failure in the middle of backward, after the
// layers behind it have delivered their gradients.
struct FailingIdentity : torch::autograd::Function<FailingIdentity> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, torch::Tensor x, bool fail) {
    ctx->saved_data["fail"] = fail;
    return x.clone();
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    if (ctx->saved_data["fail"].toBool()) throw std::runtime_error("injected failure in backward");
    return {grads[0], torch::Tensor()};
  }
};

struct FragileImpl : torch::nn::Module {
  FragileImpl()
      : first(register_module("first", torch::nn::Linear(5, 4))), last(register_module("last", torch::nn::Linear(4, 2))) {}
  torch::Tensor forward(torch::Tensor x, bool fail) { return last(FailingIdentity::apply(torch::tanh(first(x)), fail)); }
  torch::nn::Linear first, last;
};
TORCH_MODULE(Fragile);

Fragile make_fragile() {
  torch::manual_seed(21);
  Fragile model;
  model->to(torch::kFloat64);
  return model;
}

// Rank r's batch of a step, and the single-process oracle: the gradient of the mean over ranks.
torch::Tensor batch_of(int rank, int step) {
  torch::manual_seed(400 + 10 * step + rank);
  return torch::randn({3, 5}, torch::kFloat64);
}

void check_average_gradient(Fragile& model, int step) {
  Fragile oracle = make_fragile();
  torch::Tensor loss = torch::zeros({}, torch::kFloat64);
  const int n = comm().size();
  for (int r = 0; r < n; ++r) loss = loss + oracle->forward(batch_of(r, step), false).pow(2).sum();
  (loss / n).backward();
  auto expected = oracle->named_parameters();
  for (const auto& item : model->named_parameters()) {
    INFO(item.key());
    REQUIRE(item.value().grad().defined());
    CHECK(torch::allclose(item.value().grad(), expected[item.key()].grad(), 1e-12, 1e-12));
  }
}

}  // namespace

TEST_CASE("A backward that fails under no_sync does not leave later backwards local", "[ddp]") {
  Fragile model = make_fragile();
  DataParallel dp(model, comm_ptr());
  const int rank = comm().rank();
  {
    auto guard = dp.no_sync();
    const std::string error = error_of([&] { model->forward(batch_of(rank, 0), true).pow(2).sum().backward(); });
    CHECK(error.find("injected failure") != std::string::npos);
  }
  model->zero_grad();
  // Before: the reducer stayed "in" the failed local backward, so this one was local too, silently.
  model->forward(batch_of(rank, 1), false).pow(2).sum().backward();
  check_average_gradient(model, 1);
  CHECK(communicator_healthy());
}

TEST_CASE("A synchronised backward that fails before its first reduction can be retried", "[ddp]") {
  Fragile model = make_fragile();
  DataParallel dp(model, comm_ptr());  // one bucket: nothing is reduced before every gradient is in
  REQUIRE(dp.reducer().bucket_assignment().size() == 1);
  const int rank = comm().rank();
  const std::string error = error_of([&] { model->forward(batch_of(rank, 2), true).pow(2).sum().backward(); });
  CHECK(error.find("injected failure") != std::string::npos);
  // Every rank failed, so every rank retries the step (as a loop that catches an out-of-memory error
  // and halves the batch would). Before: "received a gradient twice", on this and every later step.
  model->zero_grad();
  model->forward(batch_of(rank, 2), false).pow(2).sum().backward();
  check_average_gradient(model, 2);
  CHECK(dp.synchronized_backwards() == 1);
  CHECK(communicator_healthy());
}

namespace {
// always -> FailingIdentity -> [branch] -> head: in backward the branch delivers its gradients before
// the failure, and always's come after it.
struct BranchAfterImpl : torch::nn::Module {
  BranchAfterImpl()
      : always(register_module("always", torch::nn::Linear(5, 4))),
        branch(register_module("branch", torch::nn::Linear(4, 4))),
        head(register_module("head", torch::nn::Linear(4, 2))) {}
  torch::Tensor forward(torch::Tensor x, bool use_branch, bool fail) {
    torch::Tensor h = FailingIdentity::apply(torch::tanh(always(x)), fail);
    return head(use_branch ? branch(h) : h);
  }
  torch::nn::Linear always, branch, head;
};
TORCH_MODULE(BranchAfter);
}  // namespace

TEST_CASE("find_unused_parameters: a failed backward retried without a branch leaves the branch unused", "[ddp]") {
  torch::manual_seed(23);
  BranchAfter model;
  model->to(torch::kFloat64);
  DataParallelOptions options;
  options.find_unused_parameters = true;
  DataParallel dp(model, comm_ptr(), options);
  const int rank = comm().rank();
  const std::string error =
      error_of([&] { model->forward(batch_of(rank, 3), /*use_branch=*/true, /*fail=*/true).sum().backward(); });
  CHECK(error.find("injected failure") != std::string::npos);
  for (auto& p : model->parameters()) p.mutable_grad() = torch::Tensor();  // zero_grad(set_to_none)
  model->forward(batch_of(rank, 3), /*use_branch=*/false, /*fail=*/false).sum().backward();
  // As in one process: no rank used the branch in this step. Before, the failed pass's hooks had marked
  // it used, and it got a zero gradient (which momentum and weight decay would then act on).
  CHECK_FALSE(model->branch->weight.grad().defined());
  CHECK_FALSE(model->branch->bias.grad().defined());
  CHECK(model->always->weight.grad().defined());
  CHECK(dp.synchronized_backwards() == 1);
  CHECK(communicator_healthy());
}

TEST_CASE("A synchronised backward that fails after a reduction began refuses to synchronise again", "[ddp]") {
  Fragile model = make_fragile();
  DataParallelOptions options;
  options.bucket_cap_mb = 0;  // a bucket per parameter: `last`'s are reduced before the failure
  options.first_bucket_cap_mb = 0;
  DataParallel dp(model, comm_ptr(), options);
  const int rank = comm().rank();
  const std::string error = error_of([&] { model->forward(batch_of(rank, 3), true).pow(2).sum().backward(); });
  CHECK(error.find("injected failure") != std::string::npos);
  for (int attempt = 0; attempt < 2; ++attempt) {
    model->zero_grad();
    const std::string again = error_of([&] { model->forward(batch_of(rank, 3), false).pow(2).sum().backward(); });
    INFO(again);
    CHECK(again.find("an earlier synchronised backward failed partway through on rank " + std::to_string(rank)) !=
          std::string::npos);
    CHECK(again.find("of 4 bucket reductions") != std::string::npos);
    CHECK(again.find("Restart from the last checkpoint") != std::string::npos);
  }
  // Every rank issued the same reductions before failing here, so the communicator itself is fine.
  CHECK(communicator_healthy());
}

TEST_CASE("A synchronised backward that fails while waiting for its reductions refuses to synchronise again",
          "[ddp]") {
  // A hook's continuation throws on one rank: that rank leaves the later buckets' continuations and
  // the flags unwaited, which its peers completed (a PowerSGD continuation issues a collective).
  Fragile model = make_fragile();
  DataParallelOptions options;
  options.bucket_cap_mb = 0;
  options.first_bucket_cap_mb = 0;
  const int rank = comm().rank();
  const int last = comm().size() - 1;
  const lockstep::ddp::CommHook average = lockstep::ddp::allreduce_hook();
  options.comm_hook = [average, last](lockstep::comm::Communicator& c, const lockstep::ddp::GradBucket& bucket) {
    lockstep::comm::WorkPtr work = average(c, bucket);
    if (bucket.index != 0 || c.rank() != last || bucket.iteration != 1) return work;
    return lockstep::comm::then(std::move(work), [] { throw std::runtime_error("continuation failure"); });
  };
  DataParallel dp(model, comm_ptr(), options);
  model->forward(batch_of(rank, 1), false).pow(2).sum().backward();
  const std::string error = error_of([&] { model->forward(batch_of(rank, 2), false).pow(2).sum().backward(); });
  CHECK((rank == last) == (error.find("continuation failure") != std::string::npos));
  if (rank == last) {  // the others' next backward would wait for this rank's collectives
    model->zero_grad();
    const std::string again = error_of([&] { model->forward(batch_of(rank, 3), false).pow(2).sum().backward(); });
    INFO(again);
    CHECK(again.find("an earlier synchronised backward failed on rank " + std::to_string(rank) +
                     " while waiting for its reductions (continuation failure)") != std::string::npos);
  }
  CHECK(communicator_healthy());
}

TEST_CASE("A rank that fails writing the reduced gradients back refuses to synchronise again", "[ddp]") {
  // After every collective of the step: the last rank holds, for a parameter it did not use, a .grad()
  // that cannot be written (an expanded zero), so only it fails. Its gradients are then not its peers',
  // and a rebuild it skipped would come a step late: its next backward is refused at once, instead of
  // issuing collectives nobody matches.
  Branchy model = make_branchy();
  DataParallelOptions options;
  options.find_unused_parameters = true;
  options.gradient_as_bucket_view = false;  // the reduced values are copied into the .grad()s
  DataParallel dp(model.ptr(), comm_ptr(), options);
  const int rank = comm().rank();
  const int last = comm().size() - 1;
  const torch::Tensor x = torch::ones({3, 5}, torch::kFloat64) * (rank + 1);
  model->forward(x, true).sum().backward();  // the first step rebuilds the buckets, on every rank
  model->zero_grad();
  if (rank == last) {
    model->sometimes->weight.mutable_grad() = torch::zeros({1}, torch::kFloat64).expand({4, 4});
  }
  const std::string error = error_of([&] { model->forward(x, rank != last).sum().backward(); });
  INFO(error);
  CHECK(error.empty() == (rank != last));
  if (rank == last) {
    model->zero_grad();
    const std::string again = error_of([&] { model->forward(x, true).sum().backward(); });
    INFO(again);
    CHECK(again.find("an earlier synchronised backward failed on rank " + std::to_string(rank) +
                     " while writing the reduced gradients back") != std::string::npos);
  }
  CHECK(communicator_healthy());
}

TEST_CASE("A comm hook that fails for a bucket launched at the end of backward refuses to synchronise again",
          "[ddp]") {
  // `never`'s buckets can only be launched at the end of the pass (find_unused_parameters); the hook
  // fails for the second of them, after the first and `head`'s were issued.
  Branchy model = make_branchy();
  DataParallelOptions options;
  options.find_unused_parameters = true;
  options.bucket_cap_mb = 0;  // a bucket per parameter
  options.first_bucket_cap_mb = 0;
  const lockstep::ddp::CommHook average = lockstep::ddp::allreduce_hook();
  options.comm_hook = [average](lockstep::comm::Communicator& c, const lockstep::ddp::GradBucket& bucket) {
    if (bucket.parameter_names.front() == "never.weight") throw std::runtime_error("hook failure at the end");
    return average(c, bucket);
  };
  DataParallel dp(model.ptr(), comm_ptr(), options);
  const torch::Tensor x = torch::ones({3, 5}, torch::kFloat64) * (comm().rank() + 1);
  const std::string error = error_of([&] { model->forward(x, false).sum().backward(); });
  INFO(error);
  CHECK(error.find("hook failure at the end") != std::string::npos);
  model->zero_grad();
  const std::string again = error_of([&] { model->forward(x, false).sum().backward(); });
  INFO(again);
  CHECK(again.find("an earlier synchronised backward failed on rank " + std::to_string(comm().rank()) +
                   " while launching bucket 3 of 8 at the end of its backward pass") != std::string::npos);
  CHECK(again.find("(hook failure at the end)") != std::string::npos);
  CHECK(communicator_healthy());
}

// ---- a model moved or cast after DataParallel was built ----

namespace {
struct ScaledImpl : torch::nn::Module {
  ScaledImpl() : head(register_module("head", torch::nn::Linear(5, 2))) {
    scale = register_parameter("scale", torch::ones({2}));
  }
  torch::Tensor forward(const torch::Tensor& x) { return head(x) * scale.to(x.scalar_type()); }
  torch::nn::Linear head;
  torch::Tensor scale;
};
TORCH_MODULE(Scaled);
}  // namespace

TEST_CASE("A parameter cast after DataParallel was built is an error, not a gradient left local", "[ddp]") {
  torch::manual_seed(31);
  Scaled model;
  DataParallelOptions options;
  options.find_unused_parameters = true;  // before, the cast parameter silently counted as unused
  DataParallel dp(model, comm_ptr(), options);
  {
    torch::NoGradGuard no_grad;
    model->scale.set_data(model->scale.to(torch::kFloat64));  // as Module::to() does to each parameter
  }
  const torch::Tensor x = torch::randn({3, 5}) + comm().rank();
  const std::string error = error_of([&] { model->forward(x).sum().backward(); });
  INFO(error);
  CHECK(error.find("parameter 'scale' was moved or cast after DataParallel was built (it is Double on cpu, built "
                   "as Float on cpu)") != std::string::npos);
  CHECK(error.find("Move the model") != std::string::npos);
  CHECK(communicator_healthy());
}

TEST_CASE("A model moved whole after DataParallel was built is caught by before_forward and no_sync", "[ddp]") {
  torch::manual_seed(32);
  auto model = torch::nn::Sequential(torch::nn::Linear(5, 4), torch::nn::Tanh(), torch::nn::Linear(4, 2));
  DataParallel dp(model, comm_ptr());
  CHECK_NOTHROW(dp.before_forward());
  model->to(torch::kFloat64);  // no gradient reaches DataParallel's hooks any more
  const std::string forward_error = error_of([&] { dp.before_forward(); });
  CHECK(forward_error.find("parameter '0.weight' was moved or cast") != std::string::npos);
  const std::string no_sync_error = error_of([&] { auto guard = dp.no_sync(); });
  CHECK(no_sync_error.find("parameter '0.weight' was moved or cast") != std::string::npos);
  CHECK(communicator_healthy());
}

TEST_CASE("A parameter unfrozen after DataParallel was built is an error, and one frozen after says so", "[ddp]") {
  // Unfrozen: DataParallel has no hook on it, so its gradients would stay local to each rank.
  torch::manual_seed(3);
  torch::nn::Sequential model(torch::nn::Linear(4, 4), torch::nn::Linear(4, 2));
  model[0]->as<torch::nn::Linear>()->weight.requires_grad_(false);
  DataParallel dp(model.ptr(), comm_ptr());
  model[0]->as<torch::nn::Linear>()->weight.requires_grad_(true);
  const torch::Tensor x = torch::ones({3, 4}) * (comm().rank() + 1);
  const std::string error = error_of([&] { model->forward(x).sum().backward(); });
  INFO(error);
  CHECK_THAT(error, Catch::Contains("parameter '0.weight' was frozen (requires_grad false) when DataParallel was built "
                                    "and requires grad now"));
  CHECK_THAT(error_of([&] { dp.before_forward(); }), Catch::Contains("'0.weight' was frozen"));
  CHECK(communicator_healthy());

  // Frozen after: the usual advice (set requires_grad(false)) would be what was done.
  torch::nn::Sequential later(torch::nn::Linear(4, 4), torch::nn::Linear(4, 2));
  DataParallel dp_later(later.ptr(), comm_ptr());
  later[1]->as<torch::nn::Linear>()->bias.requires_grad_(false);
  const std::string frozen = error_of([&] { later->forward(x).sum().backward(); });
  INFO(frozen);
  CHECK_THAT(frozen, Catch::Contains("'1.bias' was frozen (requires_grad false) after DataParallel was built"));
  CHECK(communicator_healthy());
}

TEST_CASE("A second DataParallel on a model takes its gradients over: exact averages, and the first refuses use",
          "[ddp]") {
  // Note [One reducer per parameter]: two live reducers both hooked every parameter, and the gradient
  // came out divided by the world size twice (or anywhere up to the average, by timing).
  const int n = comm().size();
  torch::manual_seed(5);
  torch::nn::Linear model(4, 2);
  model->to(torch::kFloat64);
  auto first = std::make_unique<DataParallel>(model.ptr(), comm_ptr());
  DataParallel second(model.ptr(), comm_ptr());  // e.g. a second training stage in the same scope
  const torch::Tensor x = torch::ones({3, 4}, torch::kFloat64) * (comm().rank() + 1);
  for (int step = 0; step < 2; ++step) {
    model->zero_grad();
    second.before_forward();
    model->forward(x).sum().backward();
    // d/dW of the sum over 3 rows of W x: 3 (rank + 1) per entry, averaged over ranks: 1.5 (n + 1).
    CHECK(torch::equal(model->weight.grad(), torch::full({2, 4}, 1.5 * (n + 1), torch::kFloat64)));
    CHECK(torch::equal(model->bias.grad(), torch::full({2}, 3.0, torch::kFloat64)));
  }
  const std::string error = error_of([&] { first->before_forward(); });
  CHECK_THAT(error, Catch::Contains("a newer DataParallel (or DistributedTrainer) was built on the same parameters "
                                    "(parameter 'weight'"));
  first.reset();  // its hooks go; the newer one's stay
  model->zero_grad();
  model->forward(x).sum().backward();
  CHECK(torch::equal(model->weight.grad(), torch::full({2, 4}, 1.5 * (n + 1), torch::kFloat64)));

  // The other way round: the newer one goes first (a temporary), and the older one, whose hooks it
  // turned off, must not be left silently averaging nothing.
  auto older = std::make_unique<DataParallel>(model.ptr(), comm_ptr());  // supersedes `second`
  { DataParallel temporary(model.ptr(), comm_ptr()); }
  model->zero_grad();
  const std::string gone = error_of([&] { model->forward(x).sum().backward(); });
  CHECK_THAT(gone, Catch::Contains("superseded by a newer one built on the same parameters") &&
                       Catch::Contains("which has been destroyed since: nothing averages these gradients now"));
  CHECK(communicator_healthy());
}

namespace {
struct BodyHeadImpl : torch::nn::Module {
  BodyHeadImpl() : body(register_module("body", torch::nn::Linear(4, 3))), head(register_module("head", torch::nn::Linear(3, 2))) {}
  torch::Tensor forward(const torch::Tensor& x) { return head(torch::tanh(body(x))); }
  torch::nn::Linear body, head;
};
TORCH_MODULE(BodyHead);
}  // namespace

TEST_CASE("A second DataParallel over part of the model: the first's other parameters are refused, not left local",
          "[ddp]") {
  // The newer one on the head turned all of the first one's hooks off; the body's gradients were then
  // reduced by nobody, and each rank stepped its own body.
  torch::manual_seed(6);
  BodyHead model;
  model->to(torch::kFloat64);
  DataParallel whole(model.ptr(), comm_ptr());
  DataParallel head_only(model->head.ptr(), comm_ptr());  // built while `whole` lives
  const torch::Tensor x = torch::ones({3, 4}, torch::kFloat64) * (comm().rank() + 1);
  const std::string error = error_of([&] { model->forward(x).sum().backward(); });
  INFO(error);
  CHECK_THAT(error, Catch::Contains("parameter 'body.") &&
                        Catch::Contains("the newer one does not hold this parameter, so nothing averages its gradient"));
  // Frozen, the body has no gradient to average: the head trains alone, averaged.
  for (auto& p : model->body->parameters()) p.set_requires_grad(false);
  DataParallel head_again(model->head.ptr(), comm_ptr());
  model->zero_grad();
  model->forward(x).sum().backward();
  CHECK(lockstep::testing::same_on_every_rank(model->head->weight.grad()));
  CHECK(communicator_healthy());
}
