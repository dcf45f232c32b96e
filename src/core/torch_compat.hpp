#pragma once
// Note [LibTorch versions]: every difference between LibTorch 1.13 (Debian) and 2.x that Lockstep
// meets lives here, decided once from <torch/version.h>; callers use these names and never test a
// version. (NCCL's differences have their own header, src/comm/nccl/nccl_compat.hpp, because it can
// only be included where NCCL is installed; the autograd graph's, in core/autograd_compat.hpp, because
// it needs the autograd headers.)

#include <ATen/autocast_mode.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_mul.h>
#include <torch/version.h>

#include <sstream>
#include <string>
#include <type_traits>

namespace lockstep::compat {

#define LOCKSTEP_TORCH_VERSION_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) || (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

// CPU autocast to float16: LibTorch 1.13's CPU kernels (convolution, matmul) have no float16
// versions, so only bfloat16 autocast works there. Float16 CPU autocast came with 2.x; assumed from
// 2.4 on (an assumption, not verified on this machine, which has only 1.13: an earlier 2.x may have it).
inline constexpr bool kCpuAutocastHalf = LOCKSTEP_TORCH_VERSION_AT_LEAST(2, 4);

// Autocast switches. 1.13 has one function per device (set_enabled = CUDA, set_cpu_enabled, ...);
// 2.4 replaced them with set_autocast_enabled(device_type, ...) and deprecated the old names.
inline bool autocast_enabled(c10::DeviceType device) {
#if LOCKSTEP_TORCH_VERSION_AT_LEAST(2, 4)
  return at::autocast::is_autocast_enabled(device);
#else
  return device == c10::DeviceType::CUDA ? at::autocast::is_enabled() : at::autocast::is_cpu_enabled();
#endif
}
inline void set_autocast_enabled(c10::DeviceType device, bool enabled) {
#if LOCKSTEP_TORCH_VERSION_AT_LEAST(2, 4)
  at::autocast::set_autocast_enabled(device, enabled);
#else
  if (device == c10::DeviceType::CUDA) {
    at::autocast::set_enabled(enabled);
  } else {
    at::autocast::set_cpu_enabled(enabled);
  }
#endif
}
inline c10::ScalarType autocast_dtype(c10::DeviceType device) {
#if LOCKSTEP_TORCH_VERSION_AT_LEAST(2, 4)
  return at::autocast::get_autocast_dtype(device);
#else
  return device == c10::DeviceType::CUDA ? at::autocast::get_autocast_gpu_dtype() : at::autocast::get_autocast_cpu_dtype();
#endif
}
inline void set_autocast_dtype(c10::DeviceType device, c10::ScalarType dtype) {
#if LOCKSTEP_TORCH_VERSION_AT_LEAST(2, 4)
  at::autocast::set_autocast_dtype(device, dtype);
#else
  if (device == c10::DeviceType::CUDA) {
    at::autocast::set_autocast_gpu_dtype(dtype);
  } else {
    at::autocast::set_autocast_cpu_dtype(dtype);
  }
#endif
}

// The key of a parameter in torch::optim::Optimizer's state map: its TensorImpl's address as text in
// 1.13 (c10::guts::to_string, i.e. ostream <<), the address itself (void*) in later 2.x. Templated on
// the map so that only the branch that applies is compiled.
template <class StateMap>
typename StateMap::key_type optimizer_state_key(const at::Tensor& parameter) {
  using Key = typename StateMap::key_type;
  if constexpr (std::is_same_v<Key, std::string>) {
    std::ostringstream text;
    text << parameter.unsafeGetTensorImpl();
    return text.str();
  } else {
    return static_cast<Key>(parameter.unsafeGetTensorImpl());
  }
}

// Multiplies every tensor of `tensors` in place by the 0-dim tensor `factor` (on their device), without
// reading it on the host: one multi-tensor kernel from 2.1 (_foreach_mul_.Tensor), one mul_ per tensor
// in 1.13, which has no such overload.
inline void foreach_mul_(at::TensorList tensors, const at::Tensor& factor) {
#if LOCKSTEP_TORCH_VERSION_AT_LEAST(2, 1)
  at::_foreach_mul_(tensors, factor);
#else
  for (const at::Tensor& tensor : tensors) tensor.mul_(factor);
#endif
}

}  // namespace lockstep::compat
