// All-reduce benchmark in the style of nccl-tests: for each size, Lockstep's all-reduce out of
// place and in place, and a raw baseline of the same buffer, all in the same run. algbw = bytes /
// time; busbw = algbw * 2(n-1)/n (what each link carries).
//   --backend mpi (default): CPU tensors; raw = a blocking MPI_Allreduce (out of place); ratio = oop / raw.
//     MPI has no half or bfloat16 type: those run without raw ("-" in its columns, null in the JSON),
//     and sizes of more than INT_MAX elements are refused (MPI_Allreduce's count is an int).
//   --backend nccl: CUDA tensors on the local rank's GPU; raw = ncclAllReduce (in place) issued
//     straight on the same NCCL communicator and stream; ratio = in place / raw. Times run from the
//     first issue to a device synchronisation after the last.
//
//   ./scripts/mpirun.sh -np 2 build/benchmarks/allreduce_bench [--backend mpi|nccl] [--min-bytes 8]
//       [--max-bytes 256M] [--factor 2] [--dtype float|double|half|bfloat16|int|long] [--seconds 0.2]
//       [--repeats 5] [--json FILE]     (-b, -e, -f, -d: --min-bytes, --max-bytes, --factor, --dtype; see --help)
#include <mpi.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "bench_cli.hpp"
#include "bench_report.hpp"
#include "lockstep/comm/communicator.hpp"
#include "lockstep/comm/nccl_communicator.hpp"
#include "lockstep/core/error.hpp"
#include "lockstep/runtime.hpp"

namespace {

struct Options {
  std::int64_t min_bytes = 8;
  std::int64_t max_bytes = 256LL << 20;
  int factor = 2;
  std::string dtype = "float";
  double seconds = 0.2;  // target time per measurement
  int repeats = 5;       // measurements per size and way; the median is reported
  std::string json;
  std::string backend = "mpi";
};

const char* const kDescription =
    "All-reduce benchmark in the style of nccl-tests: for each size, Lockstep's all-reduce out of place and in "
    "place beside a raw MPI_Allreduce (--backend mpi) or ncclAllReduce (--backend nccl) in the same run.";

torch::ScalarType parse_dtype(const std::string& name, MPI_Datatype* mpi) {
  if (name == "float") { *mpi = MPI_FLOAT; return torch::kFloat; }
  if (name == "double") { *mpi = MPI_DOUBLE; return torch::kDouble; }
  if (name == "int") { *mpi = MPI_INT32_T; return torch::kInt; }
  if (name == "long") { *mpi = MPI_INT64_T; return torch::kLong; }
  if (name == "half") { *mpi = MPI_DATATYPE_NULL; return torch::kHalf; }
  if (name == "bfloat16") { *mpi = MPI_DATATYPE_NULL; return torch::kBFloat16; }
  LOCKSTEP_FAIL("unknown --dtype '", name, "' (float, double, int, long, half, bfloat16)");
}

// Declares the command line on `app`, bound to `o`; bench::parse reads it before the Runtime is made,
// which --backend picks (Note [Parse before MPI] in bench_cli.hpp).
void add_options(CLI::App& app, Options& o) {
  app.add_option("--backend", o.backend, "communicator: mpi (CPU tensors) or nccl (CUDA tensors)")
      ->capture_default_str()
      ->check(CLI::IsMember({"mpi", "nccl"}));
  app.add_option("-b,--min-bytes", o.min_bytes, "smallest message; suffixes K, M, G (x1024)")
      ->type_name("SIZE")
      ->default_str("8")
      ->transform(bench::bytes());
  app.add_option("-e,--max-bytes", o.max_bytes, "largest message; suffixes K, M, G (x1024)")
      ->type_name("SIZE")
      ->default_str("256M")
      ->transform(bench::bytes());
  app.add_option("-f,--factor", o.factor, "each size is the previous one times this")
      ->capture_default_str()
      ->check(bench::at_least(2));
  app.add_option("-d,--dtype", o.dtype, "element type")
      ->capture_default_str()
      ->check(CLI::IsMember({"float", "double", "half", "bfloat16", "int", "long"}));
  app.add_option("--seconds", o.seconds, "target time of one measurement")
      ->capture_default_str()
      ->check(bench::at_least(0.0));
  app.add_option("--repeats", o.repeats, "measurements per size and way; the median is reported")
      ->capture_default_str()
      ->check(bench::at_least(1));
  app.add_option("--json", o.json, "also write the results to FILE (rank 0)")->type_name("FILE");
  app.callback([&o] {
    if (o.max_bytes < o.min_bytes) {
      throw CLI::ValidationError("--max-bytes", "must be at least --min-bytes (" + std::to_string(o.min_bytes) +
                                                    "), found " + std::to_string(o.max_bytes));
    }
    // The raw MPI_Allreduce takes an int count: refuse a size it would wrap around, before any is run.
    MPI_Datatype mpi = MPI_DATATYPE_NULL;
    const std::int64_t element = torch::elementSize(parse_dtype(o.dtype, &mpi));
    std::int64_t largest = o.min_bytes;  // the last size the loop in main measures
    while (largest <= o.max_bytes / o.factor) largest *= o.factor;
    if (o.backend == "mpi" && mpi != MPI_DATATYPE_NULL && largest / element > INT_MAX) {
      throw CLI::ValidationError("--max-bytes", "the size " + std::to_string(largest) + " bytes is " +
                                                    std::to_string(largest / element) + " " + o.dtype +
                                                    " elements, more than the raw MPI_Allreduce's int count takes (" +
                                                    std::to_string(INT_MAX) + ")");
    }
  });
}

// One way of running an all-reduce: `op` issues one complete all-reduce, `sync` waits for queued
// device work (a no-op on the CPU).
struct Way {
  std::function<void()> op;
  std::function<void()> sync;
};

// Times each way `iters` times per measurement and `repeats` measurements per way; the ways take
// turns within each repeat, so that a slow phase of a noisy machine hits them all alike instead of
// one of them. Every rank starts each measurement together and the slowest rank's time counts.
// Returns every measurement: [way][repeat].
std::vector<std::vector<double>> time_interleaved(int iters, int repeats, const std::vector<Way>& ways) {
  std::vector<std::vector<double>> samples(ways.size());
  // One untimed call of each way first: a way's first call (the raw one's buffers, the in-place path)
  // would otherwise land in its first repeat.
  for (const Way& way : ways) {
    way.op();
    way.sync();
  }
  for (int r = 0; r < repeats; ++r) {
    for (std::size_t k = 0; k < ways.size(); ++k) {
      ways[k].sync();
      MPI_Barrier(MPI_COMM_WORLD);
      const auto start = std::chrono::steady_clock::now();
      for (int i = 0; i < iters; ++i) ways[k].op();
      ways[k].sync();
      double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / iters;
      MPI_Allreduce(MPI_IN_PLACE, &seconds, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
      samples[k].push_back(seconds);
    }
  }
  return samples;
}

// The largest integer below which `type` holds every integer exactly.
std::int64_t exact_integers(torch::ScalarType type) {
  switch (type) {
    case torch::kHalf: return 1 << 11;
    case torch::kBFloat16: return 1 << 8;
    case torch::kFloat: return 1 << 24;
    case torch::kInt: return INT_MAX;
    default: return std::int64_t{1} << 53;
  }
}

// Counts elements that differ from the closed form: the sum over ranks of (rank % 2 + i % m). Every
// partial sum stays at most the total, which m keeps within the integers the dtype holds exactly
// (bfloat16: 256), so rounding in any order of summation cannot flag a correct result; m is 32 where
// that fits, smaller at many ranks. (It was rank + i % 32: at 9 ranks a correct bfloat16 sum of 315
// rounds, and counted as wrong.) Ranks of one parity contribute alike, so a reduction that counted one
// rank twice and dropped another of the same parity would pass: the dist tests check such pairing.
std::int64_t wrong_results(lockstep::comm::Communicator& comm, torch::Tensor input, torch::Tensor output,
                           bool in_place) {
  const std::int64_t n = comm.size();
  const std::int64_t odd_ranks = n / 2;
  const std::int64_t m = std::clamp<std::int64_t>((exact_integers(input.scalar_type()) - odd_ranks) / n + 1, 1, 32);
  auto pattern = torch::arange(input.numel(), torch::kLong).remainder(m);
  input.copy_(pattern + comm.rank() % 2);
  if (in_place) comm.allreduce(input)->wait();
  else comm.allreduce(input, output)->wait();
  auto result = (in_place ? input : output).to(torch::kCPU).to(torch::kLong);
  std::int64_t wrong = result.ne(pattern * n + odd_ranks).sum().item<std::int64_t>();
  std::int64_t total = 0;
  MPI_Allreduce(&wrong, &total, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
  return total;
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  CLI::App app(kDescription, "allreduce_bench");
  add_options(app, options);
  if (const std::optional<int> exit_code = bench::parse(app, argc, argv)) return *exit_code;

  lockstep::RuntimeOptions runtime_options;
  runtime_options.backend = options.backend;
  runtime_options.device = runtime_options.backend == "nccl" ? "cuda" : "cpu";
  if (runtime_options.backend == "nccl" && !lockstep::comm::nccl_available()) {
    std::printf("allreduce_bench: --backend nccl: %s\n", lockstep::comm::nccl_build_info().c_str());
    return 77;
  }
  lockstep::Runtime runtime(argc, argv, runtime_options);
  auto comm = runtime.communicator();
  const bool nccl = comm->backend() == "nccl";
  const torch::Device device = runtime.world().device;
  auto sync = [&] {
    if (nccl) torch::cuda::synchronize(device.index());
  };
  const int n = comm->size();
  const bool root = comm->rank() == 0;
  MPI_Datatype mpi_type = MPI_DATATYPE_NULL;
  const torch::ScalarType dtype = parse_dtype(options.dtype, &mpi_type);
  const std::int64_t element = torch::elementSize(dtype);
  MPI_Comm raw_comm;
  MPI_Comm_dup(MPI_COMM_WORLD, &raw_comm);
  const double bus_factor = 2.0 * (n - 1) / n;

  if (root) {
    std::printf("# Lockstep all-reduce benchmark: %d ranks, backend %s, dtype %s, op sum\n", n,
                comm->backend().c_str(), options.dtype.c_str());
    std::printf("# time: median of %d interleaved measurements of ~%.2f s each; bw in GB/s; raw = %s\n",
                options.repeats, options.seconds,
                nccl ? "ncclAllReduce in place on the same comm and stream" : "blocking MPI_Allreduce");
    std::printf("#       ratio = Lockstep %s busbw / raw busbw, median of the back-to-back pairs\n",
                nccl ? "in-place" : "out-of-place");
    std::printf("#%11s %10s %6s | %10s %8s %8s %6s | %10s %8s %8s %6s | %10s %8s | %6s %9s\n", "size", "count",
                "type", "oop us", "algbw", "busbw", "#wrong", "inp us", "algbw", "busbw", "#wrong", "raw us", "busbw",
                "ratio", "+us@raw");
  }
  nlohmann::json rows = nlohmann::json::array();
  std::vector<std::int64_t> wrong_sizes;  // bytes of the sizes with a wrong sum, the same on every rank
  std::int64_t last_count = 0;
  for (std::int64_t bytes = options.min_bytes; bytes <= options.max_bytes; bytes *= options.factor) {
    const std::int64_t count = std::max<std::int64_t>(1, bytes / element);
    const std::int64_t actual_bytes = count * element;
    // Sizes below one element (-b 1 -d double: 1, 2, 4 and 8 bytes) are all one element: measured once.
    if (count == last_count) continue;
    last_count = count;
    auto input = torch::zeros({count}, torch::TensorOptions().dtype(dtype).device(device));
    auto output = torch::zeros({count}, torch::TensorOptions().dtype(dtype).device(device));

    // Calibrate the iteration count to the target time, after a warm-up call (Lockstep's out of place).
    comm->allreduce(input, output)->wait();
    sync();
    const auto t0 = std::chrono::steady_clock::now();
    comm->allreduce(input, output)->wait();
    sync();
    double once = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    MPI_Allreduce(MPI_IN_PLACE, &once, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    const int iters = static_cast<int>(std::clamp(options.seconds / std::max(once, 1e-7), 1.0, 20000.0));

    // The way compared with raw (out of place for MPI, in place for NCCL, like the raw call) runs
    // right before raw in every repeat (Note [Paired ratio]).
    const Way oop_way{[&] { comm->allreduce(input, output)->wait(); }, sync};
    const Way inp_way{[&] { comm->allreduce(input)->wait(); }, sync};
    std::vector<Way> ways = nccl ? std::vector<Way>{oop_way, inp_way} : std::vector<Way>{inp_way, oop_way};
    const bool has_raw = nccl || mpi_type != MPI_DATATYPE_NULL;
    if (nccl) {
      ways.push_back({[&] { lockstep::comm::nccl_raw_allreduce(*comm, input); },
                      [&] { lockstep::comm::nccl_synchronize(*comm); }});
    } else if (has_raw) {
      // count fits an int: add_options refuses larger sizes.
      ways.push_back({[&] {
                        MPI_Allreduce(input.data_ptr(), output.data_ptr(), static_cast<int>(count), mpi_type, MPI_SUM,
                                      raw_comm);
                      },
                      [] {}});
    }
    const std::vector<std::vector<double>> times = time_interleaved(iters, options.repeats, ways);
    const double oop = bench::median(times[nccl ? 0 : 1]), inp = bench::median(times[nccl ? 1 : 0]);
    const double raw = has_raw ? bench::median(times[2]) : 0.0;
    // Note [Paired ratio]: the busbw ratio is the median over repeats of raw time / Lockstep time,
    // each pair measured back to back, so that a slow phase of the machine (which moves both by the
    // same factor) cancels instead of landing on one side of a ratio of medians.
    std::vector<double> pair_ratios;
    for (size_t r = 0; has_raw && r < times[1].size(); ++r) pair_ratios.push_back(times[2][r] / times[1][r]);
    const double ratio = pair_ratios.empty() ? 0.0 : bench::median(pair_ratios);
    const std::int64_t wrong_oop = wrong_results(*comm, input, output, false);
    const std::int64_t wrong_inp = wrong_results(*comm, input, output, true);
    if (wrong_oop + wrong_inp > 0) wrong_sizes.push_back(actual_bytes);  // the totals are every rank's

    const double algbw_oop = actual_bytes / oop / 1e9, algbw_inp = actual_bytes / inp / 1e9;
    const double busbw_raw = raw > 0 ? actual_bytes / raw / 1e9 * bus_factor : 0.0;
    const double overhead = (nccl ? inp : oop) - raw;
    // Without a raw baseline (half and bfloat16 over MPI) its columns show "-" and its JSON fields are
    // null: zeros would read as measurements, and the overhead as Lockstep's whole time.
    char raw_text[4][32] = {"-", "-", "-", "-"};
    if (has_raw) {
      std::snprintf(raw_text[0], sizeof(raw_text[0]), "%.2f", raw * 1e6);
      std::snprintf(raw_text[1], sizeof(raw_text[1]), "%.3f", busbw_raw);
      std::snprintf(raw_text[2], sizeof(raw_text[2]), "%.3f", ratio);
      std::snprintf(raw_text[3], sizeof(raw_text[3]), "%.2f", overhead * 1e6);
    }
    auto if_raw = [has_raw](double value) { return has_raw ? nlohmann::json(value) : nlohmann::json(nullptr); };
    if (root) {
      std::printf("%12lld %10lld %6s | %10.2f %8.3f %8.3f %6lld | %10.2f %8.3f %8.3f %6lld | %10s %8s | %6s %9s\n",
                  static_cast<long long>(actual_bytes), static_cast<long long>(count), options.dtype.c_str(),
                  oop * 1e6, algbw_oop, algbw_oop * bus_factor, static_cast<long long>(wrong_oop), inp * 1e6,
                  algbw_inp, algbw_inp * bus_factor, static_cast<long long>(wrong_inp), raw_text[0], raw_text[1],
                  raw_text[2], raw_text[3]);
      std::fflush(stdout);
    }
    rows.push_back({{"bytes", actual_bytes}, {"count", count}, {"dtype", options.dtype}, {"iters", iters},
                    {"out_of_place", {{"time_us", oop * 1e6}, {"algbw_gbs", algbw_oop},
                                      {"busbw_gbs", algbw_oop * bus_factor}, {"wrong", wrong_oop}}},
                    {"in_place", {{"time_us", inp * 1e6}, {"algbw_gbs", algbw_inp},
                                  {"busbw_gbs", algbw_inp * bus_factor}, {"wrong", wrong_inp}}},
                    {nccl ? "raw_nccl" : "raw_mpi", {{"time_us", if_raw(raw * 1e6)}, {"busbw_gbs", if_raw(busbw_raw)}}},
                    {"busbw_ratio", if_raw(ratio)}, {"overhead_us", if_raw(overhead * 1e6)},
                    // Every repeat's time (seconds, the slowest rank's), per way: the ratio above is the
                    // median of paired ratios (Note [Paired ratio]), which the medians cannot reproduce.
                    {"samples_s", {{"out_of_place", times[nccl ? 0 : 1]}, {"in_place", times[nccl ? 1 : 0]},
                                   {nccl ? "raw_nccl" : "raw_mpi", has_raw ? nlohmann::json(times[2])
                                                                           : nlohmann::json(nullptr)}}}});
    if (bytes > options.max_bytes / options.factor) break;
  }
  // Wrong sums fail the run (as nccl-tests' check does), after the table and the JSON that show them.
  int exit_code = 0;
  if (!wrong_sizes.empty()) {
    if (root) {
      std::string sizes;
      for (const std::int64_t b : wrong_sizes) sizes += (sizes.empty() ? "" : ", ") + std::to_string(b);
      std::fprintf(stderr, "allreduce_bench: wrong sums at %zu size(s) (bytes: %s); see the #wrong columns\n",
                   wrong_sizes.size(), sizes.c_str());
    }
    exit_code = 1;
  }
  if (root && !options.json.empty()) {
    nlohmann::json doc = {{"benchmark", "allreduce"}, {"ranks", n}, {"backend", comm->backend()},
                          {"threads_per_rank", torch::get_num_threads()}, {"results", rows}};
    if (bench::write_json("allreduce_bench", options.json, doc)) std::printf("# wrote %s\n", options.json.c_str());
    else exit_code = 1;
  }
  MPI_Comm_free(&raw_comm);  // collective: every rank gets here, the root too when its write failed
  return exit_code;
}
