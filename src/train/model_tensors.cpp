#include "lockstep/train/model_tensors.hpp"

#include <torch/nn/module.h>
#include <torch/utils.h>

#include <set>

#include "lockstep/core/error.hpp"

namespace lockstep::train {

std::vector<at::Tensor> parameters_and_buffers(const torch::nn::Module& model) {
  std::vector<at::Tensor> out = model.parameters();
  for (auto& buffer : model.buffers()) out.push_back(std::move(buffer));
  return out;
}

namespace {
// `model` and its submodules (include_self would need `model` to be held by a shared_ptr).
std::vector<const torch::nn::Module*> all_modules(const torch::nn::Module& model) {
  std::vector<const torch::nn::Module*> out{&model};
  for (const auto& module : model.modules(/*include_self=*/false)) out.push_back(module.get());
  return out;
}
}  // namespace

void notify_buffers_replaced(torch::nn::Module& model) {
  for (const torch::nn::Module* module : all_modules(model)) {
    // The modules are the model's own, not const objects: only the traversal is const.
    if (auto* state = dynamic_cast<BufferState*>(const_cast<torch::nn::Module*>(module))) state->buffers_replaced();
  }
}

std::vector<bool> state_buffer_mask(const torch::nn::Module& model) {
  std::set<const void*> state;
  for (const torch::nn::Module* module : all_modules(model)) {
    if (dynamic_cast<const BufferState*>(module) == nullptr) continue;
    for (const auto& buffer : module->buffers(/*recurse=*/false)) state.insert(buffer.unsafeGetTensorImpl());
  }
  std::vector<bool> mask;
  for (const auto& tensor : parameters_and_buffers(model)) mask.push_back(state.count(tensor.unsafeGetTensorImpl()) > 0);
  return mask;
}

std::size_t to_channels_last(torch::nn::Module& model) {
  torch::NoGradGuard no_grad;
  std::size_t converted = 0;
  for (at::Tensor tensor : parameters_and_buffers(model)) {
    if (!tensor.defined() || tensor.dim() != 4) continue;
    // contiguous(ChannelsLast) is the tensor itself where its memory is already in that order.
    tensor.set_data(tensor.contiguous(at::MemoryFormat::ChannelsLast));
    ++converted;
  }
  return converted;
}

namespace {

// Measured with LibTorch 1.13: the names for which Module::save writes a file that InputArchive cannot
// load (TorchScript's lexer keywords, and the two attributes its module code declares itself).
// Python keywords that TorchScript does not reserve (lambda, try, yield, async, ...) load fine.
const std::set<std::string>& unreadable_names() {
  static const std::set<std::string> names = {
      "False", "None",   "True",   "and",    "as",    "assert", "break", "class",          "continue",
      "def",   "del",    "elif",   "else",   "for",   "global", "if",    "import",         "in",
      "is",    "not",    "or",     "pass",   "raise", "return", "while", "with",           "__parameters__",
      "__buffers__"};
  return names;
}

void check_names(const torch::nn::Module& module, const std::string& path, const std::string& what) {
  auto check = [&](const std::string& name, const char* kind) {
    LOCKSTEP_CHECK(unreadable_names().count(name) == 0, what, ": the model's ", kind, " '",
                   path.empty() ? name : path + "." + name, "' is named '", name,
                   "', a TorchScript keyword: LibTorch saves such a model but cannot load the file back, so every "
                   "checkpoint of it would be lost; register it under another name (Note [Names a checkpoint "
                   "cannot hold])");
  };
  for (const auto& item : module.named_parameters(/*recurse=*/false)) check(item.key(), "parameter");
  for (const auto& item : module.named_buffers(/*recurse=*/false)) check(item.key(), "buffer");
  for (const auto& item : module.named_children()) {
    check(item.key(), "submodule");
    check_names(*item.value(), path.empty() ? item.key() : path + "." + item.key(), what);
  }
}

}  // namespace

void check_names_readable(const torch::nn::Module& model, const std::string& what) { check_names(model, "", what); }

}  // namespace lockstep::train
