#include "data/byte_reader.hpp"

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <vector>

#include "lockstep/core/error.hpp"

namespace lockstep {
namespace data {
namespace detail {

namespace {
gzFile as_gz(void* file) { return static_cast<gzFile>(file); }
// gzread takes an unsigned count and returns an int; stay well inside both.
constexpr size_t kMaxChunk = size_t{1} << 30;
}  // namespace

ByteReader::ByteReader(std::string path) : path_(std::move(path)) {
  LOCKSTEP_CHECK(std::filesystem::is_regular_file(path_), "data file ", path_, " does not exist or is not a regular file");
  gzFile file = gzopen(path_.c_str(), "rb");
  LOCKSTEP_CHECK(file != nullptr, "cannot open data file ", path_, ": ", std::strerror(errno));
  // A larger buffer than zlib's 8 KiB default roughly halves the time to inflate the 26 MB training images.
  gzbuffer(file, 1 << 17);
  file_ = file;
}

ByteReader::~ByteReader() {
  if (file_) gzclose(as_gz(file_));
}

size_t ByteReader::read_some(void* destination, size_t size) {
  auto* out = static_cast<unsigned char*>(destination);
  size_t done = 0;
  while (done < size) {
    const size_t chunk = std::min(size - done, kMaxChunk);
    const int got = gzread(as_gz(file_), out + done, static_cast<unsigned>(chunk));
    if (got < 0) {
      int code = Z_OK;
      const char* message = gzerror(as_gz(file_), &code);
      LOCKSTEP_FAIL(path_, ": corrupt compressed data after ", offset_ + done, " bytes: ", message);
    }
    done += static_cast<size_t>(got);
    if (static_cast<size_t>(got) < chunk) break;
  }
  // A gzip stream cut short reads as a short count plus Z_BUF_ERROR, which zlib keeps until the handle is
  // closed: read_exact reports the short count as truncation, and a read to the end checks for it (see
  // check_stream_complete), since there the short count is expected and proves nothing. Any other error,
  // including a CRC-32 or length trailer that does not match (Z_DATA_ERROR), means the bytes are bad.
  int code = Z_OK;
  const char* message = gzerror(as_gz(file_), &code);
  LOCKSTEP_CHECK(code == Z_OK || code == Z_BUF_ERROR, path_, ": corrupt compressed data after ", offset_ + done,
                 " bytes: ", message);
  offset_ += done;
  return done;
}

void ByteReader::read_exact(void* destination, size_t size, const std::string& what) {
  const size_t start = offset_;
  const size_t got = read_some(destination, size);
  if (got == size) return;
  const char* hint = "";
  if (stream_cut_short()) {
    hint = " (the gzip stream ends early; sizes count uncompressed bytes)";
  } else if (compressed()) {
    hint = " (sizes count uncompressed bytes)";
  }
  LOCKSTEP_FAIL(path_, ": truncated: expected ", size, " bytes of ", what, " at offset ", start, ", found ", got, hint);
}

size_t ByteReader::count_remaining() {
  std::vector<unsigned char> scratch(1 << 16);
  size_t total = 0;
  for (;;) {
    const size_t got = read_some(scratch.data(), scratch.size());
    total += got;
    if (got < scratch.size()) {
      check_stream_complete();
      return total;
    }
  }
}

std::vector<unsigned char> ByteReader::read_to_end(size_t limit) {
  std::vector<unsigned char> bytes;
  size_t chunk = 1 << 20;
  for (;;) {
    const size_t start = bytes.size();
    const size_t want = std::min(chunk, limit + 1 - start);
    bytes.resize(start + want);
    const size_t got = read_some(bytes.data() + start, want);
    bytes.resize(start + got);
    if (bytes.size() > limit) return bytes;  // more than the caller expects: the rest is not read
    if (got < want) {
      check_stream_complete();
      return bytes;
    }
    chunk = std::min(chunk * 2, kMaxChunk);
  }
}

bool ByteReader::compressed() { return gzdirect(as_gz(file_)) == 0; }

bool ByteReader::stream_cut_short() {
  // zlib sets Z_BUF_ERROR ("unexpected end of file") only while inflating, when the file runs out before the
  // stream ends; the gzdirect test keeps plain files out of it whatever zlib does.
  int code = Z_OK;
  gzerror(as_gz(file_), &code);
  return code == Z_BUF_ERROR && compressed();
}

void ByteReader::check_stream_complete() {
  // Without this, a file missing only its 8-byte trailer passes unchecked, and one cut where the inflated
  // prefix happens to look whole (a CIFAR-10 batch cut on a record boundary) loads with data missing.
  if (!stream_cut_short()) return;
  int code = Z_OK;
  const char* message = gzerror(as_gz(file_), &code);
  LOCKSTEP_FAIL(path_, ": the gzip stream ends early (truncated or corrupt file): the file runs out after ", offset_,
                " bytes of decompressed data, before the end of the compressed stream or its CRC-32 and length "
                "trailer, so the data is incomplete or unchecked (zlib: ",
                message, ")");
}

std::string find_data_file(const std::string& directory, const std::string& name, const std::string& what) {
  namespace fs = std::filesystem;
  const fs::path compressed = fs::path(directory) / (name + ".gz");
  const fs::path plain = fs::path(directory) / name;
  if (fs::is_regular_file(compressed)) return compressed.string();
  if (fs::is_regular_file(plain)) return plain.string();
  LOCKSTEP_CHECK(fs::is_directory(directory), what, ": data directory ", directory, " does not exist");
  LOCKSTEP_FAIL(what, ": neither ", compressed.string(), " nor ", plain.string(), " exists");
}

}  // namespace detail
}  // namespace data
}  // namespace lockstep
