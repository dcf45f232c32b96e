#include "lockstep/train/foreach_sgd.hpp"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <memory>
#include <vector>

#include "core/torch_compat.hpp"
#include "lockstep/core/error.hpp"

namespace lockstep::train {

// The same steps as torch::optim::SGD::step, per element and in the same order (so on the CPU, where
// the foreach kernels loop over the tensors, the results are bitwise those of SGD):
//   d = grad (+ weight_decay * p);  buf = d on the first step, else buf * momentum + (1 - dampening) * d;
//   d = nesterov ? d + momentum * buf : buf;  p -= lr * d.
torch::Tensor ForeachSGD::step(LossClosure closure) {
  at::NoGradGuard no_grad;
  torch::Tensor loss;
  if (closure != nullptr) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }
  for (auto& group : param_groups_) {
    const auto& options = static_cast<const torch::optim::SGDOptions&>(group.options());
    std::vector<at::Tensor> owners, params, grads;
    for (const at::Tensor& p : group.params()) {
      if (!p.grad().defined()) continue;
      LOCKSTEP_CHECK(!p.grad().is_sparse(), "ForeachSGD: sparse gradients are not supported (use torch::optim::SGD)");
      owners.push_back(p);
      params.push_back(p.data());
      grads.push_back(p.grad().data());
    }
    if (params.empty()) continue;
    std::vector<at::Tensor> steps = options.weight_decay() != 0 ? at::_foreach_add(grads, params, options.weight_decay())
                                                                : grads;
    const double momentum = options.momentum();
    if (momentum != 0) {
      std::vector<at::Tensor> buffers(params.size()), old_buffers, old_steps;
      for (std::size_t i = 0; i < params.size(); ++i) {
        const auto key = compat::optimizer_state_key<std::decay_t<decltype(state_)>>(owners[i]);
        auto found = state_.find(key);
        if (found == state_.end()) {
          buffers[i] = torch::clone(steps[i]).detach();
          auto state = std::make_unique<torch::optim::SGDParamState>();
          state->momentum_buffer(buffers[i]);
          state_[key] = std::move(state);
        } else {
          buffers[i] = static_cast<torch::optim::SGDParamState&>(*found->second).momentum_buffer();
          old_buffers.push_back(buffers[i]);
          old_steps.push_back(steps[i]);
        }
      }
      if (!old_buffers.empty()) {
        at::_foreach_mul_(old_buffers, momentum);
        at::_foreach_add_(old_buffers, old_steps, 1 - options.dampening());
      }
      steps = options.nesterov() ? at::_foreach_add(steps, buffers, momentum) : buffers;
    }
    at::_foreach_add_(params, steps, -1 * options.lr());
  }
  return loss;
}

}  // namespace lockstep::train
