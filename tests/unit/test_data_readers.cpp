// IDX (MNIST / Fashion-MNIST) and CIFAR-10 readers on small files written here, raw and gzip, and every
// error case; then the real Debian Fashion-MNIST files when they are installed.
#include <torch/torch.h>
#include <catch2/catch.hpp>

#include <array>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>

#include "data/byte_reader.hpp"
#include "lockstep/config/config.hpp"
#include "lockstep/core/error.hpp"
#include "lockstep/data/cifar10.hpp"
#include "lockstep/data/mnist.hpp"
#include "support/temp_dir.hpp"

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using Bytes = std::vector<uint8_t>;
using namespace lockstep::data;

namespace {

using lockstep::testing::TempDir;

uint32_t crc32(const Bytes& data) {
  uint32_t crc = 0xffffffffu;
  for (uint8_t byte : data) {
    crc ^= byte;
    for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (0xedb88320u & (0u - (crc & 1u)));
  }
  return ~crc;
}

void put_le(Bytes& out, uint32_t value, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<uint8_t>(value >> (8 * i)));
}

// gzip (RFC 1952) with deflate "stored" blocks: a valid .gz written without zlib, so the test's files do
// not come from the library under test.
Bytes gzip(const Bytes& data) {
  Bytes out{0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255};
  size_t pos = 0;
  do {
    const size_t n = std::min<size_t>(65535, data.size() - pos);
    out.push_back(pos + n == data.size() ? 1 : 0);
    put_le(out, static_cast<uint32_t>(n), 2);
    put_le(out, static_cast<uint32_t>(~n & 0xffff), 2);
    out.insert(out.end(), data.begin() + pos, data.begin() + pos + n);
    pos += n;
  } while (pos < data.size());
  put_le(out, crc32(data), 4);
  put_le(out, static_cast<uint32_t>(data.size()), 4);
  return out;
}

void write_file(const std::string& path, const Bytes& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out.good());
}

void put_be32(Bytes& out, uint32_t value) {
  for (int i = 3; i >= 0; --i) out.push_back(static_cast<uint8_t>(value >> (8 * i)));
}

struct Idx {
  Bytes images, labels;
  Bytes pixels, label_values;
};

// count images of rows x cols with pixel (i, p) = (7 i + 3 p) mod 256 and label i mod 10.
Idx make_idx(uint32_t count, uint32_t rows, uint32_t cols) {
  Idx idx;
  put_be32(idx.images, 0x803);
  put_be32(idx.images, count);
  put_be32(idx.images, rows);
  put_be32(idx.images, cols);
  for (uint32_t i = 0; i < count; ++i) {
    for (uint32_t p = 0; p < rows * cols; ++p) idx.pixels.push_back(static_cast<uint8_t>((7 * i + 3 * p) % 256));
  }
  idx.images.insert(idx.images.end(), idx.pixels.begin(), idx.pixels.end());
  put_be32(idx.labels, 0x801);
  put_be32(idx.labels, count);
  for (uint32_t i = 0; i < count; ++i) idx.label_values.push_back(static_cast<uint8_t>(i % 10));
  idx.labels.insert(idx.labels.end(), idx.label_values.begin(), idx.label_values.end());
  return idx;
}

void write_split(const TempDir& dir, const std::string& prefix, const Idx& idx, bool compressed) {
  const std::string suffix = compressed ? ".gz" : "";
  write_file(dir / (prefix + "-images-idx3-ubyte" + suffix), compressed ? gzip(idx.images) : idx.images);
  write_file(dir / (prefix + "-labels-idx1-ubyte" + suffix), compressed ? gzip(idx.labels) : idx.labels);
}

void check_matches(const ImageData& data, const Idx& idx, int64_t count, int64_t rows, int64_t cols) {
  REQUIRE(data.images.sizes() == torch::IntArrayRef({count, 1, rows, cols}));
  REQUIRE(data.labels.sizes() == torch::IntArrayRef({count}));
  const auto* pixels = data.images.data_ptr<uint8_t>();
  CHECK(Bytes(pixels, pixels + idx.pixels.size()) == idx.pixels);
  for (int64_t i = 0; i < count; ++i) CHECK(data.labels[i].item<int64_t>() == idx.label_values[i]);
}

}  // namespace

TEST_CASE("IDX reader: raw and gzip files give the same images and labels", "[data]") {
  TempDir dir;
  const Idx idx = make_idx(12, 5, 3);
  write_file(dir / "a.idx", idx.images);
  write_file(dir / "a.labels", idx.labels);
  write_file(dir / "b.idx.gz", gzip(idx.images));
  write_file(dir / "b.labels.gz", gzip(idx.labels));
  check_matches(read_idx_files(dir / "a.idx", dir / "a.labels"), idx, 12, 5, 3);
  check_matches(read_idx_files(dir / "b.idx.gz", dir / "b.labels.gz"), idx, 12, 5, 3);
}

TEST_CASE("Mnist: finds the split's files (gzip preferred), normalises per batch", "[data]") {
  TempDir dir;
  const Idx train = make_idx(20, 4, 4), test = make_idx(6, 4, 4);
  write_split(dir, "train", train, /*compressed=*/true);
  write_split(dir, "t10k", test, /*compressed=*/false);
  // A plain copy beside the .gz with different content: the .gz must win.
  write_split(dir, "train", make_idx(3, 4, 4), /*compressed=*/false);

  MnistOptions options;
  options.root = dir.path().string();
  Mnist mnist(options);
  REQUIRE(mnist.size() == 20);
  CHECK(mnist.info().channels == 1);
  CHECK(mnist.info().height == 4);
  CHECK(mnist.info().num_classes == 10);
  check_matches(ImageData{mnist.images(), mnist.labels()}, train, 20, 4, 4);

  const Example batch = mnist.get_batch({3, 17, 3});
  REQUIRE(batch.data.sizes() == torch::IntArrayRef({3, 1, 4, 4}));
  CHECK(batch.data.scalar_type() == torch::kFloat);
  CHECK(batch.target.scalar_type() == torch::kLong);
  const std::vector<int64_t> picked{3, 17, 3};
  for (int64_t b = 0; b < 3; ++b) {
    CHECK(batch.target[b].item<int64_t>() == picked[b] % 10);
    for (int64_t p = 0; p < 16; ++p) {
      const double raw = (7 * picked[b] + 3 * p) % 256;
      CHECK(batch.data[b][0][p / 4][p % 4].item<float>() == Approx((raw / 255.0 - 0.1307) / 0.3081).epsilon(1e-6));
    }
  }
  CHECK(mnist.info().pad_values.at(0) == Approx(-0.1307 / 0.3081));
  CHECK_THROWS_WITH(mnist.get_batch({20}), Contains("index 20") && Contains("expected 0 <= index < 20"));

  options.split = Split::Test;
  Mnist mnist_test(options);
  CHECK(mnist_test.size() == 6);
  CHECK_THAT(mnist_test.description(), Contains("MNIST test"));

  FashionMnistOptions fashion;
  fashion.root = dir.path().string();
  fashion.split = Split::Test;
  FashionMnist f(fashion);
  CHECK(f.get_batch({0}).data[0][0][0][0].item<float>() == Approx((0 - 0.2860) / 0.3530));
}

TEST_CASE("IDX reader: each bad input is an error naming the file and the problem", "[data]") {
  TempDir dir;
  const Idx idx = make_idx(4, 3, 3);
  write_file(dir / "images", idx.images);
  write_file(dir / "labels", idx.labels);

  SECTION("missing file") {
    CHECK_THROWS_WITH(read_idx_files(dir / "nope", dir / "labels"), Contains(dir / "nope") && Contains("does not exist"));
    MnistOptions options;
    options.root = dir.path().string();
    CHECK_THROWS_WITH(Mnist(options), Contains("MNIST train images") && Contains(dir / "train-images-idx3-ubyte.gz") &&
                                          Contains(dir / "train-images-idx3-ubyte"));
    options.root = dir / "missing-directory";
    CHECK_THROWS_WITH(Mnist(options), Contains("missing-directory") && Contains("does not exist"));
    options.root = "";
    CHECK_THROWS_WITH(Mnist(options), Contains("no data directory"));
  }
  SECTION("bad magic") {
    Bytes bad = idx.images;
    bad[2] = 0x09;
    write_file(dir / "bad", bad);
    CHECK_THROWS_WITH(read_idx_files(dir / "bad", dir / "labels"),
                      Contains(dir / "bad") && Contains("bad IDX magic number 0x00000903") && Contains("0x00000803"));
    CHECK_THROWS_WITH(read_idx_files(dir / "labels", dir / "images"),
                      Contains(dir / "labels") && Contains("were the image and label files swapped"));
  }
  SECTION("truncated raw file") {
    Bytes cut(idx.images.begin(), idx.images.end() - 5);
    write_file(dir / "cut", cut);
    CHECK_THROWS_WITH(read_idx_files(dir / "cut", dir / "labels"),
                      Contains(dir / "cut") && Contains("truncated") && Contains("expected 36 bytes") &&
                          Contains("found 31"));
    Bytes header_only(idx.images.begin(), idx.images.begin() + 6);
    write_file(dir / "header", header_only);
    CHECK_THROWS_WITH(read_idx_files(dir / "header", dir / "labels"),
                      Contains(dir / "header") && Contains("truncated") && Contains("image count"));
    Bytes cut_labels(idx.labels.begin(), idx.labels.end() - 1);
    write_file(dir / "cut_labels", cut_labels);
    CHECK_THROWS_WITH(read_idx_files(dir / "images", dir / "cut_labels"),
                      Contains(dir / "cut_labels") && Contains("truncated"));
  }
  SECTION("truncated gzip file") {
    Bytes packed = gzip(idx.images);
    write_file(dir / "cut.gz", Bytes(packed.begin(), packed.end() - 20));
    CHECK_THROWS_WITH(read_idx_files(dir / "cut.gz", dir / "labels"), Contains(dir / "cut.gz") && Contains("truncated"));
  }
  SECTION("corrupt gzip file") {
    Bytes packed = gzip(idx.images);
    packed[packed.size() - 6] ^= 0xff;  // CRC no longer matches
    write_file(dir / "crc.gz", packed);
    CHECK_THROWS_WITH(read_idx_files(dir / "crc.gz", dir / "labels"), Contains(dir / "crc.gz") && Contains("corrupt"));
  }
  SECTION("count mismatch") {
    const Idx other = make_idx(5, 3, 3);
    write_file(dir / "labels5", other.labels);
    CHECK_THROWS_WITH(read_idx_files(dir / "images", dir / "labels5"),
                      Contains("count mismatch") && Contains(dir / "images") && Contains("declares 4 images") &&
                          Contains(dir / "labels5") && Contains("5 labels"));
  }
  SECTION("trailing bytes") {
    Bytes longer = idx.images;
    longer.push_back(0);
    longer.push_back(0);
    write_file(dir / "long", longer);
    CHECK_THROWS_WITH(read_idx_files(dir / "long", dir / "labels"), Contains(dir / "long") && Contains("2 unexpected bytes"));
  }
  SECTION("bad dimensions and labels") {
    Bytes empty_images;
    put_be32(empty_images, 0x803);
    put_be32(empty_images, 4);
    put_be32(empty_images, 0);
    put_be32(empty_images, 3);
    write_file(dir / "zero", empty_images);
    CHECK_THROWS_WITH(read_idx_files(dir / "zero", dir / "labels"), Contains(dir / "zero") && Contains("0x3 images"));
    Bytes bad_labels = idx.labels;
    bad_labels[8 + 2] = 10;
    write_file(dir / "bad_labels", bad_labels);
    CHECK_THROWS_WITH(read_idx_files(dir / "images", dir / "bad_labels"),
                      Contains(dir / "bad_labels") && Contains("label 10 at index 2") && Contains("expected 0..9"));
  }
}

TEST_CASE("IDX reader: a gzip file cut before or inside its trailer is an error naming the file", "[data]") {
  TempDir dir;
  const Idx idx = make_idx(4, 3, 3);
  write_file(dir / "images", idx.images);
  write_file(dir / "labels", idx.labels);

  SECTION("images: every data byte there, the CRC-32 and length (8 bytes) or part of them missing") {
    const Bytes packed = gzip(idx.images);
    for (int cut : {8, 4, 1}) {
      const std::string path = dir / ("cut" + std::to_string(cut) + ".gz");
      write_file(path, Bytes(packed.begin(), packed.end() - cut));
      CHECK_THROWS_WITH(read_idx_files(path, dir / "labels"),
                        Contains(path) && Contains("gzip stream ends early") && Contains("after 52 bytes"));
    }
  }
  SECTION("labels without their trailer") {
    const Bytes packed = gzip(idx.labels);
    write_file(dir / "labels.gz", Bytes(packed.begin(), packed.end() - 8));
    CHECK_THROWS_WITH(read_idx_files(dir / "images", dir / "labels.gz"),
                      Contains(dir / "labels.gz") && Contains("gzip stream ends early"));
  }
  SECTION("a complete stream holding fewer images than the header says is a short read, not an early end") {
    Bytes more = idx.images;
    more[7] = 5;  // the image count (bytes 4..7, big-endian) says 5; the data holds 4
    write_file(dir / "short.gz", gzip(more));
    write_file(dir / "labels5", make_idx(5, 3, 3).labels);
    CHECK_THROWS_WITH(read_idx_files(dir / "short.gz", dir / "labels5"),
                      Contains(dir / "short.gz") && Contains("truncated") && Contains("expected 45 bytes") &&
                          Contains("found 36") && !Contains("ends early"));
  }
}

TEST_CASE("IDX reader: a gzip trailer that does not match the data is an error naming the file", "[data]") {
  TempDir dir;
  const Idx idx = make_idx(4, 3, 3);
  write_file(dir / "labels", idx.labels);
  Bytes packed = gzip(idx.images);

  SECTION("CRC-32") {
    packed[packed.size() - 8] ^= 0x01;
    write_file(dir / "crc.gz", packed);
    CHECK_THROWS_WITH(read_idx_files(dir / "crc.gz", dir / "labels"),
                      Contains(dir / "crc.gz") && Contains("corrupt") && Contains("incorrect data check"));
  }
  SECTION("length") {
    packed[packed.size() - 1] ^= 0x01;
    write_file(dir / "length.gz", packed);
    CHECK_THROWS_WITH(read_idx_files(dir / "length.gz", dir / "labels"),
                      Contains(dir / "length.gz") && Contains("corrupt") && Contains("incorrect length check"));
  }
}

TEST_CASE("IDX reader: a plain file shorter than its header says fails before the tensor is allocated", "[data]") {
  TempDir dir;
  const Idx idx = make_idx(4, 3, 3);
  write_file(dir / "images", idx.images);
  write_file(dir / "labels", idx.labels);

  SECTION("one image short") {
    Bytes more = idx.images;
    more[7] = 5;  // the image count says 5; the file holds 4
    write_file(dir / "images5", more);
    CHECK_THROWS_WITH(read_idx_files(dir / "images5", dir / "labels"),
                      Contains(dir / "images5") && Contains("shorter than its header says") &&
                          Contains("expected 45 bytes of pixel data (5 images of 3x3)") && Contains("found 36"));
  }
  SECTION("a corrupt count asking for 64 GB") {
    Bytes huge;
    put_be32(huge, 0x803);
    put_be32(huge, 1000000000);
    put_be32(huge, 8);
    put_be32(huge, 8);
    huge.resize(huge.size() + 64);  // one 8x8 image of zeros
    write_file(dir / "huge", huge);
    // Under the 64 GiB limit, so only the size check stands between this header and a 64 GB allocation.
    CHECK_THROWS_WITH(read_idx_files(dir / "huge", dir / "labels"),
                      Contains(dir / "huge") && Contains("shorter than its header says") &&
                          Contains("expected 64000000000 bytes") && Contains("found 64"));
  }
  SECTION("a corrupt count in gzip files: read in pieces, so nothing near 64 GB is allocated") {
    Bytes huge;
    put_be32(huge, 0x803);
    put_be32(huge, 1000000000);
    put_be32(huge, 8);
    put_be32(huge, 8);
    huge.resize(huge.size() + 64);
    write_file(dir / "huge.gz", gzip(huge));
    Bytes labels;
    put_be32(labels, 0x801);
    put_be32(labels, 1000000000);
    labels.resize(labels.size() + 1);
    write_file(dir / "labels.gz", gzip(labels));
    CHECK_THROWS_WITH(read_idx_files(dir / "huge.gz", dir / "labels.gz"),
                      Contains(dir / "huge.gz") && Contains("truncated") && Contains("of 64000000000)") &&
                          Contains("found 64"));
  }
  SECTION("labels") {
    write_file(dir / "labels3", Bytes(idx.labels.begin(), idx.labels.end() - 1));
    CHECK_THROWS_WITH(read_idx_files(dir / "images", dir / "labels3"),
                      Contains(dir / "labels3") && Contains("shorter than its header says") &&
                          Contains("expected 4 bytes of labels") && Contains("found 3"));
  }
}

namespace {
// CIFAR-10 records with label (first + r) % 10 and pixel bytes (first + r + p) % 256.
Bytes make_cifar(int records, int first) {
  Bytes out;
  for (int r = 0; r < records; ++r) {
    out.push_back(static_cast<uint8_t>((first + r) % 10));
    for (int p = 0; p < 3072; ++p) out.push_back(static_cast<uint8_t>((first + r + p) % 256));
  }
  return out;
}
}  // namespace

TEST_CASE("Cifar10: reads the five training batches in order and the test batch, raw or gzip", "[data]") {
  TempDir dir;
  fs::create_directories(dir.path() / "cifar-10-batches-bin");
  const std::string inner = (dir.path() / "cifar-10-batches-bin").string();
  int first = 0;
  for (int i = 1; i <= 5; ++i) {
    const Bytes records = make_cifar(i, first);  // 1 + 2 + ... + 5 = 15 records
    const std::string path = inner + "/data_batch_" + std::to_string(i) + ".bin";
    if (i % 2) {
      write_file(path, records);
    } else {
      write_file(path + ".gz", gzip(records));
    }
    first += i;
  }
  write_file(inner + "/test_batch.bin", make_cifar(4, 100));

  Cifar10Options options;
  options.root = dir.path().string();  // the parent of cifar-10-batches-bin is accepted
  // The real batch files hold 10000 records each: these small ones are refused by default.
  CHECK_THROWS_WITH(Cifar10(options), Contains("data_batch_1.bin: 1 records, but each CIFAR-10 batch file holds 10000"));
  // The same through the config (data.records_per_file, a cifar10 key).
  lockstep::config::DataConfig data;
  data.dataset = "cifar10";
  data.dir = options.root;
  CHECK_THROWS_WITH(lockstep::config::make_datasets(data, 1), Contains("holds 10000"));
  data.records_per_file = 0;
  const auto [from_config, test_from_config] = lockstep::config::make_datasets(data, 1);
  CHECK(from_config->size() == 15);
  CHECK(test_from_config->size() == 4);
  options.records_per_file = 0;
  Cifar10 train(options);
  REQUIRE(train.size() == 15);
  CHECK(train.info().channels == 3);
  CHECK(train.info().height == 32);
  CHECK(train.info().width == 32);
  for (int64_t n = 0; n < 15; ++n) {
    CHECK(train.labels()[n].item<int64_t>() == n % 10);
    // Channel 1 (green), row 2, column 5 is byte 1024 + 2 * 32 + 5 of the record's pixels.
    CHECK(train.images()[n][1][2][5].item<int>() == (n + 1024 + 69) % 256);
  }
  const Example batch = train.get_batch({14});
  CHECK(batch.data[0][2][0][0].item<float>() == Approx(((14 + 2048) % 256 / 255.0 - 0.4465) / 0.2616));

  options.split = Split::Test;
  options.root = inner;
  Cifar10 test(options);
  CHECK(test.size() == 4);
  CHECK(test.labels()[0].item<int64_t>() == 0);
}

TEST_CASE("Cifar10: bad inputs are errors naming the file", "[data]") {
  TempDir dir;
  Cifar10Options options;
  options.root = dir.path().string();
  options.records_per_file = 0;  // small test files
  options.split = Split::Test;
  CHECK_THROWS_WITH(Cifar10(options), Contains("CIFAR-10 test") && Contains(dir / "test_batch.bin"));
  options.split = Split::Train;
  CHECK_THROWS_WITH(Cifar10(options), Contains("CIFAR-10 train batch 1") && Contains(dir / "data_batch_1.bin"));

  Bytes records = make_cifar(3, 0);
  write_file(dir / "cut.bin", Bytes(records.begin(), records.end() - 100));
  CHECK_THROWS_WITH(read_cifar10_files({dir / "cut.bin"}),
                    Contains(dir / "cut.bin") && Contains("truncated") && Contains("2 records and 2973 bytes left over"));
  write_file(dir / "empty.bin", {});
  CHECK_THROWS_WITH(read_cifar10_files({dir / "empty.bin"}), Contains(dir / "empty.bin") && Contains("empty file"));
  records[3073] = 12;
  write_file(dir / "label.bin", records);
  CHECK_THROWS_WITH(read_cifar10_files({dir / "label.bin"}),
                    Contains(dir / "label.bin") && Contains("record 1 has label 12") && Contains("0..9"));
  options.mean = {0.5, 0.5};
  write_file(dir / "test_batch.bin", make_cifar(2, 0));
  options.split = Split::Test;
  CHECK_THROWS_WITH(Cifar10(options), Contains("mean has 2 values") && Contains("one per channel (3)"));
}

TEST_CASE("Cifar10: a gzip batch that ends early is an error, even cut on a record boundary", "[data]") {
  TempDir dir;
  // 100 records (307300 bytes), more than zlib's 256 KiB output buffer, so reads also inflate straight into
  // the caller's buffer.
  const Bytes records = make_cifar(100, 0);
  const Bytes packed = gzip(records);
  write_file(dir / "whole.bin.gz", packed);
  CHECK(read_cifar10_files({dir / "whole.bin.gz"}).labels.size(0) == 100);
  CHECK(read_cifar10_files({dir / "whole.bin.gz"}, 100).labels.size(0) == 100);
  CHECK_THROWS_WITH(read_cifar10_files({dir / "whole.bin.gz"}, 101),
                    Contains("100 records, but each CIFAR-10 batch file holds 101"));
  // Larger than expected: refused without inflating the rest (read_to_end stops one byte past the limit).
  CHECK_THROWS_WITH(read_cifar10_files({dir / "whole.bin.gz"}, 10),
                    Contains(dir / "whole.bin.gz") && Contains("more than 10 records (over 30730 bytes)") &&
                        Contains("each CIFAR-10 batch file holds 10"));
  for (const std::string name : {"whole.bin.gz", "raw.bin"}) {
    if (name == "raw.bin") write_file(dir / name, records);
    lockstep::data::detail::ByteReader reader(dir / name);
    CHECK(reader.read_to_end(30730).size() == 30731);
    lockstep::data::detail::ByteReader again(dir / name);
    CHECK(again.read_to_end(records.size()).size() == records.size());  // the limit exactly: all of it
  }

  SECTION("trailer missing: all 100 records there, unchecked") {
    write_file(dir / "cut.bin.gz", Bytes(packed.begin(), packed.end() - 8));
    CHECK_THROWS_WITH(read_cifar10_files({dir / "cut.bin.gz"}),
                      Contains(dir / "cut.bin.gz") && Contains("gzip stream ends early") &&
                          Contains("after 307300 bytes"));
    // Expecting 10 records, the reader stops past them: the cut end is never reached.
    CHECK_THROWS_WITH(read_cifar10_files({dir / "cut.bin.gz"}, 10),
                      Contains("more than 10 records") && !Contains("ends early"));
  }
  SECTION("cut after 90 records: a whole number of records inflates, the rest is missing") {
    // gzip() writes a 10-byte header, then stored blocks of up to 65535 bytes, each after a 5-byte header.
    const size_t kept = 90 * 3073;
    REQUIRE(kept % 65535 != 0);
    const size_t cut_at = 10 + 5 * (kept / 65535 + 1) + kept;
    write_file(dir / "cut.bin.gz", Bytes(packed.begin(), packed.begin() + cut_at));
    CHECK_THROWS_WITH(read_cifar10_files({dir / "cut.bin.gz"}),
                      Contains(dir / "cut.bin.gz") && Contains("gzip stream ends early") &&
                          Contains("after 276570 bytes"));
  }
  SECTION("CRC-32 does not match") {
    Bytes bad = packed;
    bad[bad.size() - 8] ^= 0x01;
    write_file(dir / "crc.bin.gz", bad);
    CHECK_THROWS_WITH(read_cifar10_files({dir / "crc.bin.gz"}),
                      Contains(dir / "crc.bin.gz") && Contains("corrupt") && Contains("incorrect data check"));
  }
  SECTION("through Cifar10, as data_batch_3.bin.gz") {
    for (int i = 1; i <= 5; ++i) {
      const std::string path = dir / ("data_batch_" + std::to_string(i) + ".bin.gz");
      write_file(path, i == 3 ? Bytes(packed.begin(), packed.end() - 8) : packed);
    }
    Cifar10Options options;
    options.root = dir.path().string();
    options.records_per_file = 0;  // small test files
    CHECK_THROWS_WITH(Cifar10(options), Contains(dir / "data_batch_3.bin.gz") && Contains("gzip stream ends early"));
  }
}

TEST_CASE("FashionMnist: the real Debian files (60000 train, 10000 test, mean 0.2860)", "[data]") {
  if (!fs::exists(std::string(kFashionMnistRoot) + "/train-images-idx3-ubyte.gz")) {
    WARN("skipped: Fashion-MNIST not installed under " << kFashionMnistRoot << " (apt install dataset-fashion-mnist)");
    return;
  }
  FashionMnist train;
  REQUIRE(train.size() == 60000);
  CHECK(train.images().sizes() == torch::IntArrayRef({60000, 1, 28, 28}));
  // Mean and std of pixel/255 from a histogram of the raw bytes (a float copy of all 47 million pixels
  // costs seconds in page faults on these machines).
  std::array<int64_t, 256> histogram{};
  const uint8_t* pixels = train.images().data_ptr<uint8_t>();
  for (int64_t i = 0; i < train.images().numel(); ++i) ++histogram[pixels[i]];
  double sum = 0, sum_sq = 0;
  for (int v = 0; v < 256; ++v) {
    sum += histogram[v] * (v / 255.0);
    sum_sq += histogram[v] * (v / 255.0) * (v / 255.0);
  }
  const double n = static_cast<double>(train.images().numel());
  CHECK(sum / n == Approx(0.2860).margin(1e-3));
  CHECK(std::sqrt(sum_sq / n - (sum / n) * (sum / n)) == Approx(0.3530).margin(1e-3));
  // Fashion-MNIST is balanced: 6000 of each class in train, 1000 in test.
  CHECK(torch::bincount(train.labels()).eq(6000).all().item<bool>());

  std::vector<int64_t> every_sixth;
  for (int64_t i = 0; i < 60000; i += 6) every_sixth.push_back(i);
  const torch::Tensor normalised = train.get_batch(every_sixth).data;
  CHECK(normalised.mean().item<double>() == Approx(0.0).margin(0.01));
  CHECK(normalised.std().item<double>() == Approx(1.0).margin(0.01));

  FashionMnistOptions options;
  options.split = Split::Test;
  FashionMnist test(options);
  REQUIRE(test.size() == 10000);
  CHECK(torch::bincount(test.labels()).eq(1000).all().item<bool>());
}
