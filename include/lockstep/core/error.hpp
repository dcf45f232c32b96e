#pragma once
// Errors: every failure inside Lockstep is a lockstep::Error carrying where it was raised and why.
// No print-and-return-code: callers catch or let it end the job (see Runtime).

#include <sstream>
#include <stdexcept>
#include <string>

namespace lockstep {

class Error : public std::runtime_error {
 public:
  Error(std::string message, const char* file, int line);
  // The message without the "file:line" suffix, for callers that re-wrap it.
  const std::string& message() const noexcept { return message_; }
  const char* file() const noexcept { return file_; }
  int line() const noexcept { return line_; }

 private:
  std::string message_;
  const char* file_;
  int line_;
};

// Raised when a Work handle's wait() runs past its timeout; a subclass so callers can tell it apart.
class TimeoutError : public Error {
 public:
  using Error::Error;
};

// Raised when an MPI call returns an error (LOCKSTEP_MPI_CHECK), with MPI's own error string.
class MpiError : public Error {
 public:
  using Error::Error;
};

namespace detail {
inline void append_all(std::ostringstream&) {}
template <typename T, typename... Rest>
void append_all(std::ostringstream& os, const T& value, const Rest&... rest) {
  os << value;
  append_all(os, rest...);
}
template <typename... Args>
std::string str_cat(const Args&... args) {
  std::ostringstream os;
  append_all(os, args...);
  return os.str();
}
[[noreturn]] void throw_error(const char* file, int line, const char* condition, const std::string& message);
[[noreturn]] void throw_mpi_error(const char* file, int line, const char* expression, int code);
}  // namespace detail

}  // namespace lockstep

// LOCKSTEP_CHECK(cond, parts...) throws lockstep::Error("parts..." + where) when cond is false.
#define LOCKSTEP_CHECK(cond, ...)                                                                   \
  do {                                                                                              \
    if (!(cond)) {                                                                                  \
      ::lockstep::detail::throw_error(__FILE__, __LINE__, #cond, ::lockstep::detail::str_cat(__VA_ARGS__)); \
    }                                                                                               \
  } while (false)

// LOCKSTEP_FAIL(parts...) throws unconditionally.
#define LOCKSTEP_FAIL(...) \
  ::lockstep::detail::throw_error(__FILE__, __LINE__, nullptr, ::lockstep::detail::str_cat(__VA_ARGS__))

// LOCKSTEP_MPI_CHECK(call) turns an MPI return code into a lockstep::MpiError with MPI's own error string.
#define LOCKSTEP_MPI_CHECK(expr)                                        \
  do {                                                                  \
    int lockstep_mpi_rc_ = (expr);                                      \
    if (lockstep_mpi_rc_ != 0 /* MPI_SUCCESS */) {                      \
      ::lockstep::detail::throw_mpi_error(__FILE__, __LINE__, #expr, lockstep_mpi_rc_); \
    }                                                                   \
  } while (false)
