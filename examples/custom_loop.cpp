// Adding Lockstep to your own LibTorch training loop.
//
//   mpirun -np 2 ./custom_loop
//
// Each rank trains the same small MLP on its own slice of a synthetic regression problem;
// DataParallel averages the gradients over ranks while backward runs, so the loop itself is
// ordinary LibTorch code.
#include <torch/torch.h>

#include <cstdio>

#include "lockstep/ddp/data_parallel.hpp"
#include "lockstep/runtime.hpp"

struct MlpImpl : torch::nn::Module {
  MlpImpl()
      : fc1(register_module("fc1", torch::nn::Linear(16, 64))),
        fc2(register_module("fc2", torch::nn::Linear(64, 64))),
        fc3(register_module("fc3", torch::nn::Linear(64, 1))) {}
  torch::Tensor forward(torch::Tensor x) {
    x = torch::relu(fc1(x));
    x = torch::relu(fc2(x));
    return fc3(x);
  }
  torch::nn::Linear fc1, fc2, fc3;
};
TORCH_MODULE(Mlp);

int main(int argc, char** argv) {
  // 1. MPI up, rank and world size known, malloc and threads tuned for this host.
  lockstep::Runtime runtime(argc, argv);
  const int rank = runtime.rank();
  const int world = runtime.size();
  const torch::Device device = runtime.world().device;  // this rank's GPU, or the CPU

  // 2. The model, built the same way on every rank (DataParallel checks, then copies rank 0's values),
  //    on the device before DataParallel is made (its buckets live there).
  Mlp model;
  model->to(device);
  lockstep::ddp::DataParallel dp(model, runtime.communicator());
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));

  // 3. Synthetic data: y = sum(sin(x)). Every rank draws a different shard (seeded by rank).
  torch::manual_seed(1000 + rank);
  const torch::Tensor x = torch::randn({1024, 16}).to(device);
  const torch::Tensor y = torch::sin(x).sum(1, /*keepdim=*/true);

  constexpr int kBatch = 64;  // per rank; the global batch is kBatch * world
  for (int epoch = 0; epoch < 5; ++epoch) {
    double epoch_loss = 0;
    int batches = 0;
    for (int start = 0; start + kBatch <= x.size(0); start += kBatch) {
      optimizer.zero_grad();
      torch::Tensor loss = torch::mse_loss(model->forward(x.narrow(0, start, kBatch)), y.narrow(0, start, kBatch));
      loss.backward();   // gradients are all-reduced bucket by bucket while backward runs
      optimizer.step();  // ... and are the average over ranks here
      epoch_loss += loss.item<double>();
      ++batches;
    }
    if (rank == 0) {
      const auto& t = dp.last_step();
      std::printf(
          "epoch %d  loss (rank 0's shard) %.4f  last step: backward %.2f ms, all-reduce %.2f ms "
          "(%.2f ms not hidden), %zu buckets, %d ranks\n",
          epoch, epoch_loss / batches, 1e3 * t.backward_s, 1e3 * t.communication_s, 1e3 * t.exposed_communication_s,
          t.bucket_count, world);
    }
  }
  return 0;
}
