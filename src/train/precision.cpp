#include "lockstep/train/precision.hpp"

#include "core/torch_compat.hpp"
#include "lockstep/core/error.hpp"

namespace lockstep::train {

c10::ScalarType autocast_dtype(const std::string& precision) {
  if (precision == "fp32") return c10::ScalarType::Float;
  if (precision == "bf16") return c10::ScalarType::BFloat16;
  if (precision == "fp16") return c10::ScalarType::Half;
  LOCKSTEP_FAIL("precision must be fp32, bf16 or fp16, found '", precision, "'");
}

bool autocast_supported(const c10::Device& device, c10::ScalarType dtype) {
  if (dtype == c10::ScalarType::Float) return true;
  if (device.is_cuda()) return dtype == c10::ScalarType::BFloat16 || dtype == c10::ScalarType::Half;
  if (device.is_cpu()) return dtype == c10::ScalarType::BFloat16 || (dtype == c10::ScalarType::Half && compat::kCpuAutocastHalf);
  return false;
}

AutocastGuard::AutocastGuard(const c10::Device& device, c10::ScalarType dtype, bool enabled)
    : device_(device.type()), active_(enabled && dtype != c10::ScalarType::Float) {
  if (!active_) return;
  LOCKSTEP_CHECK(autocast_supported(device, dtype), "autocast to ", dtype, " is not supported on ", device,
                 " by this LibTorch (", TORCH_VERSION_MAJOR, ".", TORCH_VERSION_MINOR, ")");
  previous_enabled_ = compat::autocast_enabled(device_);
  previous_dtype_ = compat::autocast_dtype(device_);
  compat::set_autocast_enabled(device_, true);
  compat::set_autocast_dtype(device_, dtype);
  at::autocast::increment_nesting();
}

AutocastGuard::AutocastGuard(const c10::Device& device, const std::string& precision)
    : AutocastGuard(device, autocast_dtype(precision)) {}

AutocastGuard::~AutocastGuard() {
  if (!active_) return;
  // Cast weights are cached inside an autocast region; the outermost exit frees them.
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  compat::set_autocast_enabled(device_, previous_enabled_);
  compat::set_autocast_dtype(device_, previous_dtype_);
}

}  // namespace lockstep::train
