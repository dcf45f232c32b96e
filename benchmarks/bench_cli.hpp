#pragma once
// What the benchmarks' command lines share (CLI11): running the parse with the exit codes and output
// of a well-behaved tool, and validators whose errors name the flag, the value and what was expected.
// Each program declares its own options beside its Options struct.
//
// Note [Parse before MPI]: the benchmarks parse their flags before the Runtime starts MPI. allreduce_bench
// needs --backend to make its Runtime; --help and usage errors need no MPI, no GPU and no communicator;
// and every rank parses the same argv, so every rank fails alike and leaves with the same exit code:
// nobody is left waiting in MPI_Init or a collective, and mpirun ends the whole job. Only the rank the
// launcher numbered 0 prints, so a message appears once however many ranks there are. That holds only
// while every check depends on argv alone: nothing that looks at this host (files, devices) belongs
// in the parse, where a rank that fails alone would fail silently.

#include <CLI/CLI.hpp>

#include <cstdint>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <iostream>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "lockstep/core/world.hpp"

namespace bench {

// Exit codes: 0 after --help, kUsageError after a bad command line (as getopt-style tools do).
constexpr int kUsageError = 2;

// Parses argv into app's options. Returns nothing when the program should go on, else the code it
// should exit with: 0 after --help (usage printed on stdout), kUsageError after a usage error
// ("<program>: <what>" and a pointer to --help on stderr). Only launcher rank 0 prints.
inline std::optional<int> parse(CLI::App& app, int argc, char** argv) {
  app.failure_message([](const CLI::App* failed, const CLI::Error& e) {
    return failed->get_name() + ": " + CLI::FailureMessage::simple(failed, e);
  });
  try {
    app.parse(argc, argv);
    return std::nullopt;
  } catch (const CLI::ParseError& e) {
    std::ostream silent(nullptr);  // discards what the other ranks would print
    const bool prints = lockstep::launcher_rank() == 0;
    const int code = app.exit(e, prints ? std::cout : silent, prints ? std::cerr : silent);
    std::cout.flush();
    return code == 0 ? 0 : kUsageError;
  }
}

// A lower bound checked on the text, before conversion, so that one message covers a wrong type and a
// value out of range: "--repeats: must be an integer >= 1, found '-3'". Shown in --help as INT:POSITIVE,
// INT:NONNEGATIVE or INT:AT LEAST <min>.
template <typename T>
CLI::Validator at_least(T min) {
  static_assert(std::is_arithmetic_v<T>);
  const std::string bound = CLI::detail::to_string(min);
  const std::string expected = std::string(std::is_integral_v<T> ? "an integer" : "a number") + " >= " + bound;
  return CLI::Validator(
      [min, expected](std::string& text) -> std::string {
        T value{};
        bool valid = true;
        if constexpr (std::is_integral_v<T>) {
          // Plain decimal only: CLI11 converts in base 0 (010 is 8, 0x10 is 16) and wraps "-3" around into
          // an unsigned type instead of refusing it. A check cannot rewrite the text, so a leading zero is
          // refused rather than read as octal.
          const std::size_t sign = !text.empty() && (text[0] == '+' || text[0] == '-') ? 1 : 0;
          valid = text.size() > sign && text.find_first_not_of("0123456789", sign) == std::string::npos &&
                  (text[sign] != '0' || text.size() == sign + 1) && !(std::is_unsigned_v<T> && text[0] == '-');
          errno = 0;
          char* end = nullptr;
          const long long wide = valid ? std::strtoll(text.c_str(), &end, 10) : 0;
          valid = valid && errno == 0 && *end == '\0' &&
                  (std::is_unsigned_v<T> || wide >= static_cast<long long>(std::numeric_limits<T>::min())) &&
                  (wide <= 0 || static_cast<unsigned long long>(wide) <= std::numeric_limits<T>::max());
          value = static_cast<T>(wide);
        } else {
          valid = CLI::detail::lexical_cast(text, value) && std::isfinite(value);  // "nan" is not < min
        }
        if (valid && !(value < min)) return {};
        return "must be " + expected + ", found '" + text + "'";
      },
      min == T(1) && std::is_integral_v<T> ? "POSITIVE" : min == T(0) ? "NONNEGATIVE" : "AT LEAST " + bound);
}

// A byte count with an optional binary suffix: 8, 1.5K, 16M, 1G (K = 1024; k, m, g too). Rewrites the
// text to the number of bytes, so that the option itself can be an integer. Must be at least 1. Give
// the option type_name("SIZE") for --help.
inline CLI::Validator bytes() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        const std::string expected = "must be a size in bytes >= 1 like 8, 64K, 16M or 1G, found '" + text + "'";
        const char* begin = text.c_str();
        char* end = nullptr;
        double value = std::strtod(begin, &end);
        if (end == begin) return expected;
        const std::string suffix(end);
        if (suffix == "K" || suffix == "k") value *= 1 << 10;
        else if (suffix == "M" || suffix == "m") value *= 1 << 20;
        else if (suffix == "G" || suffix == "g") value *= 1 << 30;
        else if (!suffix.empty()) return expected;
        if (!(value >= 1 && value < 9.2e18)) return expected;  // also rejects nan and inf
        text = std::to_string(static_cast<std::int64_t>(value));
        return {};
      },
      "");
}

// For an app.callback(): a list option whose values each make one row must not repeat one (two equal
// rows, and the second's --trace file over the first's). Throws CLI::ValidationError, which parse()
// reports as a usage error naming the option and the value.
template <typename T>
void no_repeats(const std::vector<T>& values, const std::string& option) {
  for (std::size_t i = 0; i < values.size(); ++i) {
    for (std::size_t j = 0; j < i; ++j) {
      if (values[j] == values[i]) {
        throw CLI::ValidationError(option, CLI::detail::to_string(values[i]) + " is given twice");
      }
    }
  }
}

}  // namespace bench
