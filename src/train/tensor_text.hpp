#pragma once
// How the loss and metric errors show a tensor: "[64, 1, 28, 28] (Float)".

#include <ATen/core/Tensor.h>

#include <sstream>
#include <string>

namespace lockstep::train::detail {

inline std::string shape_of(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes() << " (" << t.scalar_type() << ")";
  return os.str();
}

}  // namespace lockstep::train::detail
