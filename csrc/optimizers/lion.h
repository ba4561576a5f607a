#pragma once
// Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms", 2023): the update and its
// traits (optimizer_traits.h, [note: optimizer traits]). With g the adjusted gradient ([note:
// gradient adjustments]) and m the exp_avg:
//
//   c = beta1 m + (1 - beta1) g;  p <- p (1 - lr wd) - lr sign(c);  m <- beta2 m + (1 - beta2) g
//
// in that order of operations. sign(0) is 0 and a NaN stays NaN, as torch.sign has them.

#include <cstdint>

#include "../optimizer_traits.h"
#include "../schedule_math.h"
#include "../update_math.h"

namespace fusedlr {

struct LionScalars {
  double lr, beta1, beta2;
  double decay;      // the decoupled decay multiplier 1 - lr * weight_decay
  double grad_sign;  // -1 when maximizing, over the AMP grad scale
  double clip;       // the clipping factor ([note: gradient adjustments])
};

template <typename T>
struct LionCoefficients {
  T neg_lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay, grad_sign, clip;

  FUSEDLR_HD explicit LionCoefficients(const LionScalars& s)
      : neg_lr(static_cast<T>(-s.lr)),
        beta1(static_cast<T>(s.beta1)),
        one_minus_beta1(static_cast<T>(1 - s.beta1)),
        beta2(static_cast<T>(s.beta2)),
        one_minus_beta2(static_cast<T>(1 - s.beta2)),
        decay(static_cast<T>(s.decay)),
        grad_sign(static_cast<T>(s.grad_sign)),
        clip(static_cast<T>(s.clip)) {}
};

// sign(x): 1 with x's sign for a nonzero number (infinities included), else x itself (a zero keeps
// its sign, a NaN its bits). Spelled in x's bits and chosen by a compare of integers: as compares
// of floats choosing between float constants, gcc kept branches in the AVX2 and baseline loops
// (targets without masked operations), and their Lion steps stayed scalar, 6 to 11 times slower
// under AVX2.
FUSEDLR_HD float sign_of(float x) {
  const uint32_t b = float_bits(x);
  const bool nonzero_number = (b & 0x7fffffffu) - 1u < 0x7f800000u;  // neither zero nor NaN
  return float_of_bits(nonzero_number ? (b & 0x80000000u) | 0x3f800000u : b);
}

FUSEDLR_HD double sign_of(double x) {
  const uint64_t b = bit_cast<uint64_t>(x);
  const bool nonzero_number = (b & 0x7fffffffffffffffull) - 1u < 0x7ff0000000000000ull;
  return bit_cast<double>(nonzero_number ? (b & 0x8000000000000000ull) | 0x3ff0000000000000ull : b);
}

template <typename T>
FUSEDLR_HD void lion_update(T& param, T grad, T& exp_avg, const LionCoefficients<T>& c) {
  const T g = grad * c.grad_sign * c.clip;
  const T interpolated = exp_avg * c.beta1 + c.one_minus_beta1 * g;
  param = param * c.decay;
  param = param + c.neg_lr * sign_of(interpolated);
  exp_avg = exp_avg * c.beta2 + c.one_minus_beta2 * g;
}

struct Lion {
  static constexpr const char* kName = "lion";
  static constexpr const char* kPlanName = "LionPlan";

  struct Slot {
    enum : int { kLr, kBeta1, kBeta2, kWeightDecay, kMaximize, kCount };
  };
  static constexpr const char* kSlotNames[Slot::kCount] = {"lr", "beta1", "beta2", "weight_decay", "maximize"};
  static constexpr int kMomentumSlot = Slot::kBeta1;

  struct State {
    enum : int { kExpAvg, kCount };
  };
  static constexpr StateSpec kStates[State::kCount] = {{"exp_avg", "exp_avgs", false, ""}};

  struct Flag {
    enum : int { kCount };
  };

  using Scalars = LionScalars;
  template <typename T>
  using Coefficients = LionCoefficients<T>;

  FUSEDLR_HD static Scalars scalars(const double* hyper, ScheduleValue schedule, int64_t, GradAdjust adjust) {
    Scalars s;
    s.lr = schedule.lr;
    s.beta1 = schedule.has_momentum ? schedule.momentum : hyper[Slot::kBeta1];
    s.beta2 = hyper[Slot::kBeta2];
    s.decay = 1 - s.lr * hyper[Slot::kWeightDecay];
    s.grad_sign = grad_sign_of(hyper[Slot::kMaximize] != 0, adjust);
    s.clip = adjust.clip;
    return s;
  }

  FUSEDLR_HD static FlagValues<Flag::kCount> flags(const Scalars&) { return {}; }

  template <typename Flags>
  static constexpr int states_used() {
    return State::kCount;
  }

  template <typename T, typename Flags>
  FUSEDLR_HD static void update(T& param, T grad, T& exp_avg, const Coefficients<T>& c) {
    lion_update(param, grad, exp_avg, c);
  }

  static bool needs_state(int, const double*, bool) { return true; }
};

}  // namespace fusedlr
