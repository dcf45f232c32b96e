#include "compress/selection.hpp"

#include <torch/torch.h>

#include <regex>
#include <set>
#include <unordered_set>

#include "lockstep/core/error.hpp"

namespace lockstep::compress {
namespace {

std::regex compile(const std::string& pattern, const std::string& who, const char* option) {
  try {
    return std::regex(pattern, std::regex::ECMAScript);
  } catch (const std::regex_error& e) {
    LOCKSTEP_FAIL(who, " option '", option, "': '", pattern, "' is not a valid regular expression: ", e.what());
  }
}

bool is_default_layer(torch::nn::Module* m) {
  return dynamic_cast<torch::nn::Conv1dImpl*>(m) != nullptr || dynamic_cast<torch::nn::Conv2dImpl*>(m) != nullptr ||
         dynamic_cast<torch::nn::Conv3dImpl*>(m) != nullptr || dynamic_cast<torch::nn::LinearImpl*>(m) != nullptr;
}

}  // namespace

std::vector<std::pair<std::string, at::Tensor>> select_weights(torch::nn::Module& model,
                                                               const std::vector<std::string>& include_patterns,
                                                               const std::vector<std::string>& exclude_patterns,
                                                               const std::string& who) {
  std::set<std::string> defaults;
  for (const auto& item : model.named_modules("", /*include_self=*/true)) {
    if (is_default_layer(item.value().get())) defaults.insert(item.key().empty() ? "weight" : item.key() + ".weight");
  }
  std::vector<std::regex> include, exclude;
  for (const auto& p : include_patterns) include.push_back(compile(p, who, "include"));
  for (const auto& p : exclude_patterns) exclude.push_back(compile(p, who, "exclude"));
  std::vector<bool> include_used(include.size(), false), exclude_used(exclude.size(), false);

  std::vector<std::pair<std::string, at::Tensor>> selected_weights;
  // A tensor registered under two names (tied weights) is one weight, under its first name: pruned or
  // quantized twice, its second copy would hold the first's result (QAT would restore the int8 values
  // as the float ones after every step).
  std::unordered_set<const void*> taken;
  for (const auto& item : model.named_parameters(/*recurse=*/true)) {
    const std::string& name = item.key();
    bool selected = include.empty() ? defaults.count(name) > 0 : false;
    for (size_t i = 0; i < include.size(); ++i) {
      if (std::regex_search(name, include[i])) {
        include_used[i] = true;
        selected = true;
      }
    }
    for (size_t i = 0; i < exclude.size(); ++i) {
      if (std::regex_search(name, exclude[i])) {
        exclude_used[i] = true;
        selected = false;
      }
    }
    if (!selected || !taken.insert(item.value().unsafeGetTensorImpl()).second) continue;
    LOCKSTEP_CHECK(item.value().is_floating_point(), who, ": parameter '", name, "' is not floating point");
    selected_weights.emplace_back(name, item.value());
  }
  for (size_t i = 0; i < include.size(); ++i) {
    LOCKSTEP_CHECK(include_used[i], who, ": include pattern '", include_patterns[i], "' matches no parameter of the model");
  }
  for (size_t i = 0; i < exclude.size(); ++i) {
    LOCKSTEP_CHECK(exclude_used[i], who, ": exclude pattern '", exclude_patterns[i], "' matches no parameter of the model");
  }
  return selected_weights;
}

}  // namespace lockstep::compress
