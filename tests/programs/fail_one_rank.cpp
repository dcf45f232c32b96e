// A job in which one rank fails while the others wait in a collective. The job must end
// promptly with the failing rank's message, never hang (CTest runs it with a short timeout).
//   fail_one_rank throw   rank 1 throws an exception nobody catches
//   fail_one_rank exit    rank 1 exits without a word (a dead peer)
//   fail_one_rank timeout rank 1 never joins; the others' wait() times out and the error escapes
//   fail_one_rank caught  as timeout, but main catches the error: the Runtime is destroyed while the
//                         timed-out collective is still in flight and must end the job at once, not
//                         after another full timeout (600 s by default)
//   fail_one_rank caught_after  as caught, but the Runtime outlives the try block: it is destroyed with no
//                         exception in flight, after the program gave up on the collective
//   fail_one_rank backend rank 1 asks for the NCCL backend on a machine without a GPU: its Runtime
//                         fails, and every other rank's Runtime says so instead of waiting for it
//   fail_one_rank every_rank_fails  run_on_every_rank (2 s timeout): rank 0's part outlasts the timeout
//                         (a large file on a slow disk), the others' fails at once: they must report
//                         their own error, not the exchange's timeout that followed it
//   fail_one_rank every_rank_waits  as every_rank_fails, but the others' part succeeds: their timeout
//                         names the work they waited for
//   fail_one_rank mpi_error  rank 1 broadcasts fewer elements than root sends (2 s timeout): MPI fails
//                         on rank 1 alone (a truncated receive) while root's side completes; rank 1's
//                         next collective must fail at once naming that error, not run out of step
#include <torch/torch.h>

#include <cstdlib>
#include <iostream>
#include <string>
#include <thread>

#include "lockstep/comm/agree.hpp"
#include "lockstep/runtime.hpp"

namespace {

int run(int argc, char** argv) {
  lockstep::Runtime runtime(argc, argv);
  auto comm = runtime.communicator();
  std::string mode = argc > 1 ? argv[1] : "throw";
  const bool caught = mode == "caught";
  if (caught) mode = "timeout";
  auto t = torch::ones({1024});
  if (comm->rank() == 1) {
    if (mode == "throw") throw std::runtime_error("boom from the test");
    if (mode == "exit") std::_Exit(3);
    if (mode == "timeout") std::this_thread::sleep_for(std::chrono::seconds(120));
  }
  comm->allreduce(t)->wait(std::chrono::seconds(mode == "timeout" ? 2 : 100));
  std::cout << "rank " << comm->rank() << " finished, which it must not" << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "backend") {
    const char* launcher_rank = std::getenv("OMPI_COMM_WORLD_RANK");
    const std::string rank = launcher_rank != nullptr ? launcher_rank : "?";
    lockstep::RuntimeOptions options;
    if (rank == "1") {  // fails the same way on a machine with GPUs
      options.backend = "nccl";
      options.device = "cpu";
    }
    try {
      lockstep::Runtime runtime(argc, argv, options);
    } catch (const std::exception& e) {
      std::cout << "launcher rank " << rank << " caught: " << e.what() << std::endl;
      return 1;
    }
    std::cout << "launcher rank " << rank << " made its Runtime, which it must not" << std::endl;
    return 0;
  }
  if (argc > 1 && (std::string(argv[1]) == "every_rank_fails" || std::string(argv[1]) == "every_rank_waits")) {
    const bool fail = std::string(argv[1]) == "every_rank_fails";
    lockstep::RuntimeOptions options;
    options.timeout = std::chrono::seconds(2);
    lockstep::Runtime runtime(argc, argv, options);
    auto comm = runtime.communicator();
    lockstep::comm::run_on_every_rank(
        *comm,
        [&] {
          if (comm->rank() == 0) std::this_thread::sleep_for(std::chrono::seconds(120));
          if (fail) throw std::runtime_error("checkpoint x.pt does not exist on this node");
        },
        "Checkpointer: cannot resume from x.pt");
    std::cout << "rank " << comm->rank() << " finished, which it must not" << std::endl;
    return 0;
  }
  if (argc > 1 && std::string(argv[1]) == "mpi_error") {
    // Checked collectives would find the mismatch before MPI runs it (and keep the ranks in step):
    // this mode is about what an MPI error does, so it runs unchecked whatever the environment says.
    unsetenv("LOCKSTEP_CHECK_COLLECTIVES");
    lockstep::RuntimeOptions options;
    options.timeout = std::chrono::seconds(2);
    lockstep::Runtime runtime(argc, argv, options);
    auto comm = runtime.communicator();
    auto t = torch::ones({comm->rank() == 1 ? 4 : 64});
    try {
      comm->broadcast(t)->wait();
    } catch (const std::exception& e) {
      std::cout << "rank " << comm->rank() << " broadcast: " << e.what() << std::endl;
    }
    auto u = torch::ones({8});
    comm->allreduce(u)->wait();
    std::cout << "rank " << comm->rank() << " finished, which it must not" << std::endl;
    return 0;
  }
  if (argc > 1 && std::string(argv[1]) == "caught_after") {
    lockstep::Runtime runtime(argc, argv);
    auto comm = runtime.communicator();
    if (comm->rank() == 1) std::this_thread::sleep_for(std::chrono::seconds(120));
    try {
      auto t = torch::ones({1024});
      comm->allreduce(t)->wait(std::chrono::seconds(2));
    } catch (const std::exception& e) {
      std::cout << "rank " << comm->rank() << " caught: " << e.what() << std::endl;
      return 1;  // the communicator's end must not wait another whole timeout (600 s) for it
    }
    return 0;
  }
  if (argc > 1 && std::string(argv[1]) == "caught") {
    try {
      return run(argc, argv);
    } catch (const std::exception& e) {
      std::cout << "caught: " << e.what() << ", which the Runtime's end must not wait for" << std::endl;
      return 1;
    }
  }
  return run(argc, argv);
}
