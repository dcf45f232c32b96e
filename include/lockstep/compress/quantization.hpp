#pragma once
// QuantizationAwareTraining: a trainer callback that trains (and evaluates) a model as its int8
// version will compute, during data-parallel training, and exports the int8 model at the end.
//
//   lockstep::compress::QuantizationOptions quant;
//   quant.begin_epoch = 8;                     // fine-tune the last epochs with fake quantization
//   quant.exclude = {"^fc\\."};              // keep the classifier in float
//   quant.export_path = "runs/x/model_int8.pt";
//   trainer.add_callback(std::make_shared<lockstep::compress::QuantizationAwareTraining>(quant));
//
// Weights (Note [Weights in place]): before each step's forward pass (and before each evaluation) the
// selected weights are replaced in place by their int8 values (compress/fake_quant.hpp: symmetric, per
// output channel); after backward the float weights come back and the optimizer updates them with the
// gradient taken at the int8 values (the straight-through estimator: nothing is clipped, so it is exact).
// The parameters stay the same leaf tensors, so DataParallel's hooks, buckets and the optimizer see
// nothing unusual, and any Conv/Linear model works unchanged.
//
// Activations (Note [Activation ranges]): a model places ActivationFakeQuant modules where its int8
// version requantizes (models::ResNet18Options::quantize_activations does it for ResNet-18). During
// training every rank records its batch's min and max at each point; after backward one all-reduce
// (MAX over [-min, max] of every point) gives the global batch's range, and every rank folds that into
// the point's moving-average range identically. So the ranges are those of the global batch, the same
// bitwise on every rank (checked at every epoch end), and a step's forward uses the ranges agreed after
// the previous step. From freeze_step on the ranges stay fixed.
//
// Every rank holds the same int8 model, and at on_train_end the model is left holding its int8 weight
// values (what export_int8 writes and the last evaluation measured). A second fit() with the same
// callback trains on from the float weights those values came from, where the model still holds them.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "lockstep/compress/fake_quant.hpp"
#include "lockstep/train/callback.hpp"

namespace torch::nn {
class Module;
}

namespace lockstep::compress {

struct QuantizationOptions {
  // Weights: one scale per output channel (true) or one per tensor.
  bool per_channel = true;
  // Fake-quantize the model's ActivationFakeQuant points. A model without any is an error while this
  // is true (a forgotten option must not silently give weight-only quantization).
  bool activations = true;
  // Fake quantization starts before the forward pass of optimizer step begin_step (the activation
  // ranges are observed from that step and used from the next); the steps before train in float.
  int64_t begin_step = 0;
  // The activation ranges stay fixed from this step on; -1 = never.
  int64_t freeze_step = -1;
  // Alternatively in epochs (fractions allowed), taking precedence when > 0: begin_epoch and
  // freeze_epoch times the steps per epoch. The step beside an epoch set must keep its default.
  double begin_epoch = 0.0;
  double freeze_epoch = 0.0;
  // Weight of a new batch range in the moving-average activation range (PyTorch's default 0.01).
  double averaging_constant = 0.01;
  // Which weights: as for pruning, ECMAScript regular expressions searched in parameter names; empty
  // include = the weights of every Conv1d/2d/3d and Linear module. A pattern that selects nothing is an
  // error. Biases, batch norms (parameters of fewer than 2 dimensions, even where a pattern matches
  // them) and excluded layers stay in float. A tensor registered under two names is one weight.
  std::vector<std::string> include;
  std::vector<std::string> exclude;
  // At on_train_end: print the per-layer table (rank 0), and when export_path is set, write the int8
  // model there (rank 0, atomically; see export_int8).
  bool print_table = true;
  std::string export_path;
};
// Throws naming the option when `options` are inconsistent.
void validate(const QuantizationOptions& options);

struct LayerQuantization {
  std::string name;  // parameter name, e.g. "layer1.0.conv1.weight"
  std::vector<int64_t> shape;
  double min_scale = 0.0;  // over the output channels
  double max_scale = 0.0;
  double sqnr_db = 0.0;  // float weight vs its int8 values
};

struct ActivationRange {
  std::string name;  // module name, e.g. "layer1.0.quant_relu1"
  double min = 0.0, max = 0.0, scale = 0.0;
  int64_t zero_point = 0;
  int64_t updates = 0;
};

class QuantizationAwareTraining final : public train::Callback {
 public:
  explicit QuantizationAwareTraining(QuantizationOptions options);

  void on_setup(train::TrainerContext& ctx) override;
  void on_train_begin(train::TrainerContext& ctx) override;
  void on_batch_begin(train::TrainerContext& ctx) override;
  void on_after_backward(train::TrainerContext& ctx) override;
  void on_evaluation_begin(train::TrainerContext& ctx) override;
  void on_evaluation_end(train::TrainerContext& ctx) override;
  void on_epoch_end(train::TrainerContext& ctx) override;
  void on_train_end(train::TrainerContext& ctx) override;

  std::string agreement() const override;
  // Note [Quantization in checkpoints]: the settings a checkpoint's weights and ranges were trained
  // under (per_channel, activations, averaging_constant, the resolved begin and freeze steps, the
  // layers and points); a resume under other settings is refused, naming the first that differs.
  std::string state_key() const override { return "quantization"; }
  std::string save_state() const override;
  void load_state(const std::string& state) override;
  const QuantizationOptions& options() const { return options_; }
  // The quantized weights' names and the activation points' module names, in model order.
  std::vector<std::string> layers() const;
  std::vector<std::string> activation_points() const;
  // Whether fake quantization is on (global_step >= begin step) and the ranges are frozen.
  bool active() const { return active_; }
  bool frozen() const { return frozen_; }
  // Per layer: scales and SQNR of the current float weights; per point: the current range.
  std::vector<LayerQuantization> report() const;
  std::vector<ActivationRange> ranges() const;

 private:
  struct Layer;
  void set_step_state(int64_t step);
  void resolve_steps(const train::TrainerContext& ctx);
  void quantize_weights();
  void restore_weights();
  void reduce_ranges(comm::Communicator& comm);
  void verify_ranges(comm::Communicator& comm) const;

  QuantizationOptions options_;
  std::vector<std::shared_ptr<Layer>> layers_;
  std::vector<std::pair<std::string, ActivationFakeQuant>> points_;
  int64_t begin_step_ = 0;
  int64_t freeze_step_ = -1;
  bool active_ = false;
  bool frozen_ = false;
  bool weights_quantized_ = false;
  bool left_at_int8_ = false;  // Note [A second fit after quantization]
};

// The int8 model file (Note [Int8 export]): a pickled dictionary (torch::pickle_save) with
//   "format": "lockstep-int8", "version": 1 (2 when "ties" is not empty),
//   "per_channel": bool,
//   "weights": {parameter name: int8 codes}, "scales": {parameter name: scale per channel or [1]},
//   "tensors": {name: float tensor} for every other parameter and buffer (biases, batch norm; not
//              pruning's masks, which the weights' zeros already hold),
//   "activations": {module name: [scale, zero_point, min, max]} for every ActivationFakeQuant point
//                  (none when `activations` is false: a weight-only model, whose points stayed the
//                  identity in training whatever ranges they hold from an earlier run),
//   "ties": {name: name it is stored under} for each further name of a tensor the model registers
//           under several (tied weights: stored once, int8 if any of its names is quantized),
//   "lockstep_checksum": "crc32 trailer": the file ends in a CRC-32 trailer that read_int8 checks
//           (Note [Checksummed files]; pickle_load and torch.load skip it).
// Weights not listed in `quantized` are stored in float. Written atomically. Returns the file's size.
struct Int8ExportReport {
  int64_t quantized_weights = 0;   // parameters stored as int8
  int64_t float_parameters = 0;    // parameters and buffers stored in float
  int64_t bytes = 0;               // the file's size
  int64_t float_bytes = 0;         // what the same tensors take in float (the file without int8)
};
Int8ExportReport export_int8(torch::nn::Module& model, const std::vector<std::string>& quantized, bool per_channel,
                             const std::string& path, bool activations = true);
// An export_int8 file's content (on the CPU).
struct Int8Model {
  bool per_channel = true;
  std::map<std::string, QuantizedWeight> weights;   // parameter name -> int8 codes and scales
  std::map<std::string, at::Tensor> tensors;        // every other parameter and buffer, in float
  std::map<std::string, ActivationQParams> activations;  // ActivationFakeQuant module name -> uint8 parameters
  // A tensor the model registers under several names (tied weights) is stored once: each further
  // name -> the name in `weights` or `tensors` that holds it.
  std::map<std::string, std::string> ties;
};
// Reads and checks an export_int8 file; errors name the file and what is wrong with it.
Int8Model read_int8(const std::string& path);
// Reads an export_int8 file into `model` (the same architecture): the int8 weights dequantized, the
// rest copied, the activation points' ranges set and the fake quantization of those the file lists
// enabled (none in a weight-only export: those stay the identity, as in its training), so the model
// computes what the exported int8 model computes. Every parameter and buffer of the model (the points'
// ranges included) must be in the file and every entry of the file in the model, with the same shapes;
// errors name the entry.
void load_int8(torch::nn::Module& model, const std::string& path);

// The report's text table: one row per quantized weight (name, shape, its scales' range, the
// signal-to-quantization-noise ratio in dB), then one per activation point (its range, scale and zero
// point); what the callback prints at the end of training.
std::string format_quantization_table(const std::vector<LayerQuantization>& layers,
                                      const std::vector<ActivationRange>& ranges);

}  // namespace lockstep::compress
