#pragma once
// Note [Checksummed files]
// ~~~~~~~~~~~~~~~~~~~~~~~~
// LibTorch reads its archives without checking the CRC-32s its zip records carry (miniz is built
// with MINIZ_DISABLE_ZIP_READER_CRC32_CHECKS), so a checkpoint with a flipped bit in a tensor (a bad
// disk, a bad copy between nodes) loads, and a resumed run trains on from wrong weights without a
// word: measured, 29 of 30 random byte flips in a ResNet checkpoint loaded and trained on. So the
// files Lockstep writes (checkpoints, int8 models, and pruned models, which only plain torch::load
// reads back) end in a 24-byte trailer:
//   bytes [0, 8)   the length of the content before the trailer (uint64, little endian)
//   bytes [8, 12)  the CRC-32 (zlib's) of that content (uint32, little endian)
//   bytes [12, 16) the trailer's version, 1
//   bytes [16, 24) "lkstcrc1"
// and every such file Lockstep reads (checkpoints, int8 models) is checked against it before its
// content is used: one more pass over the file on each rank that reads it. A zip reader
// (LibTorch's torch::load, Python's torch.load) finds the archive's end record by searching back
// from the end and skips the trailer, so the files still load anywhere. The content also holds
// kChecksumKey, so that a trailer that is itself damaged is an error too, not a file from before
// trailers (those, with neither, still load).

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>

namespace torch::serialize {
class InputArchive;
class OutputArchive;
}  // namespace torch::serialize
namespace c10 {
struct Device;
}

namespace lockstep::train {

inline constexpr std::size_t kTrailerSize = 24;
// The entry naming the trailer: a string key of the archive (or of an int8 file's dictionary).
inline constexpr const char* kChecksumKey = "lockstep_checksum";
inline constexpr const char* kChecksumValue = "crc32 trailer";

// Writes a file and its trailer: write() appends bytes while computing their CRC-32, finish() writes
// the trailer and closes the file. write() never throws: a failed write (a full disk) is remembered
// and raised by finish() as a lockstep::Error naming `path`. An exception thrown from inside
// LibTorch's zip writer would unwind through it, and its destructor writes again and throws during
// the unwinding: std::terminate (LibTorch 1.13 on /dev/full, with its own file writer too).
class ChecksumWriter {
 public:
  explicit ChecksumWriter(const std::string& path);  // throws when the file cannot be created
  ~ChecksumWriter();
  ChecksumWriter(const ChecksumWriter&) = delete;
  ChecksumWriter& operator=(const ChecksumWriter&) = delete;
  void write(const void* data, std::size_t size);
  void finish();

 private:
  std::string path_;
  std::FILE* file_ = nullptr;
  std::uint64_t size_ = 0;
  std::uint32_t crc_ = 0;
  std::string error_;  // the first failed write's
};

// zlib's CRC-32 of `size` bytes, continuing `crc` (0 to start), for any size.
std::uint32_t crc32_of(std::uint32_t crc, const void* data, std::size_t size);

// For a file's bytes in memory: the content's length when they end in a trailer that matches them,
// std::nullopt when they end in none. Throws a lockstep::Error, "<what> is corrupt: ...", when the
// trailer does not match (the length or the CRC-32); `what` names the file ("checkpoint <path>").
std::optional<std::size_t> verify_checksum(const char* data, std::size_t size, const std::string& what);
// The same for the file at `path`, read in chunks: whether it has a trailer (that matches).
bool verify_file_checksum(const std::string& path, const std::string& what);

// Writes `archive` to `path` (inside write_file_atomically's `write`) with kChecksumKey and the trailer.
void save_with_checksum(torch::serialize::OutputArchive& archive, const std::string& path);
// Checks `path`'s trailer, then loads it into `archive` with every tensor on `device`. Throws a
// lockstep::Error naming `what` when the trailer does not match, or when the archive holds
// kChecksumKey but the file has no trailer (a damaged one); LibTorch's own errors otherwise.
void load_with_checksum(torch::serialize::InputArchive& archive, const std::string& path, const c10::Device& device,
                        const std::string& what);
// For files read otherwise (an int8 model's dictionary): raises the error above when the content
// says it has a trailer (`has_key`) but `verified` is false.
void check_trailer_present(bool has_key, bool verified, const std::string& what);

}  // namespace lockstep::train
