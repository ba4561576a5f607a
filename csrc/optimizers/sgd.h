#pragma once
// SGD (torch.optim.SGD): its update and its traits (optimizer_traits.h, [note: optimizer traits]).

#include <cstdint>

#include "../optimizer_traits.h"
#include "../schedule_math.h"
#include "../update_math.h"

namespace fusedlr {

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
    // selects by per-tensor masks, not branches (update_math.h, lerp)
    momentum_buffer =
        select_by_mask(c.first_step ? ~0u : 0u, g, momentum_buffer * c.momentum + c.one_minus_dampening * g);
    g = select_by_mask(c.nesterov ? ~0u : 0u, g + c.momentum * momentum_buffer, momentum_buffer);
  }
  param = param + c.neg_lr * g;
}

struct Sgd {
  static constexpr const char* kName = "sgd";
  static constexpr const char* kPlanName = "SgdPlan";

  struct Slot {
    enum : int { kLr, kMomentum, kDampening, kWeightDecay, kNesterov, kMaximize, kCount };
  };
  static constexpr const char* kSlotNames[Slot::kCount] = {"lr",           "momentum", "dampening",
                                                           "weight_decay", "nesterov", "maximize"};
  static constexpr int kMomentumSlot = Slot::kMomentum;

  struct State {
    enum : int { kMomentumBuffer, kCount };
  };
  static constexpr StateSpec kStates[State::kCount] = {
      {"momentum_buffer", "momentum_buffers", true, "the momentum is nonzero (or a schedule cycles it)"}};

  struct Flag {
    enum : int { kMomentum, kWeightDecay, kCount };
  };

  using Scalars = SgdScalars;
  template <typename T>
  using Coefficients = SgdCoefficients<T>;

  FUSEDLR_HD static Scalars scalars(const double* hyper, ScheduleValue schedule, int64_t completed_steps,
                                    GradAdjust adjust) {
    Scalars s;
    s.lr = schedule.lr;
    s.momentum = schedule.has_momentum ? schedule.momentum : hyper[Slot::kMomentum];
    s.dampening = hyper[Slot::kDampening];
    s.weight_decay = hyper[Slot::kWeightDecay];
    s.grad_sign = grad_sign_of(hyper[Slot::kMaximize] != 0, adjust);
    s.clip = adjust.clip;
    s.nesterov = hyper[Slot::kNesterov] != 0;
    s.first_step = completed_steps == 0;
    return s;
  }

  FUSEDLR_HD static FlagValues<Flag::kCount> flags(const Scalars& s) {
    FlagValues<Flag::kCount> flags{};
    flags.value[Flag::kMomentum] = s.momentum != 0;
    flags.value[Flag::kWeightDecay] = s.weight_decay != 0;
    return flags;
  }

  template <typename Flags>
  static constexpr int states_used() {
    return Flags::has(Flag::kMomentum) ? State::kCount : State::kMomentumBuffer;
  }

  template <typename T, typename Flags>
  FUSEDLR_HD static void update(T& param, T grad, T& momentum_buffer, const Coefficients<T>& c) {
    sgd_update<T, Flags::has(Flag::kMomentum), Flags::has(Flag::kWeightDecay)>(param, grad, momentum_buffer, c);
  }

  static bool needs_state(int state, const double*, bool momentum_nonzero) {
    switch (state) {
      case State::kMomentumBuffer: return momentum_nonzero;
    }
    return false;
  }
};

}  // namespace fusedlr
