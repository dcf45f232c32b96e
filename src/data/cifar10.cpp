#include "lockstep/data/cifar10.hpp"

#include <torch/types.h>

#include <cstring>
#include <filesystem>

#include "data/byte_reader.hpp"
#include "lockstep/core/error.hpp"

namespace lockstep {
namespace data {

ImageData read_cifar10_files(const std::vector<std::string>& paths, int64_t records_per_file) {
  LOCKSTEP_CHECK(!paths.empty(), "CIFAR-10: no files to read");
  std::vector<std::vector<unsigned char>> contents;
  int64_t total = 0;
  for (const std::string& path : paths) {
    detail::ByteReader reader(path);
    // A file of another size is refused below; one larger than expected (another data set, a gzip bomb)
    // without being inflated whole first.
    const int64_t expected = records_per_file > 0 ? records_per_file * kCifar10RecordBytes : -1;
    std::vector<unsigned char> bytes =
        expected > 0 ? reader.read_to_end(static_cast<size_t>(expected)) : reader.read_to_end();
    LOCKSTEP_CHECK(expected <= 0 || static_cast<int64_t>(bytes.size()) <= expected, path, ": more than ",
                   records_per_file, " records (over ", expected, " bytes), but each CIFAR-10 batch file holds ",
                   records_per_file,
                   " (another data set? data.records_per_file: 0, or Cifar10Options::records_per_file = 0 in code, "
                   "accepts any number)");
    const auto size = static_cast<int64_t>(bytes.size());
    LOCKSTEP_CHECK(size > 0, path, ": empty file; expected ", kCifar10RecordBytes, "-byte records");
    LOCKSTEP_CHECK(size % kCifar10RecordBytes == 0, path, ": truncated or corrupt: ", size,
                   " bytes is not a whole number of ", kCifar10RecordBytes, "-byte records (",
                   size / kCifar10RecordBytes, " records and ", size % kCifar10RecordBytes, " bytes left over)");
    const int64_t records = size / kCifar10RecordBytes;
    LOCKSTEP_CHECK(records_per_file <= 0 || records == records_per_file, path, ": ", records,
                   " records, but each CIFAR-10 batch file holds ", records_per_file,
                   " (a copy cut short? Fetch the file again; data.records_per_file: 0, or Cifar10Options::records_per_file = 0 in code, accepts "
                   "any number)");
    for (int64_t r = 0; r < records; ++r) {
      const int label = bytes[r * kCifar10RecordBytes];
      LOCKSTEP_CHECK(label < kCifar10Classes, path, ": record ", r, " has label ", label, "; expected 0..",
                     kCifar10Classes - 1, " (is this the CIFAR-100 format, with 2 label bytes?)");
    }
    total += records;
    contents.push_back(std::move(bytes));
  }

  constexpr int64_t kPixels = kCifar10RecordBytes - 1;
  at::Tensor images = torch::empty({total, 3, kCifar10Side, kCifar10Side}, torch::kUInt8);
  at::Tensor labels = torch::empty({total}, torch::kLong);
  uint8_t* out = images.data_ptr<uint8_t>();
  int64_t* out_labels = labels.data_ptr<int64_t>();
  int64_t n = 0;
  for (const auto& bytes : contents) {
    const int64_t records = static_cast<int64_t>(bytes.size()) / kCifar10RecordBytes;
    for (int64_t r = 0; r < records; ++r, ++n) {
      const unsigned char* record = bytes.data() + r * kCifar10RecordBytes;
      out_labels[n] = record[0];
      // The record's planes are already channel-major (R, G, B, each row-major): the [C, H, W] layout.
      std::memcpy(out + n * kPixels, record + 1, kPixels);
    }
  }
  ImageData data;
  data.images = images;
  data.labels = labels;
  data.num_classes = kCifar10Classes;
  data.description = paths.front();
  return data;
}

namespace {
ImageData read_split(const Cifar10Options& options) {
  const std::string what = options.split == Split::Train ? "CIFAR-10 train" : "CIFAR-10 test";
  LOCKSTEP_CHECK(!options.root.empty(), what, ": no data directory given (options.root is empty)");
  std::string root = options.root;
  const auto nested = std::filesystem::path(root) / "cifar-10-batches-bin";
  if (std::filesystem::is_directory(nested)) root = nested.string();
  std::vector<std::string> paths;
  if (options.split == Split::Train) {
    for (int i = 1; i <= 5; ++i) {
      const std::string name = "data_batch_" + std::to_string(i) + ".bin";
      paths.push_back(detail::find_data_file(root, name, what + " batch " + std::to_string(i)));
    }
  } else {
    paths.push_back(detail::find_data_file(root, "test_batch.bin", what));
  }
  ImageData data = read_cifar10_files(paths, options.records_per_file);
  data.mean = options.mean;
  data.std = options.std;
  data.description = what + " (" + root + ")";
  return data;
}
}  // namespace

Cifar10::Cifar10(Cifar10Options options) : ImageDataset(read_split(options)) {}

}  // namespace data
}  // namespace lockstep
