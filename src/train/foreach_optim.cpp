#include "lockstep/train/foreach_optim.hpp"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cmath>
#include <map>
#include <memory>
#include <vector>

#include "core/torch_compat.hpp"
#include "lockstep/core/error.hpp"

namespace lockstep::train {

namespace {

// The closure's loss, computed with gradients on (as LibTorch's optimizers do); undefined without one.
torch::Tensor evaluate(const torch::optim::Optimizer::LossClosure& closure) {
  if (closure == nullptr) return {};
  at::AutoGradMode enable_grad(true);
  return closure();
}

// What step() needs of each parameter with a gradient: the parameter (the state's key), its data and
// its gradient's data.
struct Stepped {
  std::vector<at::Tensor> owners, params, grads;
};

Stepped with_gradients(const torch::optim::OptimizerParamGroup& group, const char* optimizer) {
  Stepped out;
  for (const at::Tensor& p : group.params()) {
    if (!p.grad().defined()) continue;
    LOCKSTEP_CHECK(!p.grad().is_sparse(), optimizer, ": sparse gradients are not supported (use LibTorch's own)");
    out.owners.push_back(p);
    out.params.push_back(p.data());
    out.grads.push_back(p.grad().data());
  }
  return out;
}

// One foreach Adam update (Adam's and AdamW's shared part) over parameters whose states hold the same
// step count, so that the bias corrections are scalars:
//   m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2;  (amsgrad: vmax = max(vmax, v), v = vmax)
//   p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
template <class State, class Options>
void adam_update(const Options& options, int64_t step, std::vector<at::Tensor>& params,
                 const std::vector<at::Tensor>& grads, const std::vector<State*>& states) {
  const double beta1 = std::get<0>(options.betas()), beta2 = std::get<1>(options.betas());
  const double bias_correction1 = 1 - std::pow(beta1, step);
  const double bias_correction2 = 1 - std::pow(beta2, step);
  std::vector<at::Tensor> exp_avgs, exp_avg_sqs;
  for (State* state : states) {
    exp_avgs.push_back(state->exp_avg());
    exp_avg_sqs.push_back(state->exp_avg_sq());
  }
  at::_foreach_mul_(exp_avgs, beta1);
  at::_foreach_add_(exp_avgs, grads, 1 - beta1);
  at::_foreach_mul_(exp_avg_sqs, beta2);
  at::_foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2);
  std::vector<at::Tensor> second = exp_avg_sqs;
  if (options.amsgrad()) {
    for (std::size_t i = 0; i < states.size(); ++i) {
      at::Tensor& running_max = states[i]->max_exp_avg_sq();
      at::max_out(running_max, exp_avg_sqs[i], running_max);
      second[i] = running_max;
    }
  }
  std::vector<at::Tensor> denominators = at::_foreach_sqrt(second);
  at::_foreach_div_(denominators, std::sqrt(bias_correction2));
  at::_foreach_add_(denominators, options.eps());
  at::_foreach_addcdiv_(params, exp_avgs, denominators, -(options.lr() / bias_correction1));
}

// Adam and AdamW: the state made on a parameter's first step as LibTorch makes it, the step counts
// advanced, and the update run once per distinct step count (normally one).
template <class State, class Options, class StateMap>
void adam_step(const Options& options, Stepped& s, const std::vector<at::Tensor>& grads, StateMap& state_map) {
  std::map<int64_t, std::vector<std::size_t>> by_step;
  std::vector<State*> states(s.params.size());
  for (std::size_t i = 0; i < s.params.size(); ++i) {
    const auto key = compat::optimizer_state_key<StateMap>(s.owners[i]);
    auto found = state_map.find(key);
    if (found == state_map.end()) {
      auto state = std::make_unique<State>();
      state->step(0);
      state->exp_avg(at::zeros_like(s.owners[i], at::MemoryFormat::Preserve));
      state->exp_avg_sq(at::zeros_like(s.owners[i], at::MemoryFormat::Preserve));
      if (options.amsgrad()) state->max_exp_avg_sq(at::zeros_like(s.owners[i], at::MemoryFormat::Preserve));
      found = state_map.emplace(key, std::move(state)).first;
    }
    states[i] = static_cast<State*>(found->second.get());
    states[i]->step(states[i]->step() + 1);
    by_step[states[i]->step()].push_back(i);
  }
  for (const auto& [step, members] : by_step) {
    std::vector<at::Tensor> params, step_grads;
    std::vector<State*> step_states;
    for (std::size_t i : members) {
      params.push_back(s.params[i]);
      step_grads.push_back(grads[i]);
      step_states.push_back(states[i]);
    }
    adam_update(options, step, params, step_grads, step_states);
  }
}

}  // namespace

// The same steps as torch::optim::SGD::step, per element and in the same order (so on the CPU, where
// the foreach kernels loop over the tensors, the results are bitwise those of SGD):
//   d = grad (+ weight_decay * p);  buf = d on the first step, else buf * momentum + (1 - dampening) * d;
//   d = nesterov ? d + momentum * buf : buf;  p -= lr * d.
torch::Tensor ForeachSGD::step(LossClosure closure) {
  at::NoGradGuard no_grad;
  const torch::Tensor loss = evaluate(closure);
  for (auto& group : param_groups_) {
    const auto& options = static_cast<const torch::optim::SGDOptions&>(group.options());
    Stepped stepped = with_gradients(group, "ForeachSGD");
    std::vector<at::Tensor>& owners = stepped.owners;
    std::vector<at::Tensor>& params = stepped.params;
    std::vector<at::Tensor>& grads = stepped.grads;
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
          buffers[i] = at::clone(steps[i]).detach();
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

// torch::optim::Adam::step per element: g = grad (+ weight_decay * p), then the update above.
torch::Tensor ForeachAdam::step(LossClosure closure) {
  at::NoGradGuard no_grad;
  const torch::Tensor loss = evaluate(closure);
  for (auto& group : param_groups_) {
    const auto& options = static_cast<const torch::optim::AdamOptions&>(group.options());
    Stepped stepped = with_gradients(group, "ForeachAdam");
    if (stepped.params.empty()) continue;
    const std::vector<at::Tensor> grads = options.weight_decay() != 0
                                              ? at::_foreach_add(stepped.grads, stepped.params, options.weight_decay())
                                              : stepped.grads;
    adam_step<torch::optim::AdamParamState>(options, stepped, grads, state_);
  }
  return loss;
}

// torch::optim::AdamW::step per element: p *= 1 - lr * weight_decay (decoupled), then the update above.
torch::Tensor ForeachAdamW::step(LossClosure closure) {
  at::NoGradGuard no_grad;
  const torch::Tensor loss = evaluate(closure);
  for (auto& group : param_groups_) {
    const auto& options = static_cast<const torch::optim::AdamWOptions&>(group.options());
    Stepped stepped = with_gradients(group, "ForeachAdamW");
    if (stepped.params.empty()) continue;
    if (options.weight_decay() != 0) at::_foreach_mul_(stepped.params, 1 - options.lr() * options.weight_decay());
    adam_step<torch::optim::AdamWParamState>(options, stepped, stepped.grads, state_);
  }
  return loss;
}

}  // namespace lockstep::train
