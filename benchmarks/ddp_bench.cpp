// Data-parallel training step: Lockstep's DataParallel (bucketed all-reduce overlapping backward)
// against a naive loop (backward, then one blocking all-reduce per parameter, as in pytorch/examples'
// dist-mnist) and against no communication at all, for two models on synthetic data, in one run.
//
//   mpirun -np 2 build/benchmarks/ddp_bench [--steps 10] [--warmup 2] [--model resnet|mlp|all]
//       [--resnet-width 64] [--resnet-batch 32] [--mlp-width 2048] [--mlp-batch 16]
//       [--sync-bn] [--join] [--bucket-cap-mb 25[,4,...]] [--comm-hook allreduce[,fp16,bf16,powersgd]] [--powersgd-rank 1[,4,...]]
//       [--powersgd-start-iteration 0] [--trace PREFIX] [--json [FILE]]
//
// Per way: the median step time (slowest rank), images/s over all ranks, bucket count, the time the
// communicator spent on the all-reduces and the part of it backward did not hide ("exposed"), and
// backward's own compute time, which shows how much an all-reduce running beside backward slows it
// when compute and communication share the cores; and the bytes each rank hands to all-reduce per
// step ("wire MB"), which the compression hooks cut.
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <cctype>
#include <chrono>
#include <cstdio>
#include <functional>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "bench_cli.hpp"
#include "bench_report.hpp"
#include "bench_workloads.hpp"
#include "lockstep/ddp/data_parallel.hpp"
#include "lockstep/ddp/join.hpp"
#include "lockstep/ddp/powersgd.hpp"
#include "lockstep/runtime.hpp"

namespace {

using Clock = std::chrono::steady_clock;

struct Options {
  int steps = 10;
  int warmup = 2;
  std::string model = "all";
  std::int64_t resnet_width = 64;
  std::int64_t resnet_batch = 32;
  std::int64_t mlp_width = 2048;
  std::int64_t mlp_batch = 16;
  std::vector<double> bucket_caps_mb = {25.0};  // one Lockstep row per cap, hook (and PowerSGD rank)
  std::vector<std::string> comm_hooks = {"allreduce"};
  std::vector<std::int64_t> powersgd_ranks = {1};
  std::uint64_t powersgd_start_iteration = 0;
  bool json = false;
  std::string json_file;
  std::string trace;  // Chrome trace of the Lockstep runs, one file per model
  bool sync_bn = false;  // one more ResNet row: DataParallel with sync_batch_norm
  bool join = false;     // one more row per workload: training inside a ddp::Join (even inputs)
};

const char* const kDescription =
    "Data-parallel training step: Lockstep's DataParallel against a naive per-parameter all-reduce and against no "
    "communication, for a ResNet-18 and a wide MLP on synthetic data, in one run (MPI, CPU tensors).";

// Declares the command line on `app`, bound to `o` (parsed before MPI: Note [Parse before MPI] in bench_cli.hpp).
void add_options(CLI::App& app, Options& o) {
  app.add_option("--steps", o.steps, "timed steps per way")->capture_default_str()->check(bench::at_least(1));
  app.add_option("--warmup", o.warmup, "untimed steps first")->capture_default_str()->check(bench::at_least(0));
  app.add_option("--model", o.model, "which workloads")
      ->capture_default_str()
      ->check(CLI::IsMember({"resnet", "mlp", "all"}));
  app.add_option("--resnet-width", o.resnet_width, "ResNet-18 width (64: the standard one)")
      ->capture_default_str()
      ->check(bench::at_least<std::int64_t>(1));
  app.add_option("--resnet-batch", o.resnet_batch, "ResNet images per rank and step")
      ->capture_default_str()
      ->check(bench::at_least<std::int64_t>(1));
  app.add_option("--mlp-width", o.mlp_width, "MLP hidden width")
      ->capture_default_str()
      ->check(bench::at_least<std::int64_t>(1));
  app.add_option("--mlp-batch", o.mlp_batch, "MLP images per rank and step")
      ->capture_default_str()
      ->check(bench::at_least<std::int64_t>(1));
  app.add_option("--bucket-cap-mb", o.bucket_caps_mb, "bucket caps in MB, comma-separated: one Lockstep row each")
      ->type_name("MB[,MB...]")
      ->delimiter(',')
      ->capture_default_str()
      ->check(bench::at_least(0.0));
  app.add_option("--comm-hook", o.comm_hooks, "communication hooks, comma-separated: one Lockstep row each")
      ->type_name("HOOK[,HOOK...]")
      ->delimiter(',')
      ->capture_default_str()
      ->check(CLI::IsMember({"allreduce", "fp16", "bf16", "powersgd"}));
  app.add_option("--powersgd-rank", o.powersgd_ranks, "PowerSGD matrix_approximation_rank(s): one powersgd row each")
      ->type_name("R[,R...]")
      ->delimiter(',')
      ->capture_default_str()
      ->check(bench::at_least<std::int64_t>(1));
  app.add_option("--powersgd-start-iteration", o.powersgd_start_iteration,
                 "PowerSGD start_iteration (plain averaging before; 0: every step timed is compressed)")
      ->capture_default_str()
      ->check(bench::at_least<std::uint64_t>(0));
  app.add_flag("--join", o.join,
               "one more row per workload: the default Lockstep way inside a ddp::Join (even inputs), to measure "
               "its per-step cost");
  app.add_flag("--sync-bn", o.sync_bn,
               "also time DataParallel with sync_batch_norm on the ResNet (one more row, 'lockstep+syncbn')");
  app.add_option("--trace", o.trace,
                 "write a Chrome trace of the Lockstep runs to PREFIX.<model>.<cap>MB[.<hook>][.syncbn|.join].json")
      ->type_name("PREFIX");
  // Optional value: bare --json prints the JSON on stdout instead of the table, --json FILE writes it there.
  CLI::Option* json = app.add_option("--json", o.json_file, "JSON instead of the table: on stdout, or into FILE")
                          ->type_name("[FILE]")
                          ->expected(0, 1);
  app.callback([&o, json] {
    o.json = json->count() > 0;
    bench::no_repeats(o.bucket_caps_mb, "--bucket-cap-mb");
    bench::no_repeats(o.comm_hooks, "--comm-hook");
    bench::no_repeats(o.powersgd_ranks, "--powersgd-rank");
  });
}

// A wide MLP: its gradient is large next to its backward compute, so communication matters.
// A model and one rank's batch for it.
struct Workload : bench::Model {
  torch::Tensor x, y;
};

// One Lockstep configuration: bucket cap, hook and (for powersgd) rank.
struct LockstepWay {
  double bucket_cap_mb = 25.0;
  std::string hook = "allreduce";
  std::int64_t powersgd_rank = 1;
  bool sync_batch_norm = false;
  bool join = false;
};

struct Result {
  std::string model, way, hook;
  double wire_bytes = 0;  // per step and rank, handed to all-reduce
  int ranks = 1;
  std::int64_t batch_per_rank = 0, parameters = 0;
  double step_s = 0, images_per_s = 0, forward_s = 0, backward_compute_s = 0, communication_s = 0, exposed_s = 0;
  std::size_t buckets = 0;
};

// The shortest text that reads back as `mb` (25, 0.5, 0.25), in labels and trace file names: distinct
// caps must give distinct files, and the whole megabytes alone would make 0.5 and 0.25 both "0".
std::string mb_text(double mb) {
  std::ostringstream os;
  for (int digits = 6; digits <= 17; ++digits) {  // 6: the stream's default, enough for any usual cap
    os.str("");
    os.precision(digits);
    os << mb;
    if (std::stod(os.str()) == mb) break;
  }
  return os.str();
}

double seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

double max_over_ranks(lockstep::comm::Communicator& comm, double value) {
  torch::Tensor t = torch::full({1}, value, torch::kFloat64);
  comm.allreduce(t, {lockstep::comm::ReduceOp::Max})->wait();
  return t.item<double>();
}

// The median over steps of each step's slowest rank (as scaling_bench takes Tn): a synchronous step
// lasts as long as its slowest rank, and which rank is slowest changes from step to step, so the max
// over ranks of their medians would read low.
double median_of_slowest(lockstep::comm::Communicator& comm, const std::vector<double>& per_step) {
  torch::Tensor t = torch::tensor(per_step, torch::kFloat64);
  comm.allreduce(t, {lockstep::comm::ReduceOp::Max})->wait();
  return bench::median(std::vector<double>(t.data_ptr<double>(), t.data_ptr<double>() + t.numel()));
}

// One way of training one workload. The three ways of a workload take turns step by step, so that
// load from elsewhere on a shared machine falls on all of them alike.
class Runner {
 public:
  // way: "none", "naive" or "lockstep"; `lockstep` only for lockstep.
  Runner(const Workload& w, std::string way, const LockstepWay& lockstep, lockstep::comm::CommunicatorPtr comm,
         const Options& o)
      : w_(w), way_(std::move(way)), hook_(lockstep.hook), comm_(std::move(comm)) {
    torch::manual_seed(0);
    model_ = w.make();
    if (way_ == "lockstep") {
      const double bucket_cap_mb = lockstep.bucket_cap_mb;
      lockstep::ddp::DataParallelOptions options;
      options.bucket_cap_mb = bucket_cap_mb;
      options.sync_batch_norm = lockstep.sync_batch_norm;
      if (hook_ == "fp16") options.comm_hook = lockstep::ddp::fp16_compress_hook();
      if (hook_ == "bf16") options.comm_hook = lockstep::ddp::bf16_compress_hook();
      if (hook_ == "powersgd") {
        lockstep::ddp::PowerSGDOptions powersgd;
        powersgd.matrix_approximation_rank = lockstep.powersgd_rank;
        powersgd.start_iteration = o.powersgd_start_iteration;
        powersgd_ = std::make_shared<lockstep::ddp::PowerSGDState>(powersgd);
        options.comm_hook = lockstep::ddp::powersgd_hook(powersgd_);
      }
      std::ostringstream label;
      label << "lockstep";
      if (o.comm_hooks.size() > 1 || hook_ != "allreduce") label << "/" << hook_;
      if (hook_ == "powersgd") label << "-r" << lockstep.powersgd_rank;
      if (o.bucket_caps_mb.size() > 1) label << "/" << mb_text(bucket_cap_mb) << "MB";
      if (lockstep.sync_batch_norm) label << "+syncbn";
      if (lockstep.join) label << "+join";
      label_ = label.str();
      dp_ = std::make_unique<lockstep::ddp::DataParallel>(model_, comm_, options);
      if (lockstep.join) join_ = std::make_unique<lockstep::ddp::Join>(*dp_);
      if (!o.trace.empty()) {
        std::string id = w.name;
        for (char& c : id) c = std::isalnum(static_cast<unsigned char>(c)) ? c : '_';
        std::string hook = hook_ == "allreduce" ? "" : "." + hook_;
        if (hook_ == "powersgd") hook += "-r" + std::to_string(lockstep.powersgd_rank);
        if (lockstep.sync_batch_norm) hook += ".syncbn";
        if (lockstep.join) hook += ".join";  // else the --join row overwrites the plain row's trace
        dp_->enable_trace(o.trace + "." + id + "." + mb_text(bucket_cap_mb) + "MB" + hook + ".json");
        trace_ = true;
      }
    }
    parameters_ = model_->parameters();
    opt_ = std::make_unique<torch::optim::SGD>(parameters_, torch::optim::SGDOptions(0.01).momentum(0.9));
  }

  void step(bool record) {
    const int n = comm_->size();
    comm_->barrier()->wait();  // start every step together; not timed
    const auto t0 = Clock::now();
    opt_->zero_grad();
    torch::Tensor loss = torch::nn::functional::cross_entropy(w_.forward(*model_, w_.x), w_.y);
    const auto t1 = Clock::now();
    loss.backward();
    const auto t2 = Clock::now();
    if (way_ == "naive") {
      for (auto& p : parameters_) {
        comm_->allreduce(p.grad())->wait();
        p.grad().div_(n);
      }
    }
    const auto t3 = Clock::now();
    opt_->step();
    const auto t4 = Clock::now();
    const std::int64_t powersgd_bytes = powersgd_ ? wire_bytes_of(powersgd_->stats()) : 0;
    const std::int64_t powersgd_step_bytes = powersgd_bytes - powersgd_bytes_;
    powersgd_bytes_ = powersgd_bytes;
    if (!record) return;
    wire_.push_back(static_cast<double>(wire_bytes(powersgd_step_bytes)));
    step_.push_back(seconds(t0, t4));
    forward_.push_back(seconds(t0, t1));
    if (dp_) {
      const auto& t = dp_->last_step();
      // loss.backward() returns after the final wait: take the exposed part out of backward.
      backward_.push_back(seconds(t1, t2) - t.exposed_communication_s);
      communication_.push_back(t.communication_s);
      exposed_.push_back(t.exposed_communication_s);
      buckets_ = t.bucket_count;
    } else {
      backward_.push_back(seconds(t1, t2));
      const double blocking = way_ == "naive" ? seconds(t2, t3) : 0.0;  // naive: all of it is exposed
      communication_.push_back(blocking);
      exposed_.push_back(blocking);
      buckets_ = way_ == "naive" ? parameters_.size() : 0;
    }
  }

  // Collective.
  Result result() {
    if (join_) join_->finish();
    if (dp_ && trace_) dp_->write_trace();
    Result r;
    r.model = w_.name;
    r.way = label_.empty() ? way_ : label_;
    r.ranks = comm_->size();
    r.batch_per_rank = w_.x.size(0);
    for (const auto& p : parameters_) r.parameters += p.numel();
    r.step_s = median_of_slowest(*comm_, step_);
    r.images_per_s = static_cast<double>(r.ranks * w_.x.size(0)) / r.step_s;
    r.forward_s = max_over_ranks(*comm_, bench::median(forward_));
    r.backward_compute_s = max_over_ranks(*comm_, bench::median(backward_));
    r.communication_s = max_over_ranks(*comm_, bench::median(communication_));
    r.exposed_s = max_over_ranks(*comm_, bench::median(exposed_));
    r.buckets = buckets_;
    r.hook = way_ == "lockstep" ? hook_ : "-";
    r.wire_bytes = bench::median(wire_);
    return r;
  }

 private:
  static std::int64_t wire_bytes_of(const lockstep::ddp::PowerSGDStats& s) {
    return s.plain_bytes + s.compressed_bytes;
  }

  // Bytes this rank handed to all-reduce in the last step.
  std::int64_t wire_bytes(std::int64_t powersgd_step_bytes) const {
    if (way_ == "none") return 0;
    std::int64_t gradient_bytes = 0;
    for (const auto& p : parameters_) gradient_bytes += static_cast<std::int64_t>(p.nbytes());
    if (way_ == "naive" || hook_ == "allreduce") return gradient_bytes;
    if (hook_ == "powersgd") return powersgd_step_bytes;
    return gradient_bytes / 2;  // fp16, bf16 of float32 gradients
  }

  const Workload& w_;
  std::string way_, hook_, label_;
  std::shared_ptr<lockstep::ddp::PowerSGDState> powersgd_;
  std::int64_t powersgd_bytes_ = 0;
  std::vector<double> wire_;
  lockstep::comm::CommunicatorPtr comm_;
  std::shared_ptr<torch::nn::Module> model_;
  std::unique_ptr<lockstep::ddp::DataParallel> dp_;
  std::unique_ptr<lockstep::ddp::Join> join_;  // destroyed before dp_
  std::vector<at::Tensor> parameters_;
  std::unique_ptr<torch::optim::SGD> opt_;
  std::vector<double> step_, forward_, backward_, communication_, exposed_;
  std::size_t buckets_ = 0;
  bool trace_ = false;
};

// Through nlohmann_json as the other benchmarks: numbers keep all their digits (the stream's default 6
// rounded wire_bytes_per_step) and strings are escaped.
nlohmann::json to_json(const std::vector<Result>& results) {
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& r : results) {
    rows.push_back({{"model", r.model}, {"way", r.way}, {"ranks", r.ranks}, {"batch_per_rank", r.batch_per_rank},
                    {"parameters", r.parameters}, {"step_s", r.step_s}, {"images_per_s", r.images_per_s},
                    {"forward_s", r.forward_s}, {"backward_compute_s", r.backward_compute_s},
                    {"communication_s", r.communication_s}, {"exposed_communication_s", r.exposed_s},
                    {"buckets", r.buckets}, {"hook", r.hook}, {"wire_bytes_per_step", r.wire_bytes}});
  }
  return rows;
}

void print_table(const std::vector<Result>& results) {
  std::printf("%-20s %-26s %10s %10s %8s %9s %11s %11s %9s %12s %9s\n", "model", "way", "step ms", "images/s",
              "buckets", "wire MB", "comm ms", "exposed ms", "exposed%", "backward ms", "vs naive");
  for (const auto& r : results) {
    double naive = 0, none_backward = 0;
    for (const auto& other : results) {
      if (other.model != r.model) continue;
      if (other.way == "naive") naive = other.step_s;
      if (other.way == "none") none_backward = other.backward_compute_s;
    }
    char share[16] = "-";
    if (r.communication_s > 0) std::snprintf(share, sizeof(share), "%.0f%%", 100.0 * r.exposed_s / r.communication_s);
    std::printf("%-20s %-26s %10.2f %10.1f %8zu %9.3f %11.2f %11.2f %9s %12.2f %8.2fx", r.model.c_str(),
                r.way.c_str(), 1e3 * r.step_s, r.images_per_s, r.buckets, r.wire_bytes / 1e6, 1e3 * r.communication_s,
                1e3 * r.exposed_s, share, 1e3 * r.backward_compute_s, naive > 0 ? r.step_s / naive : 0.0);
    if (r.way.rfind("lockstep", 0) == 0 && none_backward > 0) {
      std::printf("   (backward %.2fx slower than without communication)", r.backward_compute_s / none_backward);
    }
    std::printf("\n");
  }
}

}  // namespace

int main(int argc, char** argv) {
  // A CPU benchmark (MPI, CPU tensors) on every machine; GPU training is resnet_gpu_bench's.
  Options o;
  CLI::App app(kDescription, "ddp_bench");
  add_options(app, o);
  if (const std::optional<int> exit_code = bench::parse(app, argc, argv)) return *exit_code;

  lockstep::RuntimeOptions runtime_options;
  runtime_options.device = "cpu";
  lockstep::Runtime runtime(argc, argv, runtime_options);  // also raises the malloc thresholds (PLATFORM.md)
  auto comm = runtime.communicator();
  const int rank = runtime.rank();

  std::vector<Workload> workloads;
  torch::manual_seed(100 + rank);  // each rank its own synthetic batch
  if (o.model == "all" || o.model == "resnet") {
    workloads.push_back({bench::resnet_model(o.resnet_width), torch::randn({o.resnet_batch, 1, 28, 28}),
                         torch::randint(10, {o.resnet_batch}, torch::kLong)});
  }
  if (o.model == "all" || o.model == "mlp") {
    workloads.push_back({bench::mlp_model(o.mlp_width), torch::randn({o.mlp_batch, 1, 28, 28}),
                         torch::randint(10, {o.mlp_batch}, torch::kLong)});
  }

  std::vector<Result> results;
  for (const auto& w : workloads) {
    std::vector<std::unique_ptr<Runner>> runners;
    runners.push_back(std::make_unique<Runner>(w, "none", LockstepWay{}, comm, o));
    runners.push_back(std::make_unique<Runner>(w, "naive", LockstepWay{}, comm, o));
    for (double cap : o.bucket_caps_mb) {
      for (const std::string& hook : o.comm_hooks) {
        if (hook != "powersgd") {
          runners.push_back(std::make_unique<Runner>(w, "lockstep", LockstepWay{cap, hook, 1}, comm, o));
          continue;
        }
        for (std::int64_t r : o.powersgd_ranks) {
          runners.push_back(std::make_unique<Runner>(w, "lockstep", LockstepWay{cap, hook, r}, comm, o));
        }
      }
    }
    if (o.sync_bn && w.name.rfind("resnet", 0) == 0) {
      LockstepWay way{o.bucket_caps_mb.front(), "allreduce", 1};
      way.sync_batch_norm = true;
      runners.push_back(std::make_unique<Runner>(w, "lockstep", way, comm, o));
    }
    if (o.join) {
      LockstepWay way{o.bucket_caps_mb.front(), "allreduce", 1};
      way.join = true;
      runners.push_back(std::make_unique<Runner>(w, "lockstep", way, comm, o));
    }
    // Progress on stderr, in --json mode too (stdout alone carries the JSON): one line per round of
    // every way's step, which takes minutes on the full-width ResNet.
    for (int s = 0; s < o.warmup + o.steps; ++s) {
      for (auto& runner : runners) runner->step(s >= o.warmup);
      if (rank == 0) {
        std::fprintf(stderr, "ddp_bench: %s: step %d of %d done by each of %zu ways%s\n", w.name.c_str(), s + 1,
                     o.warmup + o.steps, runners.size(), s < o.warmup ? " (warm-up)" : "");
      }
    }
    for (auto& runner : runners) results.push_back(runner->result());
    if (rank == 0) std::fprintf(stderr, "done: %s\n", w.name.c_str());
  }
  int exit_code = 0;
  if (rank == 0) {
    if (!o.json) {
      std::printf("%d ranks, %d intra-op thread(s) per rank, %d steps after %d warm-up; step ms: the median over "
                  "steps of the slowest rank's; the other columns: the slowest rank's median. exposed%% = exposed / "
                  "comm ms, where exposed also counts the step's small collectives (flags, buffer broadcast) and "
                  "the write-back, so it can pass 100%% when comm is small; vs naive = step time / naive's\n",
                  runtime.size(), torch::get_num_threads(), o.steps, o.warmup);
      print_table(results);
    } else if (o.json_file.empty()) {
      std::cout << to_json(results).dump(2) << "\n";
    } else if (!bench::write_json("ddp_bench", o.json_file, to_json(results))) {
      exit_code = 1;
    }
  }
  return exit_code;
}
