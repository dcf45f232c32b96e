#pragma once
// CIFAR-10 (Krizhevsky 2009), binary version: data_batch_1.bin .. data_batch_5.bin (train) and
// test_batch.bin (test), each a run of 3073-byte records (1 label byte, then 32x32 red, green and blue
// planes). Files may also be gzip-compressed (name + ".gz").

#include <cstdint>
#include <string>
#include <vector>

#include "lockstep/data/image_dataset.hpp"

namespace lockstep {
namespace data {

constexpr int64_t kCifar10Classes = 10;
constexpr int64_t kCifar10Side = 32;
constexpr int64_t kCifar10RecordBytes = 1 + 3 * kCifar10Side * kCifar10Side;

struct Cifar10Options {
  // Directory holding the .bin files, or its parent when the files sit in the archive's own
  // "cifar-10-batches-bin" folder.
  std::string root;
  Split split = Split::Train;
  // Per-channel (R, G, B) statistics of the training set's pixel/255.
  std::vector<double> mean{0.4914, 0.4822, 0.4465};
  std::vector<double> std{0.2470, 0.2435, 0.2616};
  // Records each file must hold: the data set's batch files hold 10000 each, so a file cut on a
  // record boundary (a copy that stopped early) is an error rather than a smaller data set. 0: any.
  int64_t records_per_file = 10000;
};

// Reads CIFAR-10 binary files in order, checking each is a non-empty whole number of records with
// labels in 0..9; errors name the file. Returns images as [N, 3, 32, 32], mean/std left at 0/1.
// With records_per_file > 0, each file must hold exactly that many records.
ImageData read_cifar10_files(const std::vector<std::string>& paths, int64_t records_per_file = 0);

class Cifar10 : public ImageDataset {
 public:
  explicit Cifar10(Cifar10Options options);
};

}  // namespace data
}  // namespace lockstep
