// Builders from config sections to the library's objects (data sets, optimizer), and a program's start.
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <map>
#include <thread>
#include <vector>

#include "lockstep/config/config.hpp"
#include "core/exception_text.hpp"
#include "lockstep/comm/agree.hpp"
#include "lockstep/runtime.hpp"
#include "core/unique_tensors.hpp"
#include "lockstep/core/error.hpp"
#include "lockstep/core/world.hpp"
#include "lockstep/data/augment.hpp"
#include "lockstep/data/cifar10.hpp"
#include "lockstep/data/mnist.hpp"
#include "lockstep/data/subset.hpp"
#include "lockstep/data/synthetic_dataset.hpp"
#include "lockstep/ddp/zero_optimizer.hpp"
#include "lockstep/train/foreach_optim.hpp"

namespace lockstep::config {
namespace {

data::DatasetPtr make_split(const DataConfig& config, data::Split split, uint64_t seed) {
  const bool train = split == data::Split::Train;
  if (config.dataset == "fashion-mnist") {
    data::FashionMnistOptions options;
    if (!config.dir.empty()) options.root = config.dir;
    options.split = split;
    return std::make_shared<data::FashionMnist>(options);
  }
  if (config.dataset == "mnist") {
    LOCKSTEP_CHECK(!config.dir.empty(), "config key 'data.dir' must name the MNIST directory");
    data::MnistOptions options;
    options.root = config.dir;
    options.split = split;
    return std::make_shared<data::Mnist>(options);
  }
  if (config.dataset == "cifar10") {
    LOCKSTEP_CHECK(!config.dir.empty(), "config key 'data.dir' must name the CIFAR-10 directory");
    data::Cifar10Options options;
    options.root = config.dir;
    options.split = split;
    options.records_per_file = config.records_per_file;
    return std::make_shared<data::Cifar10>(options);
  }
  if (config.dataset == "synthetic") {
    // Sample i depends on (seed, i) alone and the class patterns on the seed, so the test set is the
    // index range after the train set's in one generator: same patterns, different noise. The sizes
    // are bounded (as parse_config does, for a DataConfig made in code), before anything is allocated:
    // a few zeros too many would be an index list of hundreds of GB, and their sum could overflow.
    LOCKSTEP_CHECK(config.train_subset <= kMaxSyntheticSamples, "config key 'data.train_subset': the synthetic data "
                   "set holds at most ", kMaxSyntheticSamples, " samples (2^31), found ", config.train_subset);
    LOCKSTEP_CHECK(config.test_subset <= kMaxSyntheticSamples, "config key 'data.test_subset': the synthetic data "
                   "set holds at most ", kMaxSyntheticSamples, " samples (2^31), found ", config.test_subset);
    const int64_t train_size = config.train_subset > 0 ? config.train_subset : 1024;
    const int64_t test_size = config.test_subset > 0 ? config.test_subset : 256;
    data::SyntheticOptions options;
    options.channels = 1;
    options.height = 28;
    options.width = 28;
    options.seed = seed;
    options.size = train ? train_size : train_size + test_size;
    auto full = std::make_shared<data::SyntheticDataset>(options);
    if (train) return full;
    std::vector<int64_t> indices;
    for (int64_t i = train_size; i < train_size + test_size; ++i) indices.push_back(i);
    return std::make_shared<data::Subset>(full, indices);
  }
  LOCKSTEP_FAIL("config key 'data.dataset': unknown data set '", config.dataset, "'");
}

}  // namespace

std::pair<data::DatasetPtr, data::DatasetPtr> make_datasets(const DataConfig& config, uint64_t seed) {
  data::DatasetPtr train = make_split(config, data::Split::Train, seed);
  data::DatasetPtr test = make_split(config, data::Split::Test, seed);
  if (config.dataset != "synthetic") {
    // A subset larger than the data set would be all of it, silently: a scaling or timing run would
    // measure something else than asked.
    auto first = [](data::DatasetPtr& set, int64_t subset, const char* key) {
      if (subset <= 0) return;
      LOCKSTEP_CHECK(static_cast<size_t>(subset) <= set->size(), "config key 'data.", key, "' is ", subset, ", but ",
                     set->description(), " has ", set->size(), " samples (0 = all of them)");
      set = data::Subset::first(set, static_cast<size_t>(subset));
    };
    first(train, config.train_subset, "train_subset");
    first(test, config.test_subset, "test_subset");
  }
  if (config.augment.pad > 0 || config.augment.hflip) {
    data::AugmentOptions options;
    options.pad = config.augment.pad;
    options.hflip = config.augment.hflip;
    options.seed = seed;
    train = std::make_shared<data::Augment>(train, options);
  }
  return {train, test};
}

std::shared_ptr<torch::optim::Optimizer> make_optimizer(const OptimizerConfig& config,
                                                        std::vector<at::Tensor> parameters,
                                                        comm::CommunicatorPtr comm) {
  LOCKSTEP_CHECK(config.name == "sgd" || config.name == "adam" || config.name == "adamw",
                 "config key 'optimizer.name': unknown optimizer '", config.name, "' (expected sgd, adam or adamw)");
  auto build = [config](std::vector<at::Tensor> params) -> std::unique_ptr<torch::optim::Optimizer> {
    if (config.name == "adam" || config.name == "adamw") {
      const std::tuple<double, double> betas{config.beta1, config.beta2};
      if (config.name == "adam") {
        return std::make_unique<train::ForeachAdam>(
            std::move(params),
            torch::optim::AdamOptions(config.lr).betas(betas).eps(config.eps).weight_decay(config.weight_decay));
      }
      return std::make_unique<train::ForeachAdamW>(
          std::move(params),
          torch::optim::AdamWOptions(config.lr).betas(betas).eps(config.eps).weight_decay(config.weight_decay));
    }
    torch::optim::SGDOptions options(config.lr);
    options.momentum(config.momentum).weight_decay(config.weight_decay).nesterov(config.nesterov);
    return std::make_unique<train::ForeachSGD>(std::move(params), options);
  };
  // A tied weight is one parameter (Module::parameters() lists it once per name): one update.
  parameters = detail::unique_tensors(std::move(parameters));
  if (!config.zero) return build(std::move(parameters));
  LOCKSTEP_CHECK(comm != nullptr, "config key 'optimizer.zero': a sharded optimizer needs the communicator "
                 "(make_optimizer(config, parameters, comm))");
  return std::make_shared<ddp::ZeroRedundancyOptimizer>(std::move(parameters), std::move(comm), build);
}

// Note [A config one rank cannot read]: every rank reads its own command line and config file, and
// one rank may fail where the others do not: the file missing or stale on one node, an MPMD launch
// with other arguments. That rank used to leave with status 2 before MPI started, and print nothing
// unless it was rank 0; the others went on into MPI_Init and waited there for it. mpirun then ended
// the job, but `srun` (without --kill-on-bad-exit) would leave them waiting. So under a launcher of
// several processes the ranks first agree: MPI starts here, one all-gather shares each rank's
// outcome (its error, or that it only prints and leaves: --help, --print-config), and either every
// rank goes on or every rank leaves with the same status, after rank 0 printed every rank's error,
// once per distinct message. The Runtime made next adopts the MPI started here.
ProgramConfig program_config(int argc, char** argv, const std::string& program, const std::string& default_yaml) {
  ProgramConfig out;
  std::string failure;
  bool help = false;
  bool print_config = false;
  try {
    const CommandLine cli = parse_command_line(argc, argv);
    help = cli.help;
    if (!help) {
      LOCKSTEP_CHECK(!cli.config_path.empty() || !default_yaml.empty(), "--config FILE is required");
      out.config = cli.config_path.empty() ? parse_config(default_yaml, "<built-in default config>", cli.overrides)
                                           : load_config(cli.config_path, cli.overrides);
      print_config = cli.print_config;
    }
  } catch (...) {  // any exception: under a launcher the others wait for this rank's outcome below
    failure = detail::current_exception_text();
  }
  const bool leaves = help || print_config;
  // 'E' and the error, 'L' for a rank that prints and leaves, "" for one that goes on.
  const std::string outcome = !failure.empty() ? "E" + failure : leaves ? "L" : "";
  detail::Gathered all{launcher_rank(), {outcome}};
  const bool several = launcher_size() > 1;
  if (several) {
    // Before MPI allocates its buffers (Note [Allocator]), as the Runtime would.
    if (outcome.empty() && out.config.runtime.tune_malloc) tune_malloc();
    all = detail::start_mpi_and_gather(outcome);
  }
  const int ranks = static_cast<int>(all.texts.size());
  std::map<std::string, std::vector<int>> failed;  // error -> its ranks
  std::vector<int> leaving;
  for (int r = 0; r < ranks; ++r) {
    const std::string& text = all.texts[static_cast<std::size_t>(r)];
    if (!text.empty() && text[0] == 'E') failed[text.substr(1)].push_back(r);
    if (text == "L") leaving.push_back(r);
  }
  if (!failed.empty() || (!leaving.empty() && static_cast<int>(leaving.size()) < ranks)) {
    if (all.rank == 0) {
      for (const auto& [error, where] : failed) {
        std::string place;
        if (static_cast<int>(where.size()) < ranks) {
          place = " (on " + comm::rank_list(where) + "; every rank stops)";
        }
        std::fprintf(stderr, "%s: %s%s\n", program.c_str(), error.c_str(), place.c_str());
      }
      if (failed.empty()) {
        std::fprintf(stderr, "%s: --help or --print-config on %s but not on the others; every rank stops\n",
                     program.c_str(), comm::rank_list(leaving).c_str());
      }
      std::fflush(stderr);
    }
    if (several) {
      detail::end_started_mpi();
    } else if (all.rank != 0) {
      // A launcher whose size we cannot read (no agreement): rank 0 alone prints, and mpirun ends the job
      // at the first non-zero exit, which could take rank 0's message down with it; leave a moment later.
      std::this_thread::sleep_for(std::chrono::seconds(3));
    }
    out.exit_status = 2;
    return out;
  }
  if (all.rank == 0 && !leaves) {  // the same on every rank (one config): printed once
    for (const std::string& warning : out.config.warnings) std::fprintf(stderr, "%s: warning: %s\n", program.c_str(), warning.c_str());
    std::fflush(stderr);
  }
  if (leaves) {  // every rank alike: printed once, not once per rank
    if (all.rank == 0) {
      std::printf("%s", help ? usage(program, !default_yaml.empty()).c_str() : to_yaml(out.config).c_str());
      std::fflush(stdout);
    }
    if (several) detail::end_started_mpi();
    out.exit_status = 0;
  }
  return out;
}

}  // namespace lockstep::config
