// DataParallel and the trainer on CUDA with the runtime's communicator (NCCL with one GPU per rank,
// MPI with staged CUDA tensors otherwise), and the MPI communicator with CUDA tensors.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <chrono>
#include <limits>

#include "lockstep/comm/mpi_communicator.hpp"
#include "lockstep/compress/quantization.hpp"
#include "lockstep/data/loader.hpp"
#include "lockstep/data/sharded_sampler.hpp"
#include "lockstep/data/synthetic_dataset.hpp"
#include "lockstep/ddp/data_parallel.hpp"
#include "lockstep/ddp/powersgd.hpp"
#include "lockstep/ddp/sync_batch_norm.hpp"
#include "lockstep/ddp/zero_optimizer.hpp"
#include "lockstep/train/ema.hpp"
#include "lockstep/train/foreach_optim.hpp"
#include "lockstep/train/grad_clip.hpp"
#include "lockstep/train/grad_scaler.hpp"
#include "lockstep/train/trainer.hpp"
#include "stream_gate.hpp"
#include "support/dist.hpp"
#include "support/fixtures.hpp"

using lockstep::testing::comm;
using lockstep::testing::comm_ptr;

namespace {

torch::Device device() { return lockstep::testing::runtime().world().device; }

// conv -> BatchNorm -> fc: BatchNorm's running statistics are buffers that must follow the device.
lockstep::testing::SmallConvNet Net() { return lockstep::testing::SmallConvNet(/*batch_norm=*/true); }

std::shared_ptr<lockstep::data::SyntheticDataset> images(int64_t size) {
  return lockstep::testing::synthetic_images(size, 8, 5);
}

lockstep::train::TrainerOptions cuda_trainer(int64_t epochs, const std::string& precision) {
  lockstep::train::TrainerOptions o;
  o.epochs = epochs;
  o.batch_size = 16;
  o.progress = false;
  o.checkpoints = false;
  o.device = "cuda";
  o.precision = precision;
  return o;
}

}  // namespace

TEST_CASE("the MPI communicator takes CUDA tensors (staged through host memory)", "[gpu][mpi]") {
  lockstep::comm::MpiCommunicator mpi;
  const int n = mpi.size(), r = mpi.rank();
  auto options = torch::TensorOptions().device(device());
  auto t = torch::full({1000}, r + 1.0, options);
  mpi.allreduce(t)->wait();
  CHECK(t.is_cuda());
  CHECK(torch::allclose(t.cpu(), torch::full({1000}, n * (n + 1) / 2.0)));
  auto b = torch::full({10}, static_cast<double>(r), options.dtype(torch::kLong));
  mpi.broadcast(b, {n - 1})->wait();
  CHECK(torch::equal(b.cpu(), torch::full({10}, n - 1, torch::kLong)));
  auto out = torch::zeros({n * 3}, options);
  mpi.allgather(torch::full({3}, static_cast<double>(r), options), out)->wait();
  CHECK(torch::equal(out.cpu(), torch::arange(n, torch::kFloat).repeat_interleave(3)));
  auto whole = torch::ones({n * 4}, options.dtype(torch::kBFloat16));
  auto mine = torch::zeros({4}, options.dtype(torch::kBFloat16));
  mpi.reduce_scatter(whole, mine, {lockstep::comm::ReduceOp::Sum})->wait();
  CHECK(torch::equal(mine.cpu().to(torch::kFloat), torch::full({4}, static_cast<float>(n))));
  CHECK_THROWS_WITH(mpi.allreduce(torch::zeros({4}, options), torch::zeros({4})),
                    Catch::Matchers::Contains("same device"));
}

TEST_CASE("the MPI communicator stages CUDA tensors after the caller's stream, and in place", "[gpu][mpi]") {
  // The staging copy must follow what the caller's current stream (not the default one) queued: here a
  // fill held up behind a gate that a thread opens 300 ms later. Copied early, the sum is of zeros.
  lockstep::comm::MpiCommunicator mpi;
  const int n = mpi.size(), r = mpi.rank();
  c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(false, device().index());
  c10::cuda::CUDAStreamGuard on_side(side);
  auto options = torch::TensorOptions().device(device());
  auto t = torch::zeros({1 << 16}, options);
  side.synchronize();
  {
    lockstep::testing::StreamGate gate;
    gate.close(side.stream());
    t.fill_(r + 1.0);
    gate.release_after(std::chrono::milliseconds(300));
    mpi.allreduce(t)->wait();
  }
  CHECK(torch::allclose(t.cpu(), torch::full({1 << 16}, n * (n + 1) / 2.0)));
  // In place: this rank's slice of the output is the input (allgather), the output the input's slice
  // (reduce_scatter).
  const int64_t m = 5;
  auto whole = torch::zeros({n * m}, options);
  whole.narrow(0, r * m, m).fill_(r + 1.0);
  mpi.allgather(whole.narrow(0, r * m, m), whole)->wait();
  CHECK(torch::equal(whole.cpu(), torch::arange(1, n + 1, torch::kFloat).repeat_interleave(m)));
  auto in = torch::full({n * m}, r + 1.0, options);
  mpi.reduce_scatter(in, in.narrow(0, r * m, m))->wait();
  CHECK(torch::allclose(in.narrow(0, r * m, m).cpu(), torch::full({m}, n * (n + 1) / 2.0)));
}

TEST_CASE("DataParallel on CUDA matches one process on the concatenated batch", "[gpu][ddp]") {
  const int n = comm().size(), r = comm().rank();
  torch::manual_seed(3);
  auto model = Net();
  model->to(device());
  auto oracle = Net();
  {
    torch::NoGradGuard no_grad;
    auto src = model->parameters();
    auto dst = oracle->parameters();
    for (size_t i = 0; i < src.size(); ++i) dst[i].copy_(src[i].cpu());
  }
  lockstep::ddp::DataParallel dp(model, comm_ptr());
  torch::manual_seed(7);
  auto x = torch::randn({4 * n, 1, 8, 8});
  auto y = torch::randint(0, 4, {4 * n}, torch::kLong);
  model->train();
  oracle->train();
  // BatchNorm in training mode normalises per rank; compare in eval mode for an exact oracle.
  model->eval();
  oracle->eval();
  auto loss = torch::nn::functional::cross_entropy(model->forward(x.narrow(0, 4 * r, 4).to(device())),
                                                   y.narrow(0, 4 * r, 4).to(device()));
  loss.backward();
  torch::nn::functional::cross_entropy(oracle->forward(x), y).backward();
  auto got = model->parameters();
  auto want = oracle->parameters();
  for (size_t i = 0; i < got.size(); ++i) {
    INFO("parameter " << i);
    CHECK(got[i].grad().is_cuda());
    CHECK(torch::allclose(got[i].grad().cpu(), want[i].grad(), 1e-4, 1e-5));
  }
}

TEST_CASE("the trainer trains on CUDA in fp32, bf16 and fp16", "[gpu][train]") {
  for (const std::string precision : {"fp32", "bf16", "fp16"}) {
    INFO("precision " << precision);
    torch::manual_seed(11);
    auto model = Net();
    auto optimizer =
        std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
    lockstep::train::DistributedTrainer trainer(model, optimizer, comm_ptr(), cuda_trainer(4, precision));
    CHECK(trainer.device().is_cuda());
    for (const auto& p : model->parameters()) CHECK(p.is_cuda());
    const auto before = trainer.evaluate(images(128));
    const auto after = trainer.fit(images(128 * comm().size()), images(128));
    CHECK(after.at("test_loss") < before.at("test_loss") * 0.8);
    CHECK(lockstep::testing::identical_across_ranks(*model));
    if (precision == "fp16") {
      REQUIRE(trainer.grad_scaler() != nullptr);
      CHECK(after.count("loss_scale") == 1);
    }
  }
}

TEST_CASE("the trainer under fp16 skips, on every rank, the step whose gradient overflowed on one rank",
          "[gpu][train]") {
  // The last rank's third batch is all inf: its gradients, and after the all-reduce everyone's, are not
  // finite. The step must be skipped on every rank (no optimizer step, the scale backs off), the ranks
  // stay identical, and autocast really ran in float16.
  struct Poison : lockstep::train::Callback {
    std::vector<bool> skipped;
    at::ScalarType output_type = at::kFloat;
    std::vector<torch::Tensor> before, after;  // the model around the poisoned step
    void on_batch_begin(lockstep::train::TrainerContext& ctx) override {
      if (ctx.global_step != 2) return;
      before = lockstep::testing::state_of(*ctx.model);
      if (ctx.world.rank == ctx.world.size - 1) ctx.batch.data.fill_(std::numeric_limits<float>::infinity());
    }
    void on_after_backward(lockstep::train::TrainerContext& ctx) override {
      skipped.push_back(ctx.step_skipped);
      output_type = ctx.output.scalar_type();
    }
    void on_after_optimizer_step(lockstep::train::TrainerContext& ctx) override {
      if (!before.empty() && after.empty()) after = lockstep::testing::state_of(*ctx.model);
    }
  };
  torch::manual_seed(14);
  lockstep::testing::SmallConvNet model;  // no batch norm: an inf batch would poison its statistics
  auto optimizer = std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  lockstep::train::TrainerOptions o = cuda_trainer(1, "fp16");
  o.grad_scaler.init_scale = 1024.0;  // low enough that only the poisoned step overflows
  lockstep::train::DistributedTrainer trainer(model, optimizer, comm_ptr(), o);
  auto poison = std::make_shared<Poison>();
  trainer.add_callback(poison);
  const auto metrics = trainer.fit(images(64 * comm().size()), images(32));
  CHECK(poison->output_type == torch::kHalf);
  REQUIRE(poison->skipped.size() == 4);  // 64 samples per rank, batches of 16
  CHECK_FALSE(poison->skipped[1]);
  CHECK(poison->skipped[2]);
  CHECK_FALSE(poison->skipped[3]);
  REQUIRE_FALSE(poison->after.empty());
  CHECK(lockstep::testing::bitwise_equal(poison->before, poison->after));
  CHECK(metrics.at("skipped_steps") == 1);
  CHECK(metrics.at("loss_scale") < 1024.0);  // backed off
  CHECK(lockstep::testing::identical_across_ranks(*model));
}

TEST_CASE("the loader's batches come out pinned, and their copy to the GPU does not wait for it", "[gpu][data]") {
  lockstep::data::LoaderOptions lo;
  lo.batch_size = 16;
  lo.pin_memory = true;
  lockstep::data::Loader loader(images(64), std::make_shared<lockstep::data::ShardedSampler>(64, 1, 0), lo);
  loader.start_epoch(0);
  auto batch = loader.next();
  REQUIRE(batch.has_value());
  CHECK(batch->data.is_pinned());
  CHECK(batch->target.is_pinned());
  c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(false, device().index());
  c10::cuda::CUDAStreamGuard on_side(side);
  lockstep::testing::StreamGate gate;
  gate.close(side.stream());
  const auto start = std::chrono::steady_clock::now();
  const torch::Tensor on_gpu = batch->data.to(device(), /*non_blocking=*/true);
  const double queued = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  CHECK(queued < 1.0);  // from pageable memory the copy would wait for the gate (20 s)
  gate.release();
  side.synchronize();
  CHECK(torch::equal(on_gpu.cpu(), batch->data));
}

TEST_CASE("metrics on CUDA: the confusion-matrix and top-k sums agree with the CPU's", "[gpu][train]") {
  // The sums are filled on the device (index_add_ of float64 counts, topk): the same model evaluated on
  // the CPU and on the GPU gives the same values (a near-tie may flip one prediction: within 1/100).
  torch::manual_seed(12);
  auto gpu_model = Net();
  auto cpu_model = Net();
  {
    torch::NoGradGuard no_grad;
    auto src = gpu_model->parameters();
    auto dst = cpu_model->parameters();
    for (size_t i = 0; i < src.size(); ++i) dst[i].copy_(src[i]);
  }
  lockstep::train::TrainerOptions o = cuda_trainer(1, "fp32");
  o.metrics = {"accuracy", "top2_accuracy", "macro_f1", "mean_iou"};
  auto sgd = [](auto& m) { return std::make_shared<torch::optim::SGD>(m->parameters(), torch::optim::SGDOptions(0.0)); };
  lockstep::train::DistributedTrainer on_gpu(gpu_model, sgd(gpu_model), comm_ptr(), o);
  o.device = "cpu";
  lockstep::train::DistributedTrainer on_cpu(cpu_model, sgd(cpu_model), comm_ptr(), o);
  const auto gpu = on_gpu.evaluate(images(100));
  const auto cpu = on_cpu.evaluate(images(100));
  for (const std::string key : {"test_acc", "test_top2_acc", "test_macro_f1", "test_mean_iou"}) {
    INFO(key);
    CHECK(gpu.at(key) == Approx(cpu.at(key)).margin(0.01));
  }
  CHECK(gpu.at("test_count") == 100);
}

TEST_CASE("the trainer accumulates and clips on CUDA under fp16 loss scaling", "[gpu][train]") {
  torch::manual_seed(13);
  auto model = Net();
  auto optimizer = std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  lockstep::train::TrainerOptions o = cuda_trainer(4, "fp16");
  o.batch_size = 8;
  o.accumulation_steps = 2;
  o.clip_grad_norm = 5.0;
  lockstep::train::DistributedTrainer trainer(model, optimizer, comm_ptr(), o);
  const auto before = trainer.evaluate(images(128));
  const auto after = trainer.fit(images(128 * comm().size()), images(128));
  CHECK(after.at("test_loss") < before.at("test_loss") * 0.8);
  CHECK(after.at("step") == 4 * 8);  // 128 samples per rank: 16 micro-batches, 8 steps per epoch
  CHECK(after.count("grad_norm") == 1);
  CHECK(lockstep::testing::identical_across_ranks(*model));
}

TEST_CASE("the trainer stops on CUDA after the same step on every rank (Note [Stop on signal])", "[gpu][train]") {
  struct AskAtStep : lockstep::train::Callback {
    lockstep::train::DistributedTrainer* trainer = nullptr;
    int64_t last_step = 0;
    void on_after_optimizer_step(lockstep::train::TrainerContext& ctx) override {
      last_step = ctx.global_step;
      if (ctx.world.rank == ctx.world.size - 1 && ctx.global_step == 3) trainer->request_stop();
    }
  };
  torch::manual_seed(17);
  auto model = Net();
  auto optimizer = std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.05));
  lockstep::train::DistributedTrainer trainer(model, optimizer, comm_ptr(), cuda_trainer(2, "fp32"));
  auto ask = std::make_shared<AskAtStep>();
  ask->trainer = &trainer;
  trainer.add_callback(ask);
  trainer.fit(images(128 * comm().size()), nullptr);
  CHECK(ask->last_step == 5);  // posted after step 3, read two posts later
  CHECK(trainer.stop_reason() == "request_stop() on rank " + std::to_string(comm().size() - 1));
  CHECK(lockstep::testing::identical_across_ranks(*model));
}

TEST_CASE("a checkpoint written on CUDA loads into a CPU model and into a CUDA one (Note [Checkpoints across devices])",
          "[gpu][train]") {
  torch::manual_seed(23);
  auto model = Net();
  auto sgd = torch::optim::SGDOptions(0.05).momentum(0.9);
  auto optimizer = std::make_shared<torch::optim::SGD>(model->parameters(), sgd);
  lockstep::train::TrainerOptions o = cuda_trainer(1, "fp32");
  o.checkpoints = true;
  o.output_dir = lockstep::testing::shared_temp_dir("gpu_checkpoint_devices");
  lockstep::train::DistributedTrainer trainer(model, optimizer, comm_ptr(), o);
  const auto metrics = trainer.fit(images(64 * comm().size()), nullptr);
  const auto listed = lockstep::train::list_checkpoints(o.output_dir + "/checkpoints");
  REQUIRE_FALSE(listed.empty());
  for (const torch::Device target : {torch::Device(torch::kCPU), device()}) {
    INFO("loaded onto " << target);
    auto other = Net();
    other->to(target);
    torch::optim::SGD other_optimizer(other->parameters(), sgd);
    lockstep::train::TrainerContext ctx;
    ctx.communicator = &comm();
    ctx.model = other.ptr().get();
    ctx.optimizer = &other_optimizer;
    lockstep::train::CheckpointOptions checkpoint;
    checkpoint.directory = o.output_dir + "/checkpoints";
    lockstep::train::Checkpointer(checkpoint).load(ctx, listed.back());
    CHECK(ctx.global_step == static_cast<int64_t>(metrics.at("step")));
    const auto want = model->parameters();
    const auto got = other->parameters();
    for (size_t i = 0; i < got.size(); ++i) {
      CHECK(got[i].device() == target);
      CHECK(torch::equal(got[i].cpu(), want[i].detach().cpu()));
      got[i].mutable_grad() = torch::ones_like(got[i]);
    }
    // The momentum buffers came onto the parameters' device too: a step mixing devices would throw.
    CHECK_NOTHROW(other_optimizer.step());
  }
}

TEST_CASE("a checkpoint restores every rank's CUDA generator: random ops on the GPU go on where they stopped",
          "[gpu][train]") {
  torch::manual_seed(29 + comm().rank());
  auto model = Net();
  model->to(device());
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
  lockstep::train::TrainerContext ctx;
  ctx.communicator = &comm();
  ctx.model = model.ptr().get();
  ctx.optimizer = &optimizer;
  lockstep::train::CheckpointOptions checkpoint;
  checkpoint.directory = lockstep::testing::shared_temp_dir("gpu_checkpoint_rng") + "/checkpoints";
  lockstep::train::Checkpointer checkpointer(checkpoint);
  checkpointer.save(ctx, lockstep::data::SamplerState{});
  const auto on_gpu = torch::TensorOptions().device(device());
  const torch::Tensor expected = torch::rand({1000}, on_gpu);  // what dropout would draw next
  torch::rand({5000}, on_gpu);                                 // the run goes on, then stops
  checkpointer.load(ctx, checkpointer.last_path());
  // Before, only the CPU generator was saved: the GPU one went on from wherever it was.
  CHECK(torch::equal(torch::rand({1000}, on_gpu).cpu(), expected.cpu()));
}

TEST_CASE("ZeroRedundancyOptimizer on CUDA: bitwise the unsharded Adam", "[gpu][zero]") {
  const int n = comm().size(), r = comm().rank();
  torch::manual_seed(19);
  auto plain_model = Net();
  auto sharded_model = Net();
  {
    torch::NoGradGuard no_grad;
    auto a = plain_model->parameters();
    auto b = sharded_model->parameters();
    for (size_t i = 0; i < a.size(); ++i) b[i].copy_(a[i]);
  }
  plain_model->to(device());
  sharded_model->to(device());
  auto factory = [](std::vector<at::Tensor> p) {
    return std::make_unique<torch::optim::Adam>(std::move(p), torch::optim::AdamOptions(0.01));
  };
  auto plain = factory(plain_model->parameters());
  // Built before the move would work too (its buffer follows the parameters at the first step).
  lockstep::ddp::ZeroRedundancyOptimizer sharded(sharded_model->parameters(), comm_ptr(), factory);
  lockstep::ddp::DataParallel dp_plain(plain_model, comm_ptr());
  lockstep::ddp::DataParallel dp(sharded_model, comm_ptr());
  for (int step = 0; step < 3; ++step) {
    torch::manual_seed(40 + step);
    auto x = torch::randn({4 * n, 1, 8, 8}).narrow(0, 4 * r, 4).to(device());
    auto y = torch::randint(0, 4, {4 * n}, torch::kLong).narrow(0, 4 * r, 4).to(device());
    plain->zero_grad();
    torch::nn::functional::cross_entropy(plain_model->forward(x), y).backward();
    plain->step();
    sharded.zero_grad();
    torch::nn::functional::cross_entropy(sharded_model->forward(x), y).backward();
    sharded.step();
  }
  auto a = plain_model->parameters();
  auto b = sharded_model->parameters();
  for (size_t i = 0; i < a.size(); ++i) CHECK(torch::equal(a[i].cpu(), b[i].cpu()));
}

TEST_CASE("PowerSGD on CUDA: the trainer trains, the ranks stay identical, bytes are saved", "[gpu][ddp]") {
  torch::manual_seed(23);
  auto model = Net();
  auto optimizer = std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  lockstep::ddp::PowerSGDOptions p;
  p.start_iteration = 2;
  p.min_compression_rate = 1.0;
  auto state = std::make_shared<lockstep::ddp::PowerSGDState>(p);
  lockstep::train::TrainerOptions o = cuda_trainer(4, "bf16");
  o.ddp.comm_hook = lockstep::ddp::powersgd_hook(state);
  lockstep::train::DistributedTrainer trainer(model, optimizer, comm_ptr(), o);
  const auto before = trainer.evaluate(images(128));
  const auto after = trainer.fit(images(128 * comm().size()), images(128));
  CHECK(after.at("test_loss") < before.at("test_loss") * 0.8);
  CHECK(lockstep::testing::identical_across_ranks(*model));
  CHECK(state->stats().compressed_buckets > 0);
}

TEST_CASE("weight averaging on CUDA: the model ends with the average, the same on every rank", "[gpu][train]") {
  torch::manual_seed(29);
  auto model = Net();
  auto optimizer = std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.05));
  lockstep::train::DistributedTrainer trainer(model, optimizer, comm_ptr(), cuda_trainer(2, "fp32"));
  lockstep::train::EmaOptions e;
  e.decay = 0.9;
  auto ema = std::make_shared<lockstep::train::ExponentialMovingAverage>(e);
  trainer.add_callback(ema);
  trainer.fit(images(64 * comm().size()), images(64));
  CHECK(ema->updates() == 2 * 4);  // 64 samples per rank, batch 16: 4 steps per epoch
  auto params = model->parameters();
  for (size_t i = 0; i < params.size(); ++i) {
    CHECK(ema->average()[i].is_cuda());
    CHECK(torch::equal(params[i], ema->average()[i]));
  }
  CHECK(lockstep::testing::identical_across_ranks(*model));
}

TEST_CASE("quantization-aware training on CUDA: ranges agree over ranks, the int8 file matches", "[gpu][quant]") {
  for (const std::string precision : {"fp32", "bf16"}) {
    INFO("precision " << precision);
    const std::string dir = lockstep::testing::shared_temp_dir("gpu_qat_" + precision);
    torch::manual_seed(13);
    lockstep::testing::SmallConvNet model(/*batch_norm=*/true, /*quantize_activations=*/true);
    auto optimizer =
        std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
    lockstep::train::DistributedTrainer trainer(model, optimizer, comm_ptr(), cuda_trainer(3, precision));
    lockstep::compress::QuantizationOptions q;
    q.begin_epoch = 1;
    q.print_table = false;
    q.export_path = dir + "/model.int8";
    trainer.add_callback(std::make_shared<lockstep::compress::QuantizationAwareTraining>(q));
    const auto before = trainer.evaluate(images(128));
    const auto after = trainer.fit(images(128 * comm().size()), images(128));
    CHECK(after.at("test_loss") < before.at("test_loss") * 0.9);
    CHECK(model->quant_relu->min_val.is_cuda());
    // The ranges went through the communicator on the device: the same on every rank.
    const auto range = torch::stack({model->quant_relu->min_val, model->quant_relu->max_val}).to(torch::kCPU, torch::kDouble);
    auto all = torch::empty({2 * comm().size()}, torch::kDouble);
    lockstep::comm::MpiCommunicator mpi;
    mpi.allgather(range, all)->wait();
    for (int r = 1; r < comm().size(); ++r) CHECK(torch::equal(all.narrow(0, 2 * r, 2), all.narrow(0, 0, 2)));
    // The int8 file, read on the CPU, computes what the trained model computes on the GPU.
    lockstep::testing::SmallConvNet loaded(true, true);
    lockstep::compress::load_int8(*loaded, q.export_path);
    model->eval();
    loaded->eval();
    const auto x = torch::rand({8, 1, 8, 8});
    const auto on_gpu = model->forward(x.to(device())).to(torch::kCPU, torch::kFloat);
    // Not bitwise: a value on a rounding edge may take the neighbouring uint8 code on one device.
    const auto on_cpu = loaded->forward(x);
    CHECK(((on_gpu - on_cpu).norm() / on_cpu.norm()).item<double>() < 0.05);
  }
}

TEST_CASE("SyncBatchNorm on CUDA: one process's BatchNorm on the whole batch, in fp32 and bf16", "[gpu][syncbn]") {
  const int n = comm().size(), r = comm().rank();
  for (const auto dtype : {torch::kFloat, torch::kBFloat16}) {
    INFO("dtype " << dtype);
    lockstep::ddp::SyncBatchNorm sync(6);
    torch::nn::BatchNorm2d oracle(6);
    {
      torch::NoGradGuard no_grad;
      torch::manual_seed(2);
      oracle->weight.uniform_(0.5, 2);
      oracle->bias.uniform_(-1, 1);
      sync->weight.copy_(oracle->weight);
      sync->bias.copy_(oracle->bias);
    }
    sync->to(device());
    lockstep::ddp::attach_sync_batch_norm(*sync, comm_ptr());
    CHECK(sync->synchronised() == (n > 1));
    torch::manual_seed(9);
    const torch::Tensor x = (torch::randn({4 * n, 6, 5, 5}) * 2 + 3).to(dtype).to(torch::kFloat);  // bf16-exact
    const torch::Tensor g = torch::randn({4 * n, 6, 5, 5});
    const torch::Tensor mine = x.narrow(0, 4 * r, 4).to(device()).to(dtype).requires_grad_(true);
    const torch::Tensor whole = x.clone().requires_grad_(true);
    const torch::Tensor y = sync->forward(mine);
    CHECK(y.is_cuda());
    CHECK(y.scalar_type() == dtype);
    (y.to(torch::kFloat) * g.narrow(0, 4 * r, 4).to(device())).sum().backward();
    const torch::Tensor y_ref = oracle->forward(whole);
    (y_ref * g).sum().backward();
    const double tol = dtype == torch::kFloat ? 1e-4 : 3e-2;
    CHECK(torch::allclose(y.cpu().to(torch::kFloat), y_ref.narrow(0, 4 * r, 4), tol, tol));
    CHECK(torch::allclose(mine.grad().cpu().to(torch::kFloat), whole.grad().narrow(0, 4 * r, 4), tol, tol));
    CHECK(torch::allclose(sync->running_mean.cpu(), oracle->running_mean, 1e-4, 1e-4));
    CHECK(torch::allclose(sync->running_var.cpu(), oracle->running_var, 1e-4, 1e-4));
  }
}

TEST_CASE("SyncBatchNorm on CUDA: a step with one value per channel in all leaves the running statistics",
          "[gpu][syncbn]") {
  // The CPU refuses it (a host check); on the GPU the count stays on the device, so the statistics
  // are kept instead of the variance being pulled to 0 (one value) or set to nan (none).
  lockstep::ddp::SyncBatchNorm sync(3);
  sync->to(device());
  lockstep::ddp::attach_sync_batch_norm(*sync, comm_ptr());
  sync->train();
  if (!sync->synchronised()) {
    // One rank: SyncBatchNorm is LibTorch's batch norm, whose host check refuses one value per channel.
    CHECK_THROWS_WITH(sync->forward(torch::randn({1, 3, 1, 1}, torch::TensorOptions().device(device()))),
                      Catch::Matchers::Contains("more than 1 value per channel"));
    return;
  }
  for (const int64_t samples : {int64_t{1}, int64_t{0}}) {
    INFO(samples << " sample(s) on rank 0, none elsewhere");
    const torch::Tensor mean_before = sync->running_mean.clone();
    const torch::Tensor var_before = sync->running_var.clone();
    const int64_t mine = comm().rank() == 0 ? samples : 0;
    sync->forward(torch::randn({mine, 3, 1, 1}, torch::TensorOptions().device(device())));
    CHECK(torch::equal(sync->running_mean, mean_before));
    CHECK(torch::equal(sync->running_var, var_before));
  }
  sync->forward(torch::randn({4, 3, 2, 2}, torch::TensorOptions().device(device())));  // enough: updated
  CHECK_FALSE(torch::equal(sync->running_var, torch::ones_like(sync->running_var)));
}

TEST_CASE("SyncBatchNorm over NCCL: forward and backward are queued without waiting for the GPU", "[gpu][syncbn]") {
  // Note [No host sync per step]: the statistics' all-gathers run on the device, and their payload is
  // built there (a host-made tensor copied in made every layer's forward and backward wait for the GPU).
  // Through MPI (ranks sharing a GPU) CUDA tensors are staged through the host, which must wait.
  const int n = comm().size(), r = comm().rank();
  if (n < 2 || comm().backend() != "nccl") {
    WARN("skipped: needs 2 or more ranks with a GPU each (NCCL); here " << n << " rank(s), backend "
                                                                       << comm().backend());
    return;
  }
  c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(false, device().index());
  c10::cuda::CUDAStreamGuard on_side(side);
  lockstep::ddp::SyncBatchNorm sync(6);
  torch::nn::BatchNorm2d oracle(6);
  sync->to(device());
  lockstep::ddp::attach_sync_batch_norm(*sync, comm_ptr());
  torch::manual_seed(9);
  const torch::Tensor x = torch::randn({4 * n, 6, 5, 5}) * 2 + 3;
  const torch::Tensor mine = x.narrow(0, 4 * r, 4).to(device()).requires_grad_(true);
  const torch::Tensor whole = x.clone().requires_grad_(true);
  side.synchronize();
  lockstep::testing::StreamGate gate;
  gate.close(side.stream());
  const auto start = std::chrono::steady_clock::now();
  sync->forward(mine).square().sum().backward();
  const double queued = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  gate.release();
  CHECK(queued < 1.0);
  oracle->forward(whole).square().sum().backward();
  CHECK(torch::allclose(mine.grad().cpu(), whole.grad().narrow(0, 4 * r, 4), 1e-4, 1e-4));
  CHECK(torch::allclose(sync->running_mean.cpu(), oracle->running_mean, 1e-4, 1e-4));
}

namespace {

// Runs `ours` and `theirs` (the same optimizer type's foreach and LibTorch versions) for 5 steps on
// identical CUDA parameters and gradients; the foreach kernels may contract a + alpha * b into one
// fused multiply-add where LibTorch's per-tensor kernels do not: equal to a few float32 ulps, not
// bitwise as on the CPU.
template <class Ours, class Theirs, class Options>
void check_foreach_on_cuda(const Options& options) {
  auto make = [] {
    torch::manual_seed(5);
    std::vector<torch::Tensor> params;
    for (int64_t n : {1000, 37, 4096, 3}) {
      params.push_back(torch::randn({n}, torch::TensorOptions().device(device())).requires_grad_(true));
    }
    return params;
  };
  auto ours = make(), theirs = make();
  Ours foreach_opt(ours, options);
  Theirs reference(theirs, options);
  for (int step = 0; step < 5; ++step) {
    torch::manual_seed(100 + step);
    for (std::size_t i = 0; i < ours.size(); ++i) {
      const auto g = torch::randn_like(ours[i]);
      ours[i].mutable_grad() = g.clone();
      theirs[i].mutable_grad() = g.clone();
    }
    foreach_opt.step();
    reference.step();
  }
  for (std::size_t i = 0; i < ours.size(); ++i) {
    CHECK(ours[i].device() == device());
    CHECK(torch::allclose(ours[i].detach().cpu(), theirs[i].detach().cpu(), 1e-5, 1e-6));
  }
}

}  // namespace

TEST_CASE("foreach optimizers on CUDA: LibTorch's SGD, Adam and AdamW steps in a few multi-tensor kernels",
          "[gpu][optim]") {
  check_foreach_on_cuda<lockstep::train::ForeachSGD, torch::optim::SGD>(
      torch::optim::SGDOptions(0.1).momentum(0.9).weight_decay(1e-4).nesterov(true));
  check_foreach_on_cuda<lockstep::train::ForeachAdam, torch::optim::Adam>(
      torch::optim::AdamOptions(1e-2).weight_decay(1e-2).amsgrad(true));
  check_foreach_on_cuda<lockstep::train::ForeachAdamW, torch::optim::AdamW>(torch::optim::AdamWOptions(1e-2));
}

TEST_CASE("clip_grad_norm on CUDA: LibTorch's result, queued without waiting for the GPU", "[gpu][train]") {
  // Note [No host sync per step]: LibTorch's clip_grad_norm_ returns a double, so it waits for all the
  // work queued before it; train::clip_grad_norm keeps the norm on the device.
  c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(false, device().index());
  c10::cuda::CUDAStreamGuard on_side(side);
  torch::manual_seed(41);
  std::vector<torch::Tensor> ours, theirs;
  for (int64_t n : {1000, 37, 4096, 3}) {
    auto p = torch::randn({n}).requires_grad_(true);
    auto q = p.detach().clone().requires_grad_(true);
    p.mutable_grad() = torch::randn({n}) * 2;
    q.mutable_grad() = p.grad().clone();
    ours.push_back(p.detach().to(device()).requires_grad_(true));
    ours.back().mutable_grad() = p.grad().to(device());
    theirs.push_back(q);
  }
  side.synchronize();
  lockstep::testing::StreamGate gate;
  gate.close(side.stream());
  const auto start = std::chrono::steady_clock::now();
  const torch::Tensor norm = lockstep::train::clip_grad_norm(ours, 1.0);
  const double queued = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  gate.release();
  CHECK(queued < 1.0);
  CHECK(norm.device() == device());
  const double expected = torch::nn::utils::clip_grad_norm_(theirs, 1.0);
  CHECK(norm.item<double>() == Approx(expected).epsilon(1e-5));
  for (std::size_t i = 0; i < ours.size(); ++i) {
    INFO("parameter " << i);
    CHECK(torch::allclose(ours[i].grad().cpu(), theirs[i].grad(), 1e-5, 1e-7));
  }
}

TEST_CASE("GradScaler on CUDA: one kernel unscales float32 and float16 gradients; inf or nan on any rank skips",
          "[gpu][train]") {
  // The fused path (_amp_foreach_non_finite_check_and_unscale_) against the closed form, with the
  // runtime's communicator (NCCL, or MPI with staged CUDA tensors) agreeing on the flag.
  const int rank = comm().rank(), last = comm().size() - 1;
  lockstep::train::GradScalerOptions o;
  o.init_scale = 1024.0;
  lockstep::train::GradScaler scaler(o);
  auto a = torch::zeros({5}, torch::TensorOptions().device(device())).requires_grad_(true);
  auto b = torch::zeros({3}, torch::TensorOptions().device(device()).dtype(torch::kHalf)).requires_grad_(true);
  auto unused = torch::zeros({2}, torch::TensorOptions().device(device())).requires_grad_(true);
  auto set_grads = [&](double value) {
    a.mutable_grad() = torch::full({5}, value * 1024.0, a.options());
    b.mutable_grad() = torch::full({3}, value * 1024.0, b.options());
  };
  set_grads(0.25);
  CHECK_FALSE(scaler.unscale({a, unused, b}, comm()));
  CHECK(torch::equal(a.grad().cpu(), torch::full({5}, 0.25)));
  CHECK(b.grad().scalar_type() == torch::kHalf);
  CHECK(torch::equal(b.grad().cpu().to(torch::kFloat), torch::full({3}, 0.25)));
  CHECK_FALSE(unused.grad().defined());

  set_grads(1.0);
  if (rank == last) b.mutable_grad()[1] = std::numeric_limits<float>::infinity();
  CHECK(scaler.unscale({a, b}, comm()));
  set_grads(1.0);
  if (rank == 0) a.mutable_grad()[4] = std::numeric_limits<float>::quiet_NaN();
  CHECK(scaler.unscale({a, b}, comm()));
  set_grads(1.0);
  CHECK_FALSE(scaler.unscale({a, b}, comm()));
}
