#pragma once
// ByteReader: sequential reads from a data file that may be gzip-compressed or plain, with errors that
// name the file, the offset and what was being read. zlib's gzread passes plain files through unchanged,
// so one code path serves both Debian's .gz files and unpacked copies.

#include <cstddef>
#include <string>
#include <vector>

namespace lockstep {
namespace data {
namespace detail {

class ByteReader {
 public:
  explicit ByteReader(std::string path);
  ~ByteReader();
  ByteReader(const ByteReader&) = delete;
  ByteReader& operator=(const ByteReader&) = delete;

  // Reads exactly `size` bytes; a short read throws "<path>: truncated: expected ... of <what> ...".
  void read_exact(void* destination, size_t size, const std::string& what);
  // Counts the bytes left (reading them); 0 at the end of the data. Throws when a gzip file ends before its
  // stream does (see check_stream_complete).
  size_t count_remaining();
  // Reads everything left; throws like count_remaining on a gzip file that ends early. With a `limit`,
  // reads at most limit + 1 bytes: a caller that knows the size to expect sees "more than that" without
  // the rest of an oversized file (or a gzip bomb) being inflated into memory.
  std::vector<unsigned char> read_to_end(size_t limit = static_cast<size_t>(-1) - 1);

  // True for gzip data, false for a plain file that zlib passes through. Call after the first read.
  bool compressed();

  const std::string& path() const { return path_; }
  size_t offset() const { return offset_; }

 private:
  // Reads up to `size` bytes; returns how many were read, throwing on corrupt compressed data.
  size_t read_some(void* destination, size_t size);
  // True when zlib reached the end of the file inside a gzip stream, before its end marker or its CRC-32
  // and length trailer: the file was cut short, and what was read has not been checked against the CRC.
  bool stream_cut_short();
  // At the end of the data: throws "<path>: the gzip stream ends early ..." when stream_cut_short().
  void check_stream_complete();

  std::string path_;
  void* file_ = nullptr;  // gzFile, kept opaque so zlib.h stays out of this header
  size_t offset_ = 0;
};

// Returns "<directory>/<name>.gz" when it exists, else "<directory>/<name>", else throws naming both
// candidates and `what` (e.g. "Fashion-MNIST train images").
std::string find_data_file(const std::string& directory, const std::string& name, const std::string& what);

}  // namespace detail
}  // namespace data
}  // namespace lockstep
