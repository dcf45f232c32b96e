#pragma once
// The shortest decimal text that reads back as the same double (0.1, not 0.10000000000000001; 1000001,
// not 1e+06): for printing configs and for error messages that must tell a value from its bound.

#include <cstdio>
#include <cstdlib>
#include <string>

namespace lockstep::config::detail {

inline std::string shortest_number(double value) {
  char text[64];
  for (int precision = 6; precision <= 17; ++precision) {
    std::snprintf(text, sizeof text, "%.*g", precision, value);
    if (std::strtod(text, nullptr) == value) break;
  }
  return text;
}

}  // namespace lockstep::config::detail
