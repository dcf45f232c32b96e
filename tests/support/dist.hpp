#pragma once
// Shared state of the multi-rank test executable: the Runtime that its main created.
// Every rank walks the same test path: use CHECK (not REQUIRE) around collectives so that one
// rank's failure does not send it down a different path from the others.

#include <torch/nn/module.h>

#include <exception>
#include <string>

#include "lockstep/comm/communicator.hpp"
#include "lockstep/runtime.hpp"

namespace lockstep::testing {

Runtime& runtime();
void set_runtime(Runtime* runtime);
inline comm::Communicator& comm() { return *runtime().communicator(); }
inline comm::CommunicatorPtr comm_ptr() { return runtime().communicator(); }
// Collective: the same fresh, empty directory on every rank, named after `name` and rank 0's pid
// (for checkpoints and files that rank 0 writes and the others read).
// They lie in one directory per run, which remove_shared_temp_dirs() removes (rank 0, once every
// rank is done), unless `keep` (a test failed: they are left for a look, and the path is printed).
std::string shared_temp_dir(const std::string& name);
void remove_shared_temp_dirs(bool keep);
// Collective: whether every rank's parameters are bitwise equal to rank 0's.
bool identical_across_ranks(torch::nn::Module& model);
// Collective: how many ranks (1 .. size) hold a tensor bitwise equal to rank 0's, of the same shape.
int ranks_equal_to_rank0(const at::Tensor& tensor);
// Collective: whether every rank holds rank 0's tensor, bitwise.
inline bool same_on_every_rank(const at::Tensor& tensor) { return ranks_equal_to_rank0(tensor) == comm().size(); }
// Collective: whether every rank got here with the same collective sequence (an all-reduce adds up);
// the check after a test that expects an error on every rank.
bool communicator_healthy();

// The message of the exception f() throws, or "" if it returns.
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

}  // namespace lockstep::testing
