#pragma once
// Devices by name, the same way everywhere (Runtime, trainer, benchmarks): "auto", "cpu", "cuda" or
// "cuda:N". Works in every build: with a CPU-only LibTorch, "auto" is the CPU and "cuda" an error.

#include <c10/core/Device.h>

#include <optional>
#include <string>

namespace lockstep {

// "auto": the current CUDA device when CUDA is usable, else the CPU. "cuda": the current CUDA device
// (Runtime makes it the local rank's). "cuda:N": that one. "cpu". Anything else, or CUDA asked for
// where it is not usable, is a lockstep::Error naming `who` (e.g. the config key).
c10::Device resolve_device(const std::string& name, const std::string& who = "device");
// True when LibTorch can run on a CUDA device here.
bool cuda_usable();
int cuda_device_count();
// Makes `device` LibTorch's current CUDA device for the calling thread. CUDA's current device is per
// thread: a thread the program starts later begins on device 0 and must set it itself (Lockstep's
// communicators set their device wherever they use it).
void set_current_cuda_device(const c10::Device& device);
// The calling thread's current CUDA device, or nothing when CUDA is not usable here.
std::optional<c10::Device> current_cuda_device();

}  // namespace lockstep
