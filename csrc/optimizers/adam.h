#pragma once
// Adam and AdamW (torch.optim.Adam, with decoupled_weight_decay for AdamW): the update and its traits
// (optimizer_traits.h, [note: optimizer traits]).

#include <cmath>
#include <cstdint>

#include "../optimizer_traits.h"
#include "../schedule_math.h"
#include "../update_math.h"

namespace fusedlr {

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

struct Adam {
  static constexpr const char* kName = "adam";
  static constexpr const char* kPlanName = "AdamPlan";

  struct Slot {
    enum : int { kLr, kBeta1, kBeta2, kEps, kWeightDecay, kAmsgrad, kMaximize, kDecoupled, kCount };
  };
  static constexpr const char* kSlotNames[Slot::kCount] = {
      "lr", "beta1", "beta2", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay"};
  static constexpr int kMomentumSlot = Slot::kBeta1;

  struct State {
    enum : int { kExpAvg, kExpAvgSq, kMaxExpAvgSq, kCount };
  };
  static constexpr StateSpec kStates[State::kCount] = {{"exp_avg", "exp_avgs", false, ""},
                                                       {"exp_avg_sq", "exp_avg_sqs", false, ""},
                                                       {"max_exp_avg_sq", "max_exp_avg_sqs", true, "amsgrad is on"}};

  struct Flag {
    enum : int { kAmsgrad, kWeightDecay, kCount };
  };

  using Scalars = AdamScalars;
  template <typename T>
  using Coefficients = AdamCoefficients<T>;

  FUSEDLR_HD static Scalars scalars(const double* hyper, ScheduleValue schedule, int64_t completed_steps,
                                    GradAdjust adjust) {
    const double step = static_cast<double>(completed_steps + 1);  // torch's state["step"] after += 1
    Scalars s;
    const double lr = schedule.lr;
    s.beta1 = schedule.has_momentum ? schedule.momentum : hyper[Slot::kBeta1];
    s.beta2 = hyper[Slot::kBeta2];
    s.eps = hyper[Slot::kEps];
    const bool decoupled = hyper[Slot::kDecoupled] != 0;
    s.weight_decay = decoupled ? 0.0 : hyper[Slot::kWeightDecay];
    s.decay = decoupled ? 1 - lr * hyper[Slot::kWeightDecay] : 1.0;
    const double bias_correction1 = 1 - pow(s.beta1, step);
    const double bias_correction2 = 1 - pow(s.beta2, step);
    s.step_size = lr / bias_correction1;
    s.bias_correction2_sqrt = pow(bias_correction2, 0.5);
    s.grad_sign = grad_sign_of(hyper[Slot::kMaximize] != 0, adjust);
    s.clip = adjust.clip;
    s.amsgrad = hyper[Slot::kAmsgrad] != 0;
    return s;
  }

  FUSEDLR_HD static FlagValues<Flag::kCount> flags(const Scalars& s) {
    FlagValues<Flag::kCount> flags{};
    flags.value[Flag::kAmsgrad] = s.amsgrad;
    flags.value[Flag::kWeightDecay] = s.weight_decay != 0;
    return flags;
  }

  template <typename Flags>
  static constexpr int states_used() {
    return Flags::has(Flag::kAmsgrad) ? State::kCount : State::kMaxExpAvgSq;
  }

  template <typename T, typename Flags>
  FUSEDLR_HD static void update(T& param, T grad, T& exp_avg, T& exp_avg_sq, T& max_exp_avg_sq,
                                const Coefficients<T>& c) {
    adam_update<T, Flags::has(Flag::kAmsgrad), Flags::has(Flag::kWeightDecay)>(param, grad, exp_avg, exp_avg_sq,
                                                                                max_exp_avg_sq, c);
  }

  static bool needs_state(int state, const double* hyper, bool) {
    switch (state) {
      case State::kExpAvg:
      case State::kExpAvgSq: return true;
      case State::kMaxExpAvgSq: return hyper[Slot::kAmsgrad] != 0;
    }
    return false;
  }
};

}  // namespace fusedlr
