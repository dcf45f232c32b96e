// Adding Lockstep to your own LibTorch training loop.
//
//   mpirun -np 2 ./custom_loop [epochs: 1 to 1000000, default 5]
//
// Each rank trains the same small MLP on its own slice of a synthetic regression problem;
// DataParallel averages the gradients over ranks while backward runs, so the loop itself is
// ordinary LibTorch code. The slices are uneven (rank r has 2r more batches than rank 0), as data
// split by files often is: a ddp::Join lets the ranks that finish first take part in the others'
// remaining steps instead of leaving them waiting. A train::MetricTracker reports each epoch's loss and
// mean absolute error over every rank's samples (exact, whatever the shard sizes). SIGTERM or SIGUSR1 (a scheduler's, or
// `kill -USR1 <mpirun>`) stops every rank after the same step, with exit status 128 + the signal.
#include <torch/torch.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "lockstep/comm/agree.hpp"
#include "lockstep/core/stop_signals.hpp"
#include "lockstep/ddp/data_parallel.hpp"
#include "lockstep/ddp/join.hpp"
#include "lockstep/runtime.hpp"
#include "lockstep/train/metric_tracker.hpp"

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
  // The whole argument must be the number ("3x" is not 3), in range (no overflow): every rank reads the
  // same command line, so every rank leaves alike, with a usage error from rank 0.
  int epochs = 5;
  if (argc > 2) {
    if (rank == 0) std::fprintf(stderr, "custom_loop: unexpected argument '%s'\nusage: custom_loop [epochs]\n", argv[2]);
    return 2;
  }
  if (argc > 1 && (std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0)) {
    if (rank == 0) {
      std::printf("usage: custom_loop [epochs]\n  epochs  an integer from 1 to 1000000 (default 5)\n"
                  "A training loop written by hand with DataParallel (see docs/ddp.md).\n");
    }
    return 0;
  }
  if (argc > 1) {
    char* end = nullptr;
    errno = 0;
    const long value = std::strtol(argv[1], &end, 10);
    if (end == argv[1] || *end != '\0' || errno == ERANGE || value < 1 || value > 1000000) {
      if (rank == 0) {
        std::fprintf(stderr,
                     "custom_loop: the epochs argument must be an integer from 1 to 1000000, got '%s'\n"
                     "usage: custom_loop [epochs]\n",
                     argv[1]);
      }
      return 2;
    }
    epochs = static_cast<int>(value);
  }

  // 2. The model, built the same way on every rank (DataParallel checks, then copies rank 0's values),
  //    on the device before DataParallel is made (its buckets live there). Seeded, so that rank 0's
  //    initialisation, and with it every loss below, is the same from run to run.
  torch::manual_seed(0);
  Mlp model;
  model->to(device);
  lockstep::ddp::DataParallel dp(model, runtime.communicator());
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));

  // 3. Synthetic data: y = sum(sin(x)). Every rank draws a different shard (seeded by rank), of
  //    1024 + 128 * rank samples.
  torch::manual_seed(1000 + rank);
  const torch::Tensor x = torch::randn({1024 + 128 * rank, 16}).to(device);
  const torch::Tensor y = torch::sin(x).sum(1, /*keepdim=*/true);

  // 5. A stop signal only raises a flag; the Join's per-step all-gather carries it to every rank
  //    (JoinOptions::stop_code), so all of them leave after the same step.
  lockstep::StopSignals signals({"SIGTERM", "SIGUSR1"});
  lockstep::ddp::JoinOptions join_options;
  join_options.stop_code = [&] { return signals.caught(); };

  // 6. The epoch's loss and mean absolute error over every rank's samples: sums kept on the device
  //    (no host synchronisation per step) and all-reduced once an epoch.
  lockstep::train::MetricTracker tracker(lockstep::train::make_metrics({"mae"}));

  constexpr int kBatch = 64;  // per rank; the global batch is kBatch * world
  for (int epoch = 0; epoch < epochs; ++epoch) {
    int batches = 0;
    tracker.reset();
    lockstep::ddp::Join join(dp, join_options);  // 4. uneven shards: see the end of the epoch
    for (int start = 0; start + kBatch <= x.size(0); start += kBatch) {
      optimizer.zero_grad();
      const torch::Tensor target = y.narrow(0, start, kBatch);
      const torch::Tensor output = model->forward(x.narrow(0, start, kBatch));
      torch::Tensor loss = torch::mse_loss(output, target);
      loss.backward();   // gradients are all-reduced bucket by bucket while backward runs
      optimizer.step();  // ... and are the average over ranks here
      tracker.update(output, target, loss);  // 6.
      ++batches;
      if (join.stop_requested()) break;  // 5. the same step on every rank still training
    }
    const lockstep::ddp::StepTimings t = dp.last_step();  // this rank's last own step
    // Collective: until every rank is done, take part in the others' steps (zero gradients of our
    // own) and take the same optimizer step with the gradients they averaged.
    const lockstep::ddp::JoinResult joined = join.finish([&] { optimizer.step(); });
    // 6. Collective, so after the Join (inside it only the Join's own collectives may run).
    const std::map<std::string, double> metrics = tracker.compute(*runtime.communicator());
    if (rank == 0) {
      std::printf(
          "epoch %d  loss %.4f  mae %.4f (%.0f samples, all ranks)  last step: backward %.2f ms, all-reduce %.2f ms "
          "(%.2f ms not hidden), %zu buckets, %d ranks; rank 0 trained %d steps and shadowed %lld\n",
          epoch, metrics.at("loss"), metrics.at("mae"), metrics.at("count"), 1e3 * t.backward_s, 1e3 * t.communication_s, 1e3 * t.exposed_communication_s,
          t.bucket_count, world, batches, static_cast<long long>(joined.shadowed_steps));
      std::fflush(stdout);
    }
    if (join.stop_requested()) {  // 5. every rank: the same codes (here a program would checkpoint)
      int signal = 0;
      std::vector<int> ranks;
      for (int r = 0; r < world; ++r) {
        if (joined.stop_codes[r] == 0) continue;
        if (signal == 0) signal = joined.stop_codes[r];
        ranks.push_back(r);
      }
      if (rank == 0) {
        std::printf("custom_loop: stopped in epoch %d by %s on %s; exiting with status %d\n", epoch,
                    lockstep::signal_name(signal).c_str(), lockstep::comm::rank_list(ranks).c_str(), 128 + signal);
        std::fflush(stdout);
      }
      return 128 + signal;
    }
  }
  return 0;
}
