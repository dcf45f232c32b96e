#pragma once
// The text of a caught exception, for a message of our own that quotes it: a lockstep::Error's
// message (without the source location its what() adds), a c10::Error's without the backtrace its
// what() adds, else what(); never empty.

#include <exception>
#include <string>

#include <c10/util/Exception.h>

#include "lockstep/core/error.hpp"

namespace lockstep::detail {

inline std::string exception_text(const std::exception& e) {
  std::string text;
  if (const auto* error = dynamic_cast<const Error*>(&e)) {
    text = error->message();
  } else if (const auto* c10_error = dynamic_cast<const c10::Error*>(&e)) {
    text = c10_error->what_without_backtrace();
  } else {
    text = e.what();
  }
  return text.empty() ? std::string("an unknown error") : text;
}

// The same for the exception being handled; call it inside a catch block.
inline std::string current_exception_text() {
  try {
    throw;
  } catch (const std::exception& e) {
    return exception_text(e);
  } catch (...) {
    return "an unknown exception";
  }
}

}  // namespace lockstep::detail
