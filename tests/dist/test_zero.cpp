// ZeroRedundancyOptimizer against the unsharded optimizer: the same DataParallel training with SGD
// (momentum, Nesterov, weight decay) and Adam must leave bitwise the same parameters, while each
// rank holds only its share of the state; in the trainer, with an lr schedule and stop-and-resume.
#include <torch/torch.h>
#include <catch2/catch.hpp>

#include <cmath>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "lockstep/config/config.hpp"
#include "lockstep/ddp/data_parallel.hpp"
#include "lockstep/ddp/zero_optimizer.hpp"
#include "lockstep/train/callback.hpp"
#include "lockstep/train/trainer.hpp"
#include "support/dist.hpp"
#include "support/fixtures.hpp"

namespace {

using lockstep::testing::bitwise_equal;
using Catch::Matchers::Contains;
using lockstep::ddp::DataParallel;
using lockstep::ddp::ZeroRedundancyOptimizer;
using lockstep::testing::comm;
using lockstep::testing::comm_ptr;

// Layers of unequal sizes, so that the shares differ.
struct MlpImpl : torch::nn::Module {
  MlpImpl() {
    a = register_module("a", torch::nn::Linear(12, 40));
    b = register_module("b", torch::nn::Linear(40, 7));
    c = register_module("c", torch::nn::Linear(7, 30));
    d = register_module("d", torch::nn::Linear(30, 3));
  }
  torch::Tensor forward(const torch::Tensor& x) { return d(torch::tanh(c(torch::relu(b(torch::relu(a(x))))))); }
  torch::nn::Linear a{nullptr}, b{nullptr}, c{nullptr}, d{nullptr};
};
TORCH_MODULE(Mlp);

using Factory = ZeroRedundancyOptimizer::Factory;

Factory sgd_factory() {
  return [](std::vector<at::Tensor> p) {
    return std::make_unique<torch::optim::SGD>(
        std::move(p), torch::optim::SGDOptions(0.1).momentum(0.9).nesterov(true).weight_decay(1e-3));
  };
}
Factory adam_factory() {
  return [](std::vector<at::Tensor> p) {
    return std::make_unique<torch::optim::Adam>(std::move(p), torch::optim::AdamOptions(0.01).weight_decay(1e-3));
  };
}

// The optimizer `factory` builds, sharded over the ranks (ZeRO) or whole.
std::shared_ptr<torch::optim::Optimizer> sharded_or_not(bool zero, std::vector<at::Tensor> parameters,
                                                        const Factory& factory) {
  if (zero) return std::make_shared<ZeroRedundancyOptimizer>(std::move(parameters), comm_ptr(), factory);
  return factory(std::move(parameters));
}

int64_t state_elements(const torch::optim::Optimizer& opt) {
  int64_t total = 0;
  for (const auto& item : opt.state()) {
    // Momentum buffers and Adam moments: every tensor the state serialises.
    if (auto* s = dynamic_cast<torch::optim::SGDParamState*>(item.second.get())) total += s->momentum_buffer().numel();
    if (auto* s = dynamic_cast<torch::optim::AdamParamState*>(item.second.get())) {
      total += s->exp_avg().numel() + s->exp_avg_sq().numel();
    }
  }
  return total;
}

// K DataParallel steps of `opt` on rank slices of a fixed batch sequence; returns the parameters.
std::vector<at::Tensor> train(Mlp model, torch::optim::Optimizer& opt, int steps) {
  DataParallel dp(model, comm_ptr());
  const int world = comm().size();
  const int rank = comm().rank();
  for (int step = 0; step < steps; ++step) {
    torch::manual_seed(300 + step);
    const torch::Tensor x = torch::randn({4 * world, 12});
    const torch::Tensor y = torch::randint(0, 3, {4 * world});
    opt.zero_grad();
    torch::nn::functional::cross_entropy(model(x.narrow(0, 4 * rank, 4)), y.narrow(0, 4 * rank, 4)).backward();
    opt.step();
  }
  return lockstep::testing::state_of(*model);
}

}  // namespace

TEST_CASE("ZeRO: SGD and Adam sharded give bitwise the unsharded parameters, with 1/N of the state",
          "[zero]") {
  for (const std::string name : {"sgd", "adam"}) {
    INFO(name);
    const Factory factory = name == "sgd" ? sgd_factory() : adam_factory();
    torch::manual_seed(1);
    Mlp plain_model;
    Mlp sharded_model;
    {
      torch::NoGradGuard no_grad;
      auto a = plain_model->parameters();
      auto b = sharded_model->parameters();
      for (size_t i = 0; i < a.size(); ++i) b[i].copy_(a[i]);
    }
    std::unique_ptr<torch::optim::Optimizer> plain = factory(plain_model->parameters());
    ZeroRedundancyOptimizer sharded(sharded_model->parameters(), comm_ptr(), factory);
    const auto want = train(plain_model, *plain, 5);
    const auto got = train(sharded_model, sharded, 5);
    CHECK(bitwise_equal(got, want));
    CHECK(lockstep::testing::identical_across_ranks(*sharded_model));

    // Each rank keeps state only for the parameters it owns; over ranks, all of it, once.
    int64_t owned = 0;
    for (int owner : sharded.owners()) owned += owner == comm().rank() ? 1 : 0;
    CHECK(static_cast<int64_t>(sharded.local().state().size()) == owned);
    at::Tensor elements = torch::tensor({static_cast<double>(state_elements(sharded.local()))}, torch::kFloat64);
    comm().allreduce(elements)->wait();
    CHECK(elements.item<double>() == static_cast<double>(state_elements(*plain)));
    if (comm().size() > 1) CHECK(state_elements(sharded.local()) < state_elements(*plain));
  }
}

TEST_CASE("ZeRO: a rank that owns nothing still takes part", "[zero]") {
  // Two parameters, so at 3 ranks rank 2 owns nothing.
  torch::manual_seed(2);
  torch::nn::Linear tiny_plain(5, 1);
  torch::nn::Linear tiny(5, 1);
  {
    torch::NoGradGuard no_grad;
    tiny->weight.copy_(tiny_plain->weight);
    tiny->bias.copy_(tiny_plain->bias);
  }
  torch::optim::SGD plain(tiny_plain->parameters(), torch::optim::SGDOptions(0.1).momentum(0.5));
  ZeroRedundancyOptimizer sharded(tiny->parameters(), comm_ptr(), [](std::vector<at::Tensor> p) {
    return std::make_unique<torch::optim::SGD>(std::move(p), torch::optim::SGDOptions(0.1).momentum(0.5));
  });
  DataParallel dp_plain(tiny_plain, comm_ptr());
  DataParallel dp(tiny, comm_ptr());
  for (int step = 0; step < 3; ++step) {
    const torch::Tensor x = torch::full({2, 5}, 0.1 * (step + 1 + comm().rank()));
    plain.zero_grad();
    tiny_plain(x).pow(2).sum().backward();
    plain.step();
    sharded.zero_grad();
    tiny(x).pow(2).sum().backward();
    sharded.step();
  }
  CHECK(torch::equal(tiny->weight, tiny_plain->weight));
  CHECK(torch::equal(tiny->bias, tiny_plain->bias));
}

TEST_CASE("ZeRO: a tensor listed twice (tied weights) is one parameter, updated once", "[zero]") {
  torch::nn::Linear layer(3, 3);
  std::vector<at::Tensor> twice = {layer->weight, layer->bias, layer->weight};
  ZeroRedundancyOptimizer sharded(twice, comm_ptr(), [](std::vector<at::Tensor> p) {
    return std::make_unique<torch::optim::SGD>(std::move(p), torch::optim::SGDOptions(1.0));
  });
  CHECK(sharded.owners().size() == 2);
  const at::Tensor before = layer->weight.detach().clone();
  layer->weight.mutable_grad() = torch::ones_like(layer->weight);
  layer->bias.mutable_grad() = torch::zeros_like(layer->bias);
  sharded.step();
  CHECK(torch::allclose(layer->weight, before - 1.0));  // one step of lr 1, not two
}

TEST_CASE("ZeRO: clear errors for other parameters on some rank, an unconsolidated save, a foreign state",
          "[zero]") {
  // Rank 1 builds a different model: every rank raises the same kind of error.
  torch::nn::Linear small(4, 2);
  torch::nn::Linear other(4, 3);
  torch::nn::Linear& mine = comm().rank() == 1 ? other : small;
  CHECK_THROWS_WITH(ZeroRedundancyOptimizer(mine->parameters(), comm_ptr(), sgd_factory()),
                    Contains("needs the same parameters on every rank") && Contains("rank 1 has 2 ("));

  ZeroRedundancyOptimizer sharded(small->parameters(), comm_ptr(), sgd_factory());
  torch::serialize::OutputArchive archive;
  CHECK_THROWS_WITH(sharded.save(archive), Contains("call consolidate_state() on every rank"));
  sharded.consolidate_state();  // onto rank 0: only the writer holds the whole state (Note [ZeRO checkpoints])
  if (comm().rank() == 0) {
    sharded.save(archive);  // now it can, once: the gathered copy is released
    CHECK_THROWS_WITH(sharded.save(archive), Contains("was saved already and released"));
  } else {
    CHECK_THROWS_WITH(sharded.save(archive), Contains("consolidated onto rank 0, not this rank"));
  }
  small(torch::ones({1, 4})).sum().backward();
  sharded.step();
  CHECK_THROWS_WITH(sharded.save(archive), Contains("state consolidated after step 0"));

  torch::optim::SGD unsharded(small->parameters(), torch::optim::SGDOptions(0.1));
  // An archive as a file would give it back: written to bytes (kept in `bytes`), read from them.
  auto reread = [](torch::serialize::OutputArchive& out, std::string& bytes) {
    out.save_to([&bytes](const void* data, size_t n) {
      bytes.append(static_cast<const char*>(data), n);
      return n;
    });
    torch::serialize::InputArchive in;
    in.load_from(bytes.data(), bytes.size());
    return in;
  };
  torch::serialize::OutputArchive foreign;
  unsharded.save(foreign);
  std::string foreign_bytes;
  torch::serialize::InputArchive in = reread(foreign, foreign_bytes);
  CHECK_THROWS_WITH(sharded.load(in), Contains("not written by a ZeroRedundancyOptimizer"));

  // The state of parameters with the same count, sizes order and owners but other shapes ([2, 4] and
  // [2] against [4, 2] and [4]): refused at the load, not at the first step in LibTorch's words.
  torch::nn::Linear transposed(2, 4);
  ZeroRedundancyOptimizer other_shapes(transposed->parameters(), comm_ptr(), sgd_factory());
  sharded.consolidate_state(comm().size() - 1);  // onto another rank than the Checkpointer's
  if (comm().rank() != comm().size() - 1) return;
  torch::serialize::OutputArchive saved;
  sharded.save(saved);
  std::string saved_bytes;
  torch::serialize::InputArchive state = reread(saved, saved_bytes);
  CHECK_THROWS_WITH(other_shapes.load(state), Contains("written for parameters of other shapes"));
}

TEST_CASE("ZeRO in the trainer: bitwise the unsharded run under an lr schedule, and bitwise after resume",
          "[zero]") {
  int64_t first_step = -1;  // of the last run (-1: it took no step)
  auto run = [&first_step](bool zero, const std::string& dir, int64_t stop_after, const std::string& resume) {
    torch::manual_seed(31);
    lockstep::testing::SmallConvNet model(/*batch_norm=*/true);
    const auto opt = sharded_or_not(zero, model->parameters(), adam_factory());
    lockstep::train::TrainerOptions o =
        lockstep::testing::resumable(lockstep::testing::quiet_trainer(2, 8), dir, stop_after, resume);
    o.lr.kind = lockstep::train::LrScheduleKind::Cosine;
    o.lr.warmup_steps = 2;
    lockstep::train::DistributedTrainer trainer(model, opt, comm_ptr(), o);
    auto first = std::make_shared<lockstep::testing::FirstStep>();
    trainer.add_callback(first);
    trainer.fit(lockstep::testing::synthetic_images(12 * comm().size(), 8, 7), nullptr);  // 3 steps per epoch
    first_step = first->step;
    return lockstep::testing::state_of(*model);
  };
  const auto plain = run(false, lockstep::testing::shared_temp_dir("zero_plain"), 0, "never");
  const auto full = run(true, lockstep::testing::shared_temp_dir("zero_full"), 0, "never");
  CHECK(bitwise_equal(full, plain));
  for (int64_t stop : {2, 4}) {
    INFO("stopped after step " << stop);
    const std::string dir = lockstep::testing::shared_temp_dir("zero_stop" + std::to_string(stop));
    run(true, dir, stop, "auto");
    CHECK(bitwise_equal(run(true, dir, 0, "auto"), full));
    CHECK(first_step == stop);  // from the stop's checkpoint, not from the start
  }
}

namespace {
// Two convolutions: the second's weight (4 x 8 x 3 x 3) is not contiguous once stored channels_last
// (the first's, with one input channel, still is), so it cannot be viewed flat.
struct TwoConvImpl : torch::nn::Module {
  TwoConvImpl() {
    a = register_module("a", torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 8, 3).padding(1)));
    b = register_module("b", torch::nn::Conv2d(torch::nn::Conv2dOptions(8, 4, 3).padding(1)));
    fc = register_module("fc", torch::nn::Linear(4 * 8 * 8, 4));
  }
  torch::Tensor forward(const torch::Tensor& x) { return fc(torch::relu(b(torch::relu(a(x)))).flatten(1)); }
  torch::nn::Conv2d a{nullptr}, b{nullptr};
  torch::nn::Linear fc{nullptr};
};
TORCH_MODULE(TwoConv);
}  // namespace

TEST_CASE("ZeRO in the trainer with channels_last: the gathered weights land in their strides", "[zero]") {
  auto run = [](bool zero) {
    torch::manual_seed(32);
    TwoConv model;
    const auto opt = sharded_or_not(zero, model->parameters(), sgd_factory());
    lockstep::train::TrainerOptions o = lockstep::testing::quiet_trainer(1, 8);
    o.channels_last = true;
    lockstep::train::DistributedTrainer trainer(model, opt, comm_ptr(), o);
    trainer.fit(lockstep::testing::synthetic_images(12 * comm().size(), 8, 7), nullptr);  // 3 steps
    CHECK_FALSE(model->b->weight.is_contiguous());
    CHECK(model->b->weight.is_contiguous(at::MemoryFormat::ChannelsLast));
    return lockstep::testing::state_of(*model);
  };
  const auto plain = run(false);
  const auto sharded = run(true);
  CHECK(bitwise_equal(sharded, plain));
}

namespace {
// One Linear registered under two names: Module::parameters() lists its weight and bias twice.
struct TiedImpl : torch::nn::Module {
  TiedImpl() {
    a = register_module("a", torch::nn::Linear(4, 4));
    b = register_module("b", a);
    head = register_module("head", torch::nn::Linear(4, 4));
  }
  torch::Tensor forward(const torch::Tensor& x) { return head(b(torch::tanh(a(x.flatten(1).narrow(1, 0, 4))))); }
  torch::nn::Linear a{nullptr}, b{nullptr}, head{nullptr};
};
TORCH_MODULE(Tied);

// The mean over the epoch's steps of the gradient norm, each tensor counted once, the long way.
struct UniqueNorms : lockstep::train::Callback {
  void on_after_backward(lockstep::train::TrainerContext& ctx) override {
    double squared = 0;
    for (const at::Tensor& p : {model->a->weight, model->a->bias, model->head->weight, model->head->bias}) {
      squared += p.grad().to(at::kDouble).pow(2).sum().item<double>();
    }
    sum += std::sqrt(squared);
    ++steps;
  }
  explicit UniqueNorms(Tied tied) : model(std::move(tied)) {}
  Tied model;
  double sum = 0;
  int steps = 0;
};
}  // namespace

TEST_CASE("trainer with tied weights: make_optimizer steps a tied tensor once, sharded or not; an optimizer "
          "holding it twice is refused",
          "[zero]") {
  auto run = [](bool zero) {
    torch::manual_seed(33);
    Tied model;
    REQUIRE(model->parameters().size() == 6);  // a's two tensors listed twice
    lockstep::config::OptimizerConfig config;  // SGD with momentum and weight decay
    config.zero = zero;
    const auto opt = lockstep::config::make_optimizer(config, model->parameters(), comm_ptr());
    lockstep::train::TrainerOptions o = lockstep::testing::quiet_trainer(1, 4);
    o.clip_grad_norm = 1e6;  // clips nothing, reports the norm: each tensor counted once
    lockstep::train::DistributedTrainer trainer(model, opt, comm_ptr(), o);
    auto norms = std::make_shared<UniqueNorms>(model);
    trainer.add_callback(norms);
    const auto metrics = trainer.fit(lockstep::testing::synthetic_images(12 * comm().size(), 8, 3), nullptr);
    CHECK(metrics.at("grad_norm") == Approx(norms->sum / norms->steps).epsilon(1e-5));  // not a.* twice
    return std::make_pair(lockstep::testing::state_of(*model), metrics.at("grad_norm"));
  };
  // Before: the unsharded optimizer stepped a.weight and a.bias twice a step; ZeRO, once.
  const auto [plain, plain_norm] = run(false);
  const auto [sharded, sharded_norm] = run(true);
  CHECK(bitwise_equal(plain, sharded));
  CHECK(plain_norm == sharded_norm);

  Tied model;
  auto twice = std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.1));
  const auto options = lockstep::testing::quiet_trainer(1, 4);
  CHECK_THROWS_WITH(lockstep::train::DistributedTrainer(model, twice, comm_ptr(), options),
                    Contains("the optimizer holds a parameter twice ('a.weight', 'b.weight'): it would step it twice"));
}

TEST_CASE("ZeRO: a parameter list one rank alone refuses fails every rank at construction; a group added later is "
          "refused at the step",
          "[zero]") {
  // Before, the last rank raised before the constructor's all-gather and the others waited in it.
  torch::nn::Linear layer(3, 2);
  const bool odd = comm().rank() == comm().size() - 1;
  std::vector<at::Tensor> parameters = {layer->weight, odd ? layer->bias.to(torch::kFloat64) : layer->bias};
  CHECK_THROWS_WITH(ZeroRedundancyOptimizer(parameters, comm_ptr(), sgd_factory()),
                    Contains("needs one dtype and device for all parameters: parameter 0 is Float on cpu, parameter 1 "
                             "is Double on cpu"));
  CHECK(lockstep::testing::communicator_healthy());

  ZeroRedundancyOptimizer sharded(layer->parameters(), comm_ptr(), sgd_factory());
  torch::nn::Linear head(2, 2);
  sharded.add_param_group(torch::optim::OptimizerParamGroup(head->parameters()));
  CHECK_THROWS_WITH(sharded.step(), Contains("it shards the one parameter group it was built with (2 parameters); it "
                                             "now has 2 group(s) (add_param_group?)"));
}
