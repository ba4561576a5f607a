#pragma once
// Optimizer update math: the one definition of the SGD and Adam/AdamW updates, used by the CPU
// and CUDA kernels.
//
// [note: rounding order]
// The element updates follow the order of operations of torch's single-tensor (for-loop) SGD and
// Adam, and the per-tensor scalars (bias corrections, step size) are computed in double from the
// double lr, as torch computes them from Python floats. So a float64 run agrees with torch.optim to
// a few ulps per step, and a float32 run to float32 rounding.

#include <cmath>
#include <cstdint>

#include "macros.h"
#include "schedule_math.h"

namespace fusedlr {

// Per-group hyperparameters in the `hyper` argument of the ops, kCount doubles per group
// (fusedlr/optim.py, `_group_hyper`, builds them in this order).
namespace sgd_slot { enum : int { kLr, kMomentum, kDampening, kWeightDecay, kNesterov, kMaximize, kCount }; }
namespace adam_slot { enum : int { kLr, kBeta1, kBeta2, kEps, kWeightDecay, kAmsgrad, kMaximize, kDecoupled, kCount }; }

// Square root in the math type: the float overload (unqualified sqrt on a float is the double one).
FUSEDLR_HD float sqrt_of(float x) { return sqrtf(x); }
FUSEDLR_HD double sqrt_of(double x) { return sqrt(x); }

// torch's lerp: exact at both ends, whichever side of 1/2 the weight is. `small_weight` is
// |weight| < 1/2, decided once per tensor: a loop-invariant flag lets the compiler split the loop
// in two vectorized ones, where a per-element test made it blend both forms.
template <typename T>
FUSEDLR_HD T lerp(T start, T end, T weight, bool small_weight) {
  return small_weight ? start + weight * (end - start) : end - (end - start) * (T(1) - weight);
}

// ---------------------------------------------------------------------------------------------
// What a step does to every gradient before the update

// [note: gradient adjustments]
// As torch's GradScaler + clip_grad_norm_ + step: the gradient is divided by the AMP loss scale
// (ops.cpp, [note: amp]), then multiplied by the clipping factor, then negated when maximizing.
// The global L2 norm is taken over the unscaled gradients of every parameter the step updates, its
// sum of squares accumulated in double (torch's clip_grad_norm_ accumulates in the gradients'
// dtype). A step whose norm is not finite is skipped when the optimizer asks for that.
struct GradAdjust {
  double scale = 1;  // the AMP loss scale the gradients carry
  double clip = 1;   // the clipping factor
};

// The global L2 norm of the unscaled gradients, from the sum of squares of the scaled ones.
FUSEDLR_HD double grad_norm_of(double sum_of_squares, double grad_scale) { return sqrt(sum_of_squares) / grad_scale; }

// clip_grad_norm_'s factor max_norm / (norm + 1e-6), at most 1. A NaN norm gives NaN, as in torch;
// an infinite max_norm never clips a finite norm.
FUSEDLR_HD double clip_factor(double norm, double max_norm) {
  const double factor = max_norm / (norm + 1e-6);
  return factor > 1.0 ? 1.0 : factor;
}

// Whether a step is skipped: GradScaler found an inf or NaN, or the optimizer skips non-finite
// norms and this one is not finite (x - x is 0 for finite x only).
FUSEDLR_HD bool step_skipped(bool found_inf, bool skip_nonfinite, double norm) {
  return found_inf || (skip_nonfinite && !(norm - norm == 0));
}

// ---------------------------------------------------------------------------------------------
// SGD

struct SgdScalars {
  double lr;
  double momentum;  // 0: no momentum buffer is used this step
  double dampening;
  double weight_decay;
  double grad_sign;  // -1 when maximizing, over the AMP grad scale
  double clip;       // the clipping factor ([note: gradient adjustments])
  bool nesterov;
  bool first_step;  // the momentum buffer is set to the gradient instead of decayed
};

FUSEDLR_HD SgdScalars sgd_scalars(const double* hyper, ScheduleValue schedule, int64_t completed_steps,
                                  GradAdjust adjust) {
  using namespace sgd_slot;
  SgdScalars s;
  s.lr = schedule.lr;
  s.momentum = schedule.has_momentum ? schedule.momentum : hyper[kMomentum];
  s.dampening = hyper[kDampening];
  s.weight_decay = hyper[kWeightDecay];
  s.grad_sign = (hyper[kMaximize] != 0 ? -1.0 : 1.0) / adjust.scale;
  s.clip = adjust.clip;
  s.nesterov = hyper[kNesterov] != 0;
  s.first_step = completed_steps == 0;
  return s;
}

template <typename T>
struct SgdCoefficients {
  T neg_lr, momentum, one_minus_dampening, weight_decay, grad_sign, clip;
  bool nesterov, first_step;

  FUSEDLR_HD explicit SgdCoefficients(const SgdScalars& s)
      : neg_lr(static_cast<T>(-s.lr)),
        momentum(static_cast<T>(s.momentum)),
        one_minus_dampening(static_cast<T>(1 - s.dampening)),
        weight_decay(static_cast<T>(s.weight_decay)),
        grad_sign(static_cast<T>(s.grad_sign)),
        clip(static_cast<T>(s.clip)),
        nesterov(s.nesterov),
        first_step(s.first_step) {}
};

// kMomentum: the tensor has a momentum buffer and this step's momentum is nonzero.
// kWeightDecay: weight_decay != 0 (torch adds nothing otherwise, not even 0 * param).
template <typename T, bool kMomentum, bool kWeightDecay>
FUSEDLR_HD void sgd_update(T& param, T grad, T& momentum_buffer, const SgdCoefficients<T>& c) {
  T g = grad * c.grad_sign * c.clip;
  if (kWeightDecay) g = g + c.weight_decay * param;
  if (kMomentum) {
    momentum_buffer = c.first_step ? g : momentum_buffer * c.momentum + c.one_minus_dampening * g;
    g = c.nesterov ? g + c.momentum * momentum_buffer : momentum_buffer;
  }
  param = param + c.neg_lr * g;
}

// ---------------------------------------------------------------------------------------------
// Adam and AdamW

struct AdamScalars {
  double beta1, beta2, eps;
  double weight_decay;           // L2 (Adam); 0 under decoupled decay
  double decay;                  // decoupled decay multiplier 1 - lr * weight_decay (AdamW); else 1
  double step_size;              // lr / (1 - beta1^step)
  double bias_correction2_sqrt;  // (1 - beta2^step)^0.5
  double grad_sign;              // -1 when maximizing, over the AMP grad scale
  double clip;                   // the clipping factor ([note: gradient adjustments])
  bool amsgrad;
};

// `step` is the tensor's step count including this update (torch's state["step"] after +1).
FUSEDLR_HD AdamScalars adam_scalars(const double* hyper, ScheduleValue schedule, int64_t step, GradAdjust adjust) {
  using namespace adam_slot;
  AdamScalars s;
  const double lr = schedule.lr;
  s.beta1 = schedule.has_momentum ? schedule.momentum : hyper[kBeta1];
  s.beta2 = hyper[kBeta2];
  s.eps = hyper[kEps];
  const bool decoupled = hyper[kDecoupled] != 0;
  s.weight_decay = decoupled ? 0.0 : hyper[kWeightDecay];
  s.decay = decoupled ? 1 - lr * hyper[kWeightDecay] : 1.0;
  const double bias_correction1 = 1 - pow(s.beta1, static_cast<double>(step));
  const double bias_correction2 = 1 - pow(s.beta2, static_cast<double>(step));
  s.step_size = lr / bias_correction1;
  s.bias_correction2_sqrt = pow(bias_correction2, 0.5);
  s.grad_sign = (hyper[kMaximize] != 0 ? -1.0 : 1.0) / adjust.scale;
  s.clip = adjust.clip;
  s.amsgrad = hyper[kAmsgrad] != 0;
  return s;
}

template <typename T>
struct AdamCoefficients {
  T one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay, neg_step_size,
      bias_correction2_sqrt, grad_sign, clip;
  bool small_lerp_weight;

  FUSEDLR_HD explicit AdamCoefficients(const AdamScalars& s)
      : one_minus_beta1(static_cast<T>(1 - s.beta1)),
        beta2(static_cast<T>(s.beta2)),
        one_minus_beta2(static_cast<T>(1 - s.beta2)),
        eps(static_cast<T>(s.eps)),
        weight_decay(static_cast<T>(s.weight_decay)),
        decay(static_cast<T>(s.decay)),
        neg_step_size(static_cast<T>(-s.step_size)),
        bias_correction2_sqrt(static_cast<T>(s.bias_correction2_sqrt)),
        grad_sign(static_cast<T>(s.grad_sign)),
        clip(static_cast<T>(s.clip)),
        small_lerp_weight(one_minus_beta1 < T(0.5) && one_minus_beta1 > T(-0.5)) {}
};

// kWeightDecay: L2 weight decay (Adam with weight_decay != 0). The decoupled decay of AdamW is a
// multiplier that is exactly 1 when unused, so it needs no switch.
template <typename T, bool kAmsgrad, bool kWeightDecay>
FUSEDLR_HD void adam_update(T& param, T grad, T& exp_avg, T& exp_avg_sq, T& max_exp_avg_sq,
                            const AdamCoefficients<T>& c) {
  T g = grad * c.grad_sign * c.clip;
  if (kWeightDecay) g = g + c.weight_decay * param;
  param = param * c.decay;
  exp_avg = lerp(exp_avg, g, c.one_minus_beta1, c.small_lerp_weight);
  exp_avg_sq = exp_avg_sq * c.beta2 + c.one_minus_beta2 * g * g;
  T second_moment = exp_avg_sq;
  if (kAmsgrad) {
    max_exp_avg_sq = max_exp_avg_sq > exp_avg_sq ? max_exp_avg_sq : exp_avg_sq;
    second_moment = max_exp_avg_sq;
  }
  const T denom = sqrt_of(second_moment) / c.bias_correction2_sqrt + c.eps;
  param = param + c.neg_step_size * exp_avg / denom;
}

}  // namespace fusedlr
