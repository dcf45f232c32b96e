#pragma once
// What the benchmarks' results share: the median they report, and writing --json FILE so that a file
// that could not be written fails the run instead of passing for one that was (bench_cli.hpp has what
// their command lines share).

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

namespace bench {

// The median of `v` (not empty): the middle value, or the mean of the two middle values of an even count.
inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Writes `doc` to `path`, indented, with a final newline. Returns false, after "<program>: cannot write
// --json file 'FILE': <reason>" on stderr, when the file cannot be opened or the write or its flush fails (a missing
// directory, no permission, a full disk); the caller then exits non-zero.
inline bool write_json(const std::string& program, const std::string& path, const nlohmann::json& doc) {
  errno = 0;
  std::ofstream out(path);
  if (out) out << doc.dump(2) << "\n";
  if (out.is_open()) out.close();  // flushes: a full disk shows here
  if (out) return true;
  // The streams do not report why; errno from the failed open or write is the best guess there is.
  std::fprintf(stderr, "%s: cannot write --json file '%s': %s\n", program.c_str(), path.c_str(),
               errno != 0 ? std::strerror(errno) : "write failed");
  return false;
}

}  // namespace bench
