#include "lockstep/core/error.hpp"

#include <mpi.h>

#include <cstring>

namespace lockstep {

namespace {
const char* base_name(const char* path) {
  const char* slash = std::strrchr(path, '/');
  return slash ? slash + 1 : path;
}
}  // namespace

Error::Error(std::string message, const char* file, int line)
    : std::runtime_error(message + " (" + base_name(file) + ":" + std::to_string(line) + ")"),
      message_(std::move(message)),
      file_(file),
      line_(line) {}

namespace detail {

void throw_error(const char* file, int line, const char* condition, const std::string& message) {
  std::string text = message;
  if (text.empty() && condition) text = std::string("check failed: ") + condition;
  throw Error(std::move(text), file, line);
}

void throw_mpi_error(const char* file, int line, const char* expression, int code) {
  char text[MPI_MAX_ERROR_STRING] = {0};
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) std::snprintf(text, sizeof(text), "unknown MPI error");
  throw MpiError(str_cat("MPI call failed: ", expression, ": ", text, " (code ", code, ")"), file, line);
}

}  // namespace detail
}  // namespace lockstep
