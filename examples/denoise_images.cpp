// Trains a small convolutional denoiser with the DistributedTrainer: a regression task on real images,
// to show the trainer beyond classification (a loss and metrics other than cross entropy and accuracy,
// a data set of the program's own whose targets are images, any torch::nn::Module as the model).
//
//   mpirun -np 2 ./denoise_images --config configs/denoise_fashion_mnist.yaml
//   mpirun -np 2 ./denoise_images --config configs/denoise_fashion_mnist.yaml --set trainer.epochs=1
//
// Each input is a Fashion-MNIST image plus Gaussian noise (standard deviation kNoiseStd in normalised
// units); the target is the clean image. The noise is a function of (seed, epoch, image), so every rank
// and every run (a resumed one too) sees the same noisy image; training images get new noise each
// epoch, test images always the same. The config's trainer section names the loss (mse) and metrics
// (mse, mae); the model and its size are fixed here (a model section, or an enabled callback section,
// is refused). Rank 0 ends with
//   denoising: test mse 0.0375 against 0.2497 for the noisy input (6.7x lower)
// (configs/denoise_fashion_mnist.yaml at 2 ranks: 20000 images, 3 epochs, 1 minute on 2 cores).
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "lockstep/config/config.hpp"
#include "lockstep/core/error.hpp"
#include "lockstep/core/world.hpp"
#include "lockstep/runtime.hpp"
#include "lockstep/train/trainer.hpp"

namespace {

constexpr double kNoiseStd = 0.5;

// SplitMix64's mixer: a (seed, epoch, index) triple to an independent stream of 64-bit numbers.
uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Wraps an image data set: input = image + noise, target = image.
class NoisyImages : public lockstep::data::Dataset {
 public:
  NoisyImages(lockstep::data::DatasetPtr clean, uint64_t seed, bool fixed_noise)
      : clean_(std::move(clean)), seed_(seed), fixed_noise_(fixed_noise) {}

  size_t size() const override { return clean_->size(); }
  lockstep::data::DatasetInfo info() const override { return clean_->info(); }
  void set_epoch(int64_t epoch) override {
    clean_->set_epoch(epoch);  // augmentation, if any, moves both input and target: the noise is added after
    epoch_ = fixed_noise_ ? 0 : epoch;
  }
  std::string description() const override { return "noisy " + clean_->description(); }

  lockstep::data::Example get_batch(const std::vector<int64_t>& indices) const override {
    const lockstep::data::Example clean = clean_->get_batch(indices);
    at::Tensor noisy = clean.data.to(torch::kFloat).contiguous().clone();
    if (indices.empty()) return {noisy, clean.data};
    const int64_t per_image = noisy[0].numel();
    float* values = noisy.data_ptr<float>();
    for (size_t b = 0; b < indices.size(); ++b) {
      uint64_t state = mix(mix(seed_ ^ 0x6e6f697365ULL) + static_cast<uint64_t>(epoch_) * 0x9e3779b97f4a7c15ULL +
                           static_cast<uint64_t>(indices[b]));
      for (int64_t i = 0; i < per_image; i += 2) {  // Box-Muller: two normals from two uniforms
        state += 0x9e3779b97f4a7c15ULL;
        const double u1 = (static_cast<double>(mix(state) >> 11) + 1.0) * 0x1.0p-53;  // (0, 1]
        state += 0x9e3779b97f4a7c15ULL;
        const double u2 = static_cast<double>(mix(state) >> 11) * 0x1.0p-53;
        const double radius = kNoiseStd * std::sqrt(-2.0 * std::log(u1));
        float* image = values + static_cast<int64_t>(b) * per_image;
        image[i] += static_cast<float>(radius * std::cos(2 * M_PI * u2));
        if (i + 1 < per_image) image[i + 1] += static_cast<float>(radius * std::sin(2 * M_PI * u2));
      }
    }
    return {noisy, clean.data};
  }

 private:
  lockstep::data::DatasetPtr clean_;
  uint64_t seed_;
  bool fixed_noise_;
  int64_t epoch_ = 0;
};

// Predicts the noise and subtracts it (residual learning, as DnCNN does), with a small U-Net: two
// stride-2 levels down and up, each level's features joined to the way up, so the noise estimate keeps
// the full resolution that i.i.d. pixel noise needs.
struct DenoiserImpl : torch::nn::Module {
  explicit DenoiserImpl(int64_t channels, int64_t width = 32) {
    namespace nn = torch::nn;
    using C = nn::Conv2dOptions;
    using T = nn::ConvTranspose2dOptions;
    stem = register_module("stem", nn::Conv2d(C(channels, width, 3).padding(1)));
    down1 = register_module("down1", nn::Conv2d(C(width, width, 3).stride(2).padding(1)));
    down2 = register_module("down2", nn::Conv2d(C(width, 2 * width, 3).stride(2).padding(1)));
    up2 = register_module("up2", nn::ConvTranspose2d(T(2 * width, width, 4).stride(2).padding(1)));
    up1 = register_module("up1", nn::ConvTranspose2d(T(2 * width, width, 4).stride(2).padding(1)));
    out = register_module("out", nn::Conv2d(C(2 * width, channels, 3).padding(1)));
  }
  torch::Tensor forward(const torch::Tensor& noisy) {
    const torch::Tensor full = torch::relu(stem(noisy));   // 28 x 28
    const torch::Tensor half = torch::relu(down1(full));  // 14 x 14
    const torch::Tensor quarter = torch::relu(down2(half));  // 7 x 7
    const torch::Tensor back_half = torch::relu(up2(quarter));
    const torch::Tensor back_full = torch::relu(up1(torch::cat({back_half, half}, 1)));
    return noisy - out(torch::cat({back_full, full}, 1));
  }
  torch::nn::Conv2d stem{nullptr}, down1{nullptr}, down2{nullptr}, out{nullptr};
  torch::nn::ConvTranspose2d up2{nullptr}, up1{nullptr};
};
TORCH_MODULE(Denoiser);

// The noisy input's own mean squared error against the clean images: what doing nothing scores.
double noisy_input_mse(const lockstep::data::Dataset& set) {
  double squared = 0;
  int64_t count = 0;
  const auto n = static_cast<int64_t>(set.size());
  for (int64_t begin = 0; begin < n; begin += 1000) {
    std::vector<int64_t> indices;
    for (int64_t i = begin; i < std::min(n, begin + 1000); ++i) indices.push_back(i);
    const lockstep::data::Example batch = set.get_batch(indices);
    squared += (batch.data - batch.target).to(torch::kDouble).square().sum().item<double>();
    count += batch.target.numel();
  }
  return squared / static_cast<double>(count);
}

}  // namespace

int main(int argc, char** argv) {
  namespace config = lockstep::config;
  config::ProgramConfig program = config::program_config(argc, argv, "denoise_images");  // --config required
  if (program.exit_status) return *program.exit_status;
  config::ExperimentConfig& cfg = program.config;

  lockstep::Runtime runtime(argc, argv, cfg.runtime);
  config::check_same_on_all_ranks(cfg, *runtime.communicator());
  if (cfg.trainer.device == "auto") cfg.trainer.device = runtime.world().device.str();
  // A config this program cannot run: the message once (every rank decides alike), exit status 2.
  const auto refuse = [&runtime](const std::string& message) {
    if (runtime.rank() == 0) std::fprintf(stderr, "denoise_images: %s\n", message.c_str());
    return 2;
  };
  // The target is an image: a classification loss (cross_entropy, the trainer's default; bce_with_logits)
  // would train on numbers that mean nothing here.
  const std::string& loss = cfg.trainer.loss.name;
  if (!cfg.trainer.loss_fn && loss != "mse" && loss != "l1" && loss != "smooth_l1") {
    return refuse("trainer.loss.name is '" + loss +
                  "', but this program regresses images: set it to mse, l1 or smooth_l1");
  }
  // The metrics too: accuracy, macro_f1 and mean_iou fail on an image target at the first batch, and
  // binary_accuracy would report a number that means nothing here.
  std::string classification_metrics;
  for (const std::string& name : cfg.trainer.metrics) {
    if (name != "mse" && name != "rmse" && name != "mae") {
      classification_metrics += (classification_metrics.empty() ? "" : ", ") + name;
    }
  }
  if (!classification_metrics.empty()) {
    return refuse("trainer.metrics has " + classification_metrics +
                  ", but this program regresses images: use mse, rmse or mae");
  }
  // Its model is its own and it adds no callbacks: a section it would not read is an error, not a
  // run that silently ignores early stopping, pruning or another width.
  std::string unread;
  const auto note = [&unread](bool set, const char* key) {
    if (set) unread += std::string(unread.empty() ? "" : ", ") + key;
  };
  note(cfg.ema.enabled, "ema.enabled");
  note(cfg.early_stopping.enabled, "early_stopping.enabled");
  note(cfg.pruning.enabled, "pruning.enabled");
  note(cfg.quantization.enabled, "quantization.enabled");
  config::ExperimentConfig default_model = cfg;
  default_model.model = lockstep::models::ResNet18Options{};
  // What quantization.enabled sets (refused above); model.quantize_activations set by hand is a model key.
  default_model.model.quantize_activations = cfg.quantization.enabled && cfg.quantization.options.activations;
  note(config::to_yaml(default_model) != config::to_yaml(cfg), "model");
  if (!unread.empty()) {
    return refuse("this program builds its own model and adds no callbacks, so it does not read " + unread +
                  ": remove them from the config");
  }
  auto [clean_train, clean_test] = config::make_datasets(cfg.data, cfg.trainer.seed);
  auto train_set = std::make_shared<NoisyImages>(clean_train, cfg.trainer.seed, /*fixed_noise=*/false);
  auto test_set = std::make_shared<NoisyImages>(clean_test, cfg.trainer.seed, /*fixed_noise=*/true);

  torch::manual_seed(cfg.trainer.seed);
  Denoiser model(train_set->channels());
  auto optimizer = config::make_optimizer(cfg.optimizer, model->parameters(), runtime.communicator());
  const double baseline = noisy_input_mse(*test_set);
  if (runtime.rank() == 0) {
    std::printf("denoising %s (noise std %.2f): %zu train / %zu test images, %d ranks x %zu; loss %s\n",
                clean_train->description().c_str(), kNoiseStd, train_set->size(), test_set->size(), runtime.size(),
                cfg.trainer.batch_size,
                cfg.trainer.loss_fn ? "of the program's own" : lockstep::train::describe_loss(cfg.trainer.loss).c_str());
    std::fflush(stdout);
  }

  lockstep::train::DistributedTrainer trainer(model, optimizer, runtime.communicator(), cfg.trainer);
  const std::map<std::string, double> metrics = trainer.fit(train_set, test_set);
  if (const int signal = trainer.caught_signal()) return 128 + signal;  // checkpointed; end as asked
  if (runtime.rank() == 0) {
    const auto mse = metrics.find("test_mse");
    if (mse == metrics.end() && metrics.count("test_loss") == 0 && !trainer.stop_reason().empty()) {
      std::printf("denoising: no test_mse: the run stopped before this epoch's evaluation (%s)\n",
                  trainer.stop_reason().c_str());
    } else if (mse == metrics.end()) {
      std::printf("denoising: no test_mse (add mse to trainer.metrics)\n");
    } else {
      const std::string early = trainer.stop_reason().empty()
                                    ? ""
                                    : " after epoch " + std::to_string(static_cast<int64_t>(metrics.at("epoch"))) +
                                          " (stopped early: " + trainer.stop_reason() + ")";
      std::printf("denoising: test mse %.4f against %.4f for the noisy input (%.1fx lower)%s\n", mse->second, baseline,
                  baseline / mse->second, early.c_str());
    }
  }
  return 0;
}
