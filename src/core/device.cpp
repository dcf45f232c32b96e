#include "lockstep/core/device.hpp"

#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/cuda.h>

#include "lockstep/core/error.hpp"

namespace lockstep {

bool cuda_usable() { return torch::cuda::is_available(); }

int cuda_device_count() { return cuda_usable() ? static_cast<int>(torch::cuda::device_count()) : 0; }

void set_current_cuda_device(const c10::Device& device) {
  LOCKSTEP_CHECK(device.is_cuda() && device.has_index(), "set_current_cuda_device: expected cuda:N, found ", device);
  // Through the device-guard registry (filled by libc10_cuda when it is loaded), so that this file needs
  // no CUDA headers and builds against a CPU-only LibTorch.
  c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->setDevice(device);
}

std::optional<c10::Device> current_cuda_device() {
  if (!cuda_usable()) return std::nullopt;
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getDevice();
}

c10::Device resolve_device(const std::string& name, const std::string& who) {
  if (name == "cpu") return c10::Device(c10::kCPU);
  if (name == "auto" && !cuda_usable()) return c10::Device(c10::kCPU);
  if (name == "auto" || name == "cuda") {
    LOCKSTEP_CHECK(cuda_usable(), who, " is \"cuda\" but CUDA is not usable here (",
                   torch::cuda::device_count(), " device(s) visible to LibTorch",
                   "; a CPU-only LibTorch, no GPU, or no driver); use \"cpu\" or \"auto\"");
    return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getDevice();
  }
  c10::Device device(c10::kCPU);
  try {
    device = c10::Device(name);
  } catch (const std::exception&) {
    LOCKSTEP_FAIL(who, ": expected auto, cpu, cuda or cuda:N, found \"", name, "\"");
  }
  LOCKSTEP_CHECK(device.is_cpu() || device.is_cuda(), who, ": expected auto, cpu, cuda or cuda:N, found \"", name,
                 "\"");
  if (device.is_cuda()) {
    LOCKSTEP_CHECK(cuda_usable(), who, " is \"", name, "\" but CUDA is not usable here; use \"cpu\" or \"auto\"");
    if (device.has_index()) {
      LOCKSTEP_CHECK(device.index() < cuda_device_count(), who, " is \"", name, "\" but only ", cuda_device_count(),
                     " CUDA device(s) are visible");
    } else {
      device = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getDevice();
    }
  }
  return device;
}

}  // namespace lockstep
