#include "lockstep/data/mnist.hpp"

#include <torch/types.h>

#include <algorithm>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "data/byte_reader.hpp"
#include "lockstep/core/error.hpp"

namespace lockstep {
namespace data {

namespace {

constexpr uint32_t kImagesMagic = 0x00000803;  // IDX: two zero bytes, type 0x08 (uint8), 3 dimensions
constexpr uint32_t kLabelsMagic = 0x00000801;  // IDX: uint8, 1 dimension
// Guards against a corrupt header asking for an absurd allocation before the data is read.
constexpr uint64_t kMaxImageBytes = uint64_t{1} << 36;

std::string hex(uint32_t value) {
  char text[16];
  std::snprintf(text, sizeof(text), "0x%08x", value);
  return text;
}

uint32_t read_be32(detail::ByteReader& reader, const std::string& what) {
  unsigned char bytes[4];
  reader.read_exact(bytes, 4, what);
  return (uint32_t{bytes[0]} << 24) | (uint32_t{bytes[1]} << 16) | (uint32_t{bytes[2]} << 8) | uint32_t{bytes[3]};
}

void check_magic(const detail::ByteReader& reader, uint32_t found, uint32_t expected, const char* kind) {
  if (found == expected) return;
  const char* hint = "";
  if (found == kImagesMagic) hint = " (that is an image file; were the image and label files swapped?)";
  if (found == kLabelsMagic) hint = " (that is a label file; were the image and label files swapped?)";
  if ((found >> 16) == 0x1f8b) hint = " (gzip data inside a file that did not decompress; is it compressed twice?)";
  LOCKSTEP_FAIL(reader.path(), ": bad IDX magic number ", hex(found), "; expected ", hex(expected), " for ", kind, hint);
}

// A plain file's size is known before anything is read: one shorter than its header says fails here, before
// the tensor for it is allocated (a corrupt count can ask for up to kMaxImageBytes). A gzip file's
// decompressed size is only known by reading it; read_exact reports those.
void check_plain_file_size(detail::ByteReader& reader, uint64_t declared_bytes, const std::string& what) {
  if (reader.compressed()) return;
  const uint64_t header = reader.offset();
  const uint64_t size = std::filesystem::file_size(reader.path());
  const uint64_t available = size > header ? size - header : 0;
  LOCKSTEP_CHECK(available >= declared_bytes, reader.path(),
                 ": truncated: file is shorter than its header says: expected ", declared_bytes, " bytes of ", what,
                 " after the ", header, "-byte header, found ", available, " (the file has ", size, " bytes)");
}

void check_no_trailing_bytes(detail::ByteReader& reader, const std::string& declared) {
  const size_t extra = reader.count_remaining();
  LOCKSTEP_CHECK(extra == 0, reader.path(), ": ", extra, " unexpected bytes after the ", declared,
                 " the header declares (is the header count wrong?)");
}

// Reads `bytes` bytes into a new uint8 tensor of `shape`. A plain file's size was checked against
// the header already; a gzip file's decompressed size is known only by reading it, so its data is
// read in 64 MiB pieces first and the tensor allocated after: a header that declares more than the
// file holds (up to kMaxImageBytes) then fails as truncated, naming the file, instead of asking for
// memory the data does not back (an allocator error that names nothing).
at::Tensor read_bytes(detail::ByteReader& reader, std::vector<int64_t> shape, uint64_t bytes, const std::string& what) {
  if (!reader.compressed()) {
    at::Tensor out = torch::empty(shape, torch::kUInt8);
    reader.read_exact(out.data_ptr<uint8_t>(), bytes, what);
    return out;
  }
  constexpr uint64_t kPiece = uint64_t{64} << 20;
  std::vector<std::vector<uint8_t>> pieces;
  for (uint64_t done = 0; done < bytes;) {
    const uint64_t n = std::min(kPiece, bytes - done);
    pieces.emplace_back(n);
    reader.read_exact(pieces.back().data(), n,
                      what + " (bytes " + std::to_string(done) + " to " + std::to_string(done + n) + " of " +
                          std::to_string(bytes) + ")");
    done += n;
  }
  at::Tensor out = torch::empty(shape, torch::kUInt8);
  uint8_t* destination = out.data_ptr<uint8_t>();
  for (const auto& piece : pieces) {
    std::memcpy(destination, piece.data(), piece.size());
    destination += piece.size();
  }
  return out;
}

}  // namespace

ImageData read_idx_files(const std::string& images_path, const std::string& labels_path, int64_t num_classes) {
  LOCKSTEP_CHECK(num_classes > 0 && num_classes <= 256, "IDX labels are bytes: num_classes must be in [1, 256], got ",
                 num_classes);
  detail::ByteReader images(images_path);
  check_magic(images, read_be32(images, "header (magic number)"), kImagesMagic, "images (uint8, 3 dimensions)");
  const uint32_t count = read_be32(images, "header (image count)");
  const uint32_t rows = read_be32(images, "header (rows)");
  const uint32_t cols = read_be32(images, "header (columns)");
  LOCKSTEP_CHECK(count > 0, images_path, ": header declares 0 images");
  LOCKSTEP_CHECK(rows > 0 && cols > 0 && rows <= 65536 && cols <= 65536, images_path, ": header declares ", rows, "x",
                 cols, " images; expected each side in [1, 65536]");
  const uint64_t pixel_bytes = uint64_t{count} * rows * cols;
  LOCKSTEP_CHECK(pixel_bytes <= kMaxImageBytes, images_path, ": header declares ", count, " images of ", rows, "x", cols,
                 " (", pixel_bytes, " bytes), more than the ", kMaxImageBytes, "-byte limit; is the header corrupt?");
  const std::string pixel_what =
      "pixel data (" + std::to_string(count) + " images of " + std::to_string(rows) + "x" + std::to_string(cols) + ")";
  check_plain_file_size(images, pixel_bytes, pixel_what);

  detail::ByteReader labels(labels_path);
  check_magic(labels, read_be32(labels, "header (magic number)"), kLabelsMagic, "labels (uint8, 1 dimension)");
  const uint32_t label_count = read_be32(labels, "header (label count)");
  LOCKSTEP_CHECK(label_count == count, "count mismatch: ", images_path, " declares ", count, " images but ",
                 labels_path, " declares ", label_count, " labels");
  const std::string label_what = "labels (" + std::to_string(count) + " bytes)";
  check_plain_file_size(labels, count, label_what);

  at::Tensor pixels = read_bytes(images, {int64_t{count}, 1, int64_t{rows}, int64_t{cols}}, pixel_bytes, pixel_what);
  check_no_trailing_bytes(images, std::to_string(count) + " images");

  at::Tensor raw_labels = read_bytes(labels, {int64_t{count}}, count, label_what);
  check_no_trailing_bytes(labels, std::to_string(count) + " labels");
  const uint8_t* label_bytes = raw_labels.data_ptr<uint8_t>();
  for (uint32_t i = 0; i < count; ++i) {
    LOCKSTEP_CHECK(label_bytes[i] < num_classes, labels_path, ": label ", int{label_bytes[i]}, " at index ", i,
                   " is out of range; expected 0..", num_classes - 1);
  }

  ImageData data;
  data.images = pixels;
  data.labels = raw_labels.to(torch::kLong);
  data.num_classes = num_classes;
  data.description = images_path;
  return data;
}

ImageData Mnist::read_split(const std::string& root, Split split, const std::string& name) {
  const std::string prefix = split == Split::Train ? "train" : "t10k";
  const std::string what = name + (split == Split::Train ? " train" : " test");
  LOCKSTEP_CHECK(!root.empty(), what, ": no data directory given (options.root is empty)");
  // Debian's package puts Fashion-MNIST in kFashionMnistRoot: say how to get it there.
  LOCKSTEP_CHECK(root != kFashionMnistRoot || std::filesystem::is_directory(root), what, ": data directory ", root,
                 " does not exist: install Debian's dataset-fashion-mnist package (apt-get install "
                 "dataset-fashion-mnist; ./scripts/install-deps.sh does), or point data.dir (options.root) at a "
                 "directory holding the four IDX files");
  const std::string images = detail::find_data_file(root, prefix + "-images-idx3-ubyte", what + " images");
  const std::string labels = detail::find_data_file(root, prefix + "-labels-idx1-ubyte", what + " labels");
  ImageData data = read_idx_files(images, labels, kMnistClasses);
  data.description = what + " (" + root + ")";
  return data;
}

namespace {
ImageData with_normalisation(ImageData data, double mean, double std) {
  data.mean = {mean};
  data.std = {std};
  return data;
}
}  // namespace

Mnist::Mnist(MnistOptions options)
    : ImageDataset(with_normalisation(read_split(options.root, options.split, "MNIST"), options.mean, options.std)) {}

FashionMnist::FashionMnist(FashionMnistOptions options)
    : Mnist(with_normalisation(read_split(options.root, options.split, "Fashion-MNIST"), options.mean, options.std)) {}

}  // namespace data
}  // namespace lockstep
