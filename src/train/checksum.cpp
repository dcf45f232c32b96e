#include "train/checksum.hpp"

#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>
#include <sys/types.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <vector>

#include "lockstep/core/error.hpp"

namespace lockstep::train {

namespace {

constexpr char kMagic[8] = {'l', 'k', 's', 't', 'c', 'r', 'c', '1'};
constexpr std::uint32_t kTrailerVersion = 1;
constexpr const char* kUseAnother = "Use another copy of it, or an earlier file";

void put_le(unsigned char* out, std::uint64_t value, int bytes) {
  for (int i = 0; i < bytes; ++i) out[i] = static_cast<unsigned char>(value >> (8 * i));
}

std::uint64_t get_le(const unsigned char* in, int bytes) {
  std::uint64_t value = 0;
  for (int i = 0; i < bytes; ++i) value |= static_cast<std::uint64_t>(in[i]) << (8 * i);
  return value;
}

struct Trailer {
  std::uint64_t size;
  std::uint32_t crc;
  std::uint32_t version;
};

// The trailer in a file's last kTrailerSize bytes, or nullopt when they are not one.
std::optional<Trailer> parse_trailer(const unsigned char* tail) {
  if (std::memcmp(tail + 16, kMagic, sizeof kMagic) != 0) return std::nullopt;
  return Trailer{get_le(tail, 8), static_cast<std::uint32_t>(get_le(tail + 8, 4)),
                 static_cast<std::uint32_t>(get_le(tail + 12, 4))};
}

// `crc` is the content's, computed only when the lengths agree.
void check_trailer(const Trailer& trailer, std::uint64_t content, std::uint32_t crc, const std::string& what) {
  LOCKSTEP_CHECK(trailer.version == kTrailerVersion, what, " ends in a checksum trailer of version ", trailer.version,
                 ", which a newer Lockstep wrote; this one reads version ", kTrailerVersion);
  LOCKSTEP_CHECK(trailer.size == content, what, " is corrupt: its checksum trailer was written after ", trailer.size,
                 " bytes of content, but ", content, " bytes precede it (the file was cut or added to after it was "
                 "written). ", kUseAnother);
  char text[64];
  std::snprintf(text, sizeof text, "CRC-32 %08x where %08x was written", static_cast<unsigned>(crc),
                static_cast<unsigned>(trailer.crc));
  LOCKSTEP_CHECK(trailer.crc == crc, what, " is corrupt: its content does not match the checksum written with it (",
                 text, "): the file changed after it was written (a bad disk or a bad copy). ", kUseAnother);
}

}  // namespace

std::uint32_t crc32_of(std::uint32_t crc, const void* data, std::size_t size) {
  const auto* bytes = static_cast<const Bytef*>(data);
  while (size > 0) {  // zlib's crc32 takes a 32-bit length
    const auto chunk = static_cast<uInt>(std::min<std::size_t>(size, 1u << 30));
    crc = static_cast<std::uint32_t>(::crc32(crc, bytes, chunk));
    bytes += chunk;
    size -= chunk;
  }
  return crc;
}

ChecksumWriter::ChecksumWriter(const std::string& path) : path_(path), file_(std::fopen(path.c_str(), "wb")) {
  LOCKSTEP_CHECK(file_ != nullptr, "cannot create ", path, ": ", std::strerror(errno));
}

ChecksumWriter::~ChecksumWriter() {
  if (file_ != nullptr) std::fclose(file_);
}

void ChecksumWriter::write(const void* data, std::size_t size) {
  if (file_ == nullptr && error_.empty()) error_ = "written to after finish()";
  if (!error_.empty()) return;
  if (std::fwrite(data, 1, size, file_) != size) {
    error_ = std::strerror(errno);
    return;
  }
  crc_ = crc32_of(crc_, data, size);
  size_ += size;
}

void ChecksumWriter::finish() {
  LOCKSTEP_CHECK(file_ != nullptr, "ChecksumWriter: ", path_, " is already finished");
  if (!error_.empty()) {
    std::fclose(file_);
    file_ = nullptr;
    LOCKSTEP_FAIL("cannot write ", path_, ": ", error_);
  }
  unsigned char trailer[kTrailerSize];
  put_le(trailer, size_, 8);
  put_le(trailer + 8, crc_, 4);
  put_le(trailer + 12, kTrailerVersion, 4);
  std::memcpy(trailer + 16, kMagic, sizeof kMagic);
  LOCKSTEP_CHECK(std::fwrite(trailer, 1, kTrailerSize, file_) == kTrailerSize, "cannot write ", path_, ": ",
                 std::strerror(errno));
  std::FILE* file = file_;
  file_ = nullptr;
  LOCKSTEP_CHECK(std::fclose(file) == 0, "cannot write ", path_, ": ", std::strerror(errno));  // flushes
}

std::optional<std::size_t> verify_checksum(const char* data, std::size_t size, const std::string& what) {
  if (size < kTrailerSize) return std::nullopt;
  const auto* tail = reinterpret_cast<const unsigned char*>(data + size - kTrailerSize);
  const std::optional<Trailer> trailer = parse_trailer(tail);
  if (!trailer) return std::nullopt;
  const std::size_t content = size - kTrailerSize;
  check_trailer(*trailer, content, trailer->size == content ? crc32_of(0, data, content) : 0, what);
  return content;
}

bool verify_file_checksum(const std::string& path, const std::string& what) {
  std::FILE* file = std::fopen(path.c_str(), "rb");
  LOCKSTEP_CHECK(file != nullptr, "cannot open ", path, ": ", std::strerror(errno));
  struct Closer {
    std::FILE* f;
    ~Closer() { std::fclose(f); }
  } closer{file};
  // fseeko/ftello take off_t: 64-bit on LP64, and on 32-bit builds with _FILE_OFFSET_BITS=64, where
  // fseek's long would stop at 2 GB.
  LOCKSTEP_CHECK(fseeko(file, 0, SEEK_END) == 0, "cannot read ", path, ": ", std::strerror(errno));
  const off_t end = ftello(file);
  LOCKSTEP_CHECK(end >= 0, "cannot read ", path, ": ", std::strerror(errno));
  const auto size = static_cast<std::uint64_t>(end);
  if (size < kTrailerSize) return false;
  unsigned char tail[kTrailerSize];
  LOCKSTEP_CHECK(fseeko(file, static_cast<off_t>(size - kTrailerSize), SEEK_SET) == 0 &&
                     std::fread(tail, 1, kTrailerSize, file) == kTrailerSize,
                 "cannot read ", path, ": ", std::strerror(errno));
  const std::optional<Trailer> trailer = parse_trailer(tail);
  if (!trailer) return false;
  const std::uint64_t content = size - kTrailerSize;
  std::uint32_t crc = 0;
  if (trailer->size == content) {
    LOCKSTEP_CHECK(fseeko(file, 0, SEEK_SET) == 0, "cannot read ", path, ": ", std::strerror(errno));
    std::vector<unsigned char> chunk(std::size_t{4} << 20);
    for (std::uint64_t left = content; left > 0;) {
      const std::size_t want = static_cast<std::size_t>(std::min<std::uint64_t>(left, chunk.size()));
      LOCKSTEP_CHECK(std::fread(chunk.data(), 1, want, file) == want, "cannot read ", path, ": ",
                     std::ferror(file) ? std::strerror(errno) : "it ended early");
      crc = crc32_of(crc, chunk.data(), want);
      left -= want;
    }
  }
  check_trailer(*trailer, content, crc, what);
  return true;
}

void save_with_checksum(torch::serialize::OutputArchive& archive, const std::string& path) {
  archive.write(kChecksumKey, c10::IValue(std::string(kChecksumValue)));
  ChecksumWriter writer(path);
  archive.save_to([&writer](const void* data, std::size_t size) -> std::size_t {
    writer.write(data, size);
    return size;
  });
  writer.finish();
}

void check_trailer_present(bool has_key, bool verified, const std::string& what) {
  LOCKSTEP_CHECK(!has_key || verified, what, " is corrupt: it was written with a checksum trailer, and its trailer "
                 "is missing or damaged (the file was cut or changed after it was written). ", kUseAnother);
}

void load_with_checksum(torch::serialize::InputArchive& archive, const std::string& path, const c10::Device& device,
                        const std::string& what) {
  const bool verified = verify_file_checksum(path, what);
  archive.load_from(path, device);
  c10::IValue key;
  check_trailer_present(archive.try_read(kChecksumKey, key), verified, what);
}

}  // namespace lockstep::train
