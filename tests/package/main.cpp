// Links the installed lockstep::lockstep and checks one all-reduce against its closed form.
#include <lockstep/lockstep.hpp>
#include <torch/torch.h>

#include <iostream>

int main(int argc, char** argv) {
  lockstep::Runtime runtime(argc, argv);
  auto comm = runtime.communicator();
  const int n = comm->size();
  auto t = torch::arange(1000, torch::kFloat) + comm->rank();
  comm->allreduce(t)->wait();
  auto expected = torch::arange(1000, torch::kFloat) * n + n * (n - 1) / 2;
  const bool ok = torch::equal(t, expected);
  std::cout << "rank " << comm->rank() << " of " << n << ": package all-reduce " << (ok ? "correct" : "WRONG")
            << std::endl;
  return ok ? 0 : 1;
}
