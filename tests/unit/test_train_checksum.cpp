// Note [Checksummed files]: the CRC-32 trailer on the files Lockstep writes for itself.
#include <torch/torch.h>
#include <catch2/catch.hpp>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <string>
#include <vector>

#include "lockstep/core/error.hpp"
#include "support/temp_dir.hpp"
#include "train/checksum.hpp"

namespace fs = std::filesystem;
using Catch::Contains;
using lockstep::train::kTrailerSize;

namespace {

std::vector<char> read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_all(const std::string& path, const std::vector<char>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// An archive of one tensor (a 64 KB record, as a model's weights are) and one number.
torch::Tensor weights() { return torch::arange(16384, torch::kFloat32).div_(7); }

void save_checked(const std::string& path) {
  torch::serialize::OutputArchive archive;
  archive.write("w", weights());
  archive.write("step", c10::IValue(int64_t{42}));
  lockstep::train::save_with_checksum(archive, path);
}

torch::Tensor load_checked(const std::string& path) {
  torch::serialize::InputArchive archive;
  lockstep::train::load_with_checksum(archive, path, torch::kCPU, "file " + path);
  torch::Tensor w;
  archive.read("w", w);
  return w;
}

// What LibTorch alone (no trailer check) reads as "w".
torch::Tensor plain_weights(const std::string& path) {
  torch::serialize::InputArchive plain;
  plain.load_from(path);
  torch::Tensor w;
  plain.read("w", w);
  return w;
}

std::string error_of(const std::function<void()>& work) {
  try {
    work();
  } catch (const lockstep::Error& e) {
    return e.what();
  }
  return "no error";
}

}  // namespace

TEST_CASE("checksum: a file written with its trailer loads, and loads without Lockstep too", "[checksum]") {
  const lockstep::testing::TempDir dir("lockstep_checksum");
  const std::string path = dir / "a.pt";
  save_checked(path);
  const std::vector<char> bytes = read_all(path);
  REQUIRE(bytes.size() > kTrailerSize);
  CHECK(std::string(bytes.end() - 8, bytes.end()) == "lkstcrc1");
  CHECK(lockstep::train::verify_file_checksum(path, path));
  CHECK(lockstep::train::verify_checksum(bytes.data(), bytes.size(), path) == bytes.size() - kTrailerSize);
  CHECK(torch::equal(load_checked(path), weights()));
  // LibTorch's reader (torch::load, and Python's torch.load) skips the trailer.
  CHECK(torch::equal(plain_weights(path), weights()));
}

TEST_CASE("checksum: a changed byte anywhere is refused, naming the file", "[checksum]") {
  const lockstep::testing::TempDir dir("lockstep_checksum");
  const std::string path = dir / "a.pt";
  save_checked(path);
  const std::vector<char> good = read_all(path);
  const std::size_t content = good.size() - kTrailerSize;
  // Positions across the content: the zip's headers, the tensor's record (LibTorch alone reads a
  // flipped bit there as a changed weight), the central directory at its end.
  for (const std::size_t at : {std::size_t{0}, std::size_t{100}, content / 4, content / 2, content * 3 / 4,
                               content - 1}) {
    INFO("byte " << at << " of " << content);
    std::vector<char> bad = good;
    bad[at] = static_cast<char>(bad[at] ^ 0x10);
    write_all(path, bad);
    const std::string error = error_of([&] { load_checked(path); });
    CHECK_THAT(error, Contains("file " + path + " is corrupt") && Contains("does not match the checksum"));
    CHECK_THROWS_WITH(lockstep::train::verify_checksum(bad.data(), bad.size(), path), Contains("CRC-32"));
  }
  // The same flip in the tensor's record without the check: LibTorch loads a changed weight.
  std::vector<char> bad = good;
  bad[content / 2] = static_cast<char>(bad[content / 2] ^ 0x10);
  write_all(path, bad);
  CHECK_FALSE(torch::equal(plain_weights(path), weights()));
}

TEST_CASE("checksum: a damaged, cut or extended trailer is refused, naming the file", "[checksum]") {
  const lockstep::testing::TempDir dir("lockstep_checksum");
  const std::string path = dir / "a.pt";
  save_checked(path);
  const std::vector<char> good = read_all(path);
  SECTION("the magic changed: the archive says it has a trailer") {
    std::vector<char> bad = good;
    bad.back() = 'x';
    write_all(path, bad);
    CHECK_THAT(error_of([&] { load_checked(path); }), Contains(path) && Contains("trailer is missing or damaged"));
  }
  SECTION("cut inside the trailer") {
    write_all(path, std::vector<char>(good.begin(), good.end() - 1));
    CHECK_THAT(error_of([&] { load_checked(path); }), Contains(path) && Contains("trailer is missing or damaged"));
  }
  SECTION("bytes appended after the trailer") {
    std::vector<char> bad = good;
    bad.insert(bad.end(), {'a', 'b', 'c'});
    write_all(path, bad);
    CHECK_THAT(error_of([&] { load_checked(path); }), Contains(path) && Contains("trailer is missing or damaged"));
  }
  SECTION("bytes inserted before the trailer") {
    std::vector<char> bad = good;
    bad.insert(bad.end() - kTrailerSize, 'a');
    write_all(path, bad);
    CHECK_THAT(error_of([&] { load_checked(path); }), Contains(path) && Contains("was cut or added to"));
    CHECK_THROWS_WITH(lockstep::train::verify_checksum(bad.data(), bad.size(), path), Contains("was cut or added to"));
  }
  SECTION("a trailer of a later version") {
    std::vector<char> bad = good;
    bad[bad.size() - kTrailerSize + 12] = 2;
    write_all(path, bad);
    CHECK_THAT(error_of([&] { load_checked(path); }), Contains(path) && Contains("which a newer Lockstep wrote"));
  }
}

TEST_CASE("checksum: a file from before trailers loads as it is", "[checksum]") {
  const lockstep::testing::TempDir dir("lockstep_checksum");
  const std::string path = dir / "old.pt";
  torch::serialize::OutputArchive archive;
  archive.write("w", weights());
  archive.save_to(path);
  CHECK_FALSE(lockstep::train::verify_file_checksum(path, path));
  const std::vector<char> bytes = read_all(path);
  CHECK_FALSE(lockstep::train::verify_checksum(bytes.data(), bytes.size(), path).has_value());
  CHECK(torch::equal(load_checked(path), weights()));
  // Too short to hold a trailer at all.
  write_all(path, {'a', 'b'});
  CHECK_FALSE(lockstep::train::verify_file_checksum(path, path));
}

TEST_CASE("checksum: a file that cannot be written or read is an error naming it", "[checksum]") {
  const lockstep::testing::TempDir dir("lockstep_checksum");
  const std::string missing = dir / "no/such/dir/a.pt";
  CHECK_THAT(error_of([&] { save_checked(missing); }), Contains("cannot create " + missing));
  CHECK_THAT(error_of([&] { lockstep::train::verify_file_checksum(missing, missing); }), Contains("cannot open " + missing));
  // A full disk halfway through: an error, where an exception thrown inside LibTorch's zip writer
  // ended the process (its destructor writes again during the unwinding; LibTorch's own file writer
  // does the same: torch::serialize::OutputArchive::save_to("/dev/full") aborts).
  if (fs::exists("/dev/full")) {
    CHECK_THAT(error_of([&] { save_checked("/dev/full"); }),
               Contains("cannot write /dev/full") && Contains(std::strerror(ENOSPC)));
  } else {
    WARN("no /dev/full here: the full-disk case is not tested");
  }
  lockstep::train::ChecksumWriter writer(dir / "b.pt");
  writer.write("abc", 3);
  writer.finish();
  CHECK_THAT(error_of([&] { writer.finish(); }), Contains("is already finished"));
}
