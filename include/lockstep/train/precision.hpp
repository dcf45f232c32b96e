#pragma once
// Mixed precision: autocast as a scoped guard, by the names the trainer's config uses.
//
//   lockstep::train::AutocastGuard autocast(device, "bf16");   // "fp32" (off), "bf16", "fp16"
//   auto loss = loss_fn(model->forward(x), y);                  // matmuls and convolutions in 16 bits
//   // backward outside the guard
//
// It hides the difference between LibTorch 1.13's per-device autocast functions and 2.x's.

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <string>

namespace lockstep::train {

// "fp32" -> Float (no autocast), "bf16" -> BFloat16, "fp16" -> Half; anything else throws.
c10::ScalarType autocast_dtype(const std::string& precision);
// Whether autocast to `dtype` can run on `device` with this LibTorch (CUDA: bf16 and fp16; CPU:
// bf16, and fp16 from LibTorch 2.4).
bool autocast_supported(const c10::Device& device, c10::ScalarType dtype);

class AutocastGuard {
 public:
  // Autocast on `device`'s kind to `dtype` while alive; Float (or enabled = false) does nothing.
  AutocastGuard(const c10::Device& device, c10::ScalarType dtype, bool enabled = true);
  AutocastGuard(const c10::Device& device, const std::string& precision);
  ~AutocastGuard();
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  c10::DeviceType device_;
  bool active_ = false;
  bool previous_enabled_ = false;
  c10::ScalarType previous_dtype_ = c10::ScalarType::Float;
};

}  // namespace lockstep::train
