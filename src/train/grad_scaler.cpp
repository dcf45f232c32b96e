#include "lockstep/train/grad_scaler.hpp"

#include <ATen/ATen.h>

#include <cmath>
#include <sstream>

#include "core/unique_tensors.hpp"
#include "lockstep/core/error.hpp"

namespace lockstep::train {

GradScaler::GradScaler(GradScalerOptions options) : options_(options), scale_(options.init_scale) {
  LOCKSTEP_CHECK(options_.init_scale > 0 && std::isfinite(options_.init_scale),
                 "GradScalerOptions::init_scale must be positive and finite, got ", options_.init_scale);
  LOCKSTEP_CHECK(options_.growth_factor > 1, "GradScalerOptions::growth_factor must be > 1, got ",
                 options_.growth_factor);
  LOCKSTEP_CHECK(options_.backoff_factor > 0 && options_.backoff_factor < 1,
                 "GradScalerOptions::backoff_factor must be in (0, 1), got ", options_.backoff_factor);
  LOCKSTEP_CHECK(options_.growth_interval > 0, "GradScalerOptions::growth_interval must be positive, got ",
                 options_.growth_interval);
}

at::Tensor GradScaler::scale(const at::Tensor& loss) const { return loss * scale_; }

bool GradScaler::unscale(const std::vector<at::Tensor>& parameters, comm::Communicator& comm) {
  const double inverse = 1.0 / scale_;
  std::vector<at::Tensor> grads;
  grads.reserve(parameters.size());
  bool one_gpu = true;
  // A tied weight (listed once per name by Module::parameters()) is unscaled once.
  for (const at::Tensor& parameter : detail::unique_tensors(parameters)) {
    const at::Tensor& grad = parameter.grad();
    if (!grad.defined()) continue;
    one_gpu = one_gpu && grad.is_cuda() && (grads.empty() || grad.device() == grads.front().device());
    grads.push_back(grad);
  }
  at::Tensor flag;
  if (!grads.empty() && one_gpu) {
    // PyTorch's own kernel for this (CUDA only in LibTorch 1.13): one multi-tensor launch multiplies
    // every gradient by the inverse scale and sets `flag` to 1 where any element is inf or nan,
    // instead of five launches per gradient.
    flag = at::zeros({1}, grads.front().options().dtype(at::kFloat));
    const at::Tensor inverse_scale = at::full({1}, inverse, flag.options());
    at::_amp_foreach_non_finite_check_and_unscale_(grads, flag, inverse_scale);
  } else {
    at::Tensor found;  // one flag per device would do; all parameters share one device in the trainer
    for (const at::Tensor& grad : grads) {
      grad.mul_(inverse);
      // Non-finite stays non-finite through the division, so checking afterwards sees the same.
      at::Tensor bad = at::logical_not(at::isfinite(grad)).any();
      found = found.defined() ? at::logical_or(found, bad) : bad;
    }
    flag = found.defined() ? found.to(at::kFloat).reshape({1}) : at::zeros({1}, at::kFloat);
  }
  // On the parameters' device, whatever this rank's gradients: a rank without any would otherwise
  // send a CPU flag (through MPI staging) while the others' CUDA flags go through NCCL, and the two
  // never meet.
  if (!parameters.empty() && flag.device() != parameters.front().device()) flag = flag.to(parameters.front().device());
  const comm::WorkPtr work = comm.allreduce(flag, {comm::ReduceOp::Max});
  work->wait();
  const bool found = flag.item<float>() > 0.0f;
  // A GPU wait() returns at once, ordering the stream only; after the read the collective has ended,
  // and a second wait() raises its error if the communicator failed it (the flag is then not a result).
  work->wait();
  return found;
}

void GradScaler::update(bool found_inf) {
  if (found_inf) {
    scale_ *= options_.backoff_factor;
    growth_tracker_ = 0;
    ++skipped_steps_;
    return;
  }
  if (++growth_tracker_ >= options_.growth_interval) {
    const double grown = scale_ * options_.growth_factor;
    if (std::isfinite(grown)) scale_ = grown;
    growth_tracker_ = 0;
  }
}

void GradScaler::on_evaluation_end(TrainerContext& ctx) {
  ctx.metrics["loss_scale"] = scale_;
  ctx.metrics["skipped_steps"] = static_cast<double>(skipped_steps_);
}

std::string GradScaler::save_state() const {
  std::ostringstream out;
  out.precision(17);
  out << scale_ << ' ' << growth_tracker_ << ' ' << skipped_steps_;
  return out.str();
}

void GradScaler::load_state(const std::string& state) {
  std::istringstream in(state);
  double scale = 0;
  int64_t tracker = 0, skipped = 0;
  in >> scale >> tracker >> skipped;
  LOCKSTEP_CHECK(!in.fail() && scale > 0, "GradScaler: cannot read the checkpointed state '", state, "'");
  scale_ = scale;
  growth_tracker_ = tracker;
  skipped_steps_ = skipped;
}

}  // namespace lockstep::train
