#pragma once
// MNIST and Fashion-MNIST: readers for the IDX files (LeCun et al.) straight from their .gz form, as
// Debian's dataset-fashion-mnist installs them, or from unpacked copies. LibTorch's own MNIST reader
// only reads unpacked files. Pixels stay uint8 in memory (see ImageDataset).

#include <string>

#include "lockstep/data/image_dataset.hpp"

namespace lockstep {
namespace data {

constexpr const char* kFashionMnistRoot = "/usr/share/datasets/fashion-mnist";
constexpr int64_t kMnistClasses = 10;

struct MnistOptions {
  // Directory holding train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and
  // t10k-labels-idx1-ubyte, each either gzip-compressed (name + ".gz", preferred) or plain.
  std::string root;
  Split split = Split::Train;
  // Normalisation of pixel/255; MNIST's training-set statistics.
  double mean = 0.1307;
  double std = 0.3081;
};

// Fashion-MNIST (Xiao et al. 2017) uses the same files and names; only the defaults differ.
struct FashionMnistOptions {
  std::string root = kFashionMnistRoot;
  Split split = Split::Train;
  double mean = 0.2860;
  double std = 0.3530;
};

// Reads one IDX image file (magic 0x00000803: uint8, [N, rows, cols]) and its label file (magic
// 0x00000801: uint8, [N]), checking magic numbers, dimensions, counts, truncation, trailing bytes and
// label range; every error names the file and what was expected and found. Returns images as
// [N, 1, rows, cols]; mean/std are left at 0/1 and description at the images path.
ImageData read_idx_files(const std::string& images_path, const std::string& labels_path,
                         int64_t num_classes = kMnistClasses);

class Mnist : public ImageDataset {
 public:
  explicit Mnist(MnistOptions options);

 protected:
  explicit Mnist(ImageData data) : ImageDataset(std::move(data)) {}
  // Finds the split's two files under `root` and reads them; `name` labels messages ("MNIST").
  static ImageData read_split(const std::string& root, Split split, const std::string& name);
};

class FashionMnist : public Mnist {
 public:
  explicit FashionMnist(FashionMnistOptions options = {});
};

}  // namespace data
}  // namespace lockstep
