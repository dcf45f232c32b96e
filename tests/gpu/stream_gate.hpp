#pragma once
// StreamGate: holds a CUDA stream up from the host, so that a test can show that some call queues its
// work without waiting for the GPU (Note [No host sync per step], Note [NCCL stream semantics]).
#include <catch2/catch.hpp>
#include <cuda_runtime_api.h>

#include <atomic>
#include <chrono>
#include <thread>

namespace lockstep::testing {

// Blocks `stream` from the host until release() (or 20 s), through cudaLaunchHostFunc: the device
// cannot get past it, so work queued behind it provably has not run. The destructor opens it and waits
// for the stream to pass it: a test that fails between close() and release() (a REQUIRE, an
// exception) must not leave CUDA's callback thread reading a gate that no longer exists.
struct StreamGate {
  std::atomic<bool> open{false};
  cudaStream_t stream = nullptr;
  static void CUDART_CB hold(void* self) {
    auto* gate = static_cast<StreamGate*>(self);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (!gate->open && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  StreamGate() = default;
  StreamGate(const StreamGate&) = delete;
  StreamGate& operator=(const StreamGate&) = delete;
  ~StreamGate() {
    open = true;
    if (opener_.joinable()) opener_.join();
    if (stream != nullptr) cudaStreamSynchronize(stream);
  }
  void close(cudaStream_t s) {
    stream = s;
    REQUIRE(cudaLaunchHostFunc(s, &StreamGate::hold, this) == cudaSuccess);
  }
  void release() { open = true; }
  // Opens the gate from another thread after `delay`: for a call that must block the host until the
  // stream passes the gate (a host copy, a blocking wait).
  void release_after(std::chrono::milliseconds delay) {
    opener_ = std::thread([this, delay] {
      std::this_thread::sleep_for(delay);
      open = true;
    });
  }

 private:
  std::thread opener_;
};

}  // namespace lockstep::testing
