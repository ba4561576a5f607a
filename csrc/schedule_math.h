#pragma once
// Learning-rate schedule math: the one definition used by the CPU kernels, the CUDA kernels and
// the host evaluation behind `Schedule.__call__`.
//
// [note: schedule programs]
// A param group's schedule reaches the kernels as a small program of doubles, built once in
// Python (fusedlr/schedules.py, `Schedule._encode`). The `programs` argument of every op is
//
//     [offset of group 0's root node, ..., offset of group G-1's root node, node, node, ...]
//
// and a node is `[kind, steps_per_epoch, args...]`, its args laid out as the `*_arg` enums below
// say. SequentialLR's args name its children by their offsets in the same array, so composition
// nests without recursion: evaluation walks down from the root to one leaf.
//
// Time is an int64 count of completed optimizer steps, turned into the schedule's own time by
// integer division by steps_per_epoch (exact at any step count), and only then into a double.

#include <cmath>
#include <cstdint>

#include "macros.h"

namespace fusedlr {

enum class ScheduleKind : int {
  kConstant = 0,  // no schedule: the group's lr
  kConstantLR = 1,
  kLinearLR = 2,
  kStepLR = 3,
  kMultiStepLR = 4,
  kExponentialLR = 5,
  kExponentialDecay = 6,
  kCosineAnnealingLR = 7,
  kCosineAnnealingWarmRestarts = 8,
  kPolynomialLR = 9,
  kInverseSqrt = 10,
  kWarmupStableDecay = 11,
  kOneCycleLR = 12,
  kCyclicLR = 13,
  kReduceLROnPlateau = 14,
  kSequentialLR = 15,
};

constexpr int kNodeHeader = 2;  // kind, steps_per_epoch
constexpr int kMaxScheduleDepth = 16;

namespace constant_lr_arg { enum : int { kFactor, kTotalIters }; }
namespace linear_lr_arg { enum : int { kStartFactor, kEndFactor, kTotalIters }; }
namespace step_lr_arg { enum : int { kStepSize, kGamma }; }
namespace multi_step_lr_arg { enum : int { kGamma, kCount, kFirstMilestone }; }
namespace exponential_lr_arg { enum : int { kGamma }; }
namespace exponential_decay_arg { enum : int { kDecayRate }; }
namespace cosine_arg { enum : int { kTMax, kEtaMin }; }
namespace warm_restarts_arg { enum : int { kT0, kTMult, kEtaMin }; }
namespace polynomial_arg { enum : int { kTotalIters, kPower }; }
namespace inverse_sqrt_arg { enum : int { kWarmupSteps }; }
namespace wsd_arg { enum : int { kWarmup, kStable, kDecay, kShape, kMinRatio }; }
enum class WsdShape : int { kLinear = 0, kCosine = 1, kOneMinusSqrt = 2 };
// OneCycleLR: a header, then kPhaseStride doubles per phase.
namespace one_cycle_arg { enum : int { kTotalSteps, kLinearAnneal, kCycleMomentum, kPhaseCount, kFirstPhase }; }
namespace one_cycle_phase { enum : int { kEndStep, kStartLr, kEndLr, kStartMomentum, kEndMomentum, kStride }; }
namespace cyclic_arg {
enum : int { kBaseLr, kMaxLr, kTotalSize, kStepRatio, kScaleFn, kScaleByCycle, kGamma, kCycleMomentum, kBaseMomentum, kMaxMomentum };
}
enum class CyclicScale : int { kTriangular = 0, kTriangular2 = 1, kExpRange = 2 };
namespace plateau_arg {
enum : int { kModeMax, kFactor, kPatience, kThreshold, kThresholdAbs, kCooldown, kMinLr, kEps };
}
// SequentialLR: count, then count-1 milestones, then count child offsets.
namespace sequential_arg { enum : int { kCount, kFirstMilestone }; }

// Per-group ReduceLROnPlateau state, a float64 row on the device. NaN in kLr means "not reduced
// yet: use the group's lr"; NaN in kBest means "no metric seen yet".
namespace plateau_slot { enum : int { kLr, kBest, kNumBad, kCooldownCounter, kCount }; }

struct ScheduleValue {
  double lr;
  double momentum;    // SGD momentum or Adam beta1, when the schedule cycles it
  bool has_momentum;
};

FUSEDLR_HD bool is_nan(double x) { return x != x; }

FUSEDLR_HD int64_t as_int(double x) { return static_cast<int64_t>(x); }

FUSEDLR_HD double cosine_interpolate(double start, double end, double pct) {
  return end + (start - end) / 2.0 * (cos(M_PI * pct) + 1);
}

FUSEDLR_HD double linear_interpolate(double start, double end, double pct) {
  return (end - start) * pct + start;
}

FUSEDLR_HD double cosine_annealing(double base_lr, double eta_min, double t, double period) {
  return eta_min + (base_lr - eta_min) * (1 + cos(M_PI * t / period)) / 2;
}

FUSEDLR_HD ScheduleValue one_cycle_value(const double* a, int64_t t) {
  using namespace one_cycle_arg;
  const double step = static_cast<double>(t < as_int(a[kTotalSteps]) - 1 ? t : as_int(a[kTotalSteps]) - 1);
  const int phases = static_cast<int>(a[kPhaseCount]);
  const bool linear = a[kLinearAnneal] != 0;
  double start = 0;
  for (int i = 0; i < phases; ++i) {
    const double* phase = a + kFirstPhase + i * one_cycle_phase::kStride;
    const double end = phase[one_cycle_phase::kEndStep];
    if (step <= end || i == phases - 1) {
      const double pct = (step - start) / (end - start);
      const double lr = linear ? linear_interpolate(phase[one_cycle_phase::kStartLr], phase[one_cycle_phase::kEndLr], pct)
                               : cosine_interpolate(phase[one_cycle_phase::kStartLr], phase[one_cycle_phase::kEndLr], pct);
      const double momentum =
          linear ? linear_interpolate(phase[one_cycle_phase::kStartMomentum], phase[one_cycle_phase::kEndMomentum], pct)
                 : cosine_interpolate(phase[one_cycle_phase::kStartMomentum], phase[one_cycle_phase::kEndMomentum], pct);
      return {lr, momentum, a[kCycleMomentum] != 0};
    }
    start = end;
  }
  return {0, 0, false};  // unreachable: a program has at least one phase
}

FUSEDLR_HD ScheduleValue cyclic_value(const double* a, int64_t t) {
  using namespace cyclic_arg;
  const double epoch = static_cast<double>(t);
  const double cycle = floor(1 + epoch / a[kTotalSize]);
  const double x = 1.0 + epoch / a[kTotalSize] - cycle;
  const double ratio = a[kStepRatio];
  const double scale_factor = x <= ratio ? x / ratio : (x - 1) / (ratio - 1);
  const double scale_x = a[kScaleByCycle] != 0 ? cycle : epoch;
  double scale = 1.0;
  switch (static_cast<CyclicScale>(static_cast<int>(a[kScaleFn]))) {
    case CyclicScale::kTriangular: scale = 1.0; break;
    case CyclicScale::kTriangular2: scale = 1 / pow(2.0, scale_x - 1); break;
    case CyclicScale::kExpRange: scale = pow(a[kGamma], scale_x); break;
  }
  const double lr = a[kBaseLr] + (a[kMaxLr] - a[kBaseLr]) * scale_factor * scale;
  const double momentum = a[kMaxMomentum] - (a[kMaxMomentum] - a[kBaseMomentum]) * scale_factor * scale;
  return {lr, momentum, a[kCycleMomentum] != 0};
}

FUSEDLR_HD double warmup_stable_decay_factor(const double* a, int64_t t) {
  using namespace wsd_arg;
  const int64_t warmup = as_int(a[kWarmup]);
  const int64_t decay_start = warmup + as_int(a[kStable]);
  if (t < warmup) return static_cast<double>(t + 1) / static_cast<double>(warmup);
  if (t < decay_start) return 1.0;
  const int64_t decay = as_int(a[kDecay]);
  const double pct = t - decay_start >= decay ? 1.0 : static_cast<double>(t - decay_start) / static_cast<double>(decay);
  double remaining = 1.0 - pct;
  switch (static_cast<WsdShape>(static_cast<int>(a[kShape]))) {
    case WsdShape::kLinear: remaining = 1.0 - pct; break;
    case WsdShape::kCosine: remaining = (1 + cos(M_PI * pct)) / 2; break;
    case WsdShape::kOneMinusSqrt: remaining = 1.0 - sqrt(pct); break;
  }
  return a[kMinRatio] + (1.0 - a[kMinRatio]) * remaining;
}

// The value of the leaf node `a` (its args) at schedule time t, for a group whose lr is base_lr.
FUSEDLR_HD ScheduleValue leaf_value(ScheduleKind kind, const double* a, int64_t t, double base_lr, const double* plateau) {
  const double epoch = static_cast<double>(t);
  switch (kind) {
    case ScheduleKind::kConstant:
      return {base_lr, 0, false};
    case ScheduleKind::kConstantLR: {
      using namespace constant_lr_arg;
      return {t < as_int(a[kTotalIters]) ? base_lr * a[kFactor] : base_lr, 0, false};
    }
    case ScheduleKind::kLinearLR: {
      using namespace linear_lr_arg;
      const int64_t total = as_int(a[kTotalIters]);
      const double progress = static_cast<double>(t < total ? t : total);
      return {base_lr * (a[kStartFactor] + (a[kEndFactor] - a[kStartFactor]) * progress / a[kTotalIters]), 0, false};
    }
    case ScheduleKind::kStepLR: {
      using namespace step_lr_arg;
      return {base_lr * pow(a[kGamma], static_cast<double>(t / as_int(a[kStepSize]))), 0, false};
    }
    case ScheduleKind::kMultiStepLR: {
      using namespace multi_step_lr_arg;
      const int count = static_cast<int>(a[kCount]);
      int passed = 0;
      for (int i = 0; i < count; ++i) passed += as_int(a[kFirstMilestone + i]) <= t;
      return {base_lr * pow(a[kGamma], static_cast<double>(passed)), 0, false};
    }
    case ScheduleKind::kExponentialLR:
      return {base_lr * pow(a[exponential_lr_arg::kGamma], epoch), 0, false};
    case ScheduleKind::kExponentialDecay:
      return {base_lr * exp(-a[exponential_decay_arg::kDecayRate] * epoch), 0, false};
    case ScheduleKind::kCosineAnnealingLR: {
      using namespace cosine_arg;
      if (t >= as_int(a[kTMax])) return {a[kEtaMin], 0, false};
      return {cosine_annealing(base_lr, a[kEtaMin], epoch, a[kTMax]), 0, false};
    }
    case ScheduleKind::kCosineAnnealingWarmRestarts: {
      using namespace warm_restarts_arg;
      int64_t period = as_int(a[kT0]);
      const int64_t mult = as_int(a[kTMult]);
      int64_t t_cur = t;
      if (mult == 1) {
        t_cur = t % period;
      } else {
        while (t_cur >= period) {
          t_cur -= period;
          period *= mult;
        }
      }
      return {cosine_annealing(base_lr, a[kEtaMin], static_cast<double>(t_cur), static_cast<double>(period)), 0, false};
    }
    case ScheduleKind::kPolynomialLR: {
      using namespace polynomial_arg;
      const int64_t total = as_int(a[kTotalIters]);
      const double progress = static_cast<double>(t < total ? t : total);
      return {base_lr * pow(1.0 - progress / a[kTotalIters], a[kPower]), 0, false};
    }
    case ScheduleKind::kInverseSqrt: {
      const double warmup = a[inverse_sqrt_arg::kWarmupSteps];
      const double n = epoch + 1;
      return {base_lr * (n < warmup ? n / warmup : sqrt(warmup / n)), 0, false};
    }
    case ScheduleKind::kWarmupStableDecay:
      return {base_lr * warmup_stable_decay_factor(a, t), 0, false};
    case ScheduleKind::kOneCycleLR:
      return one_cycle_value(a, t);
    case ScheduleKind::kCyclicLR:
      return cyclic_value(a, t);
    case ScheduleKind::kReduceLROnPlateau: {
      const double lr = plateau[plateau_slot::kLr];
      return {is_nan(lr) ? base_lr : lr, 0, false};
    }
    case ScheduleKind::kSequentialLR:
      break;  // not a leaf
  }
  return {base_lr, 0, false};
}

// The schedule of group `group` after `step` completed optimizer steps.
FUSEDLR_HD ScheduleValue evaluate_schedule(const double* programs, int group, int64_t step, double base_lr,
                                           const double* plateau_row) {
  int64_t node = as_int(programs[group]);
  int64_t t = step;
  for (int depth = 0; depth < kMaxScheduleDepth; ++depth) {
    const ScheduleKind kind = static_cast<ScheduleKind>(static_cast<int>(programs[node]));
    t /= as_int(programs[node + 1]);
    const double* a = programs + node + kNodeHeader;
    if (kind != ScheduleKind::kSequentialLR) return leaf_value(kind, a, t, base_lr, plateau_row);
    const int count = static_cast<int>(a[sequential_arg::kCount]);
    const double* milestones = a + sequential_arg::kFirstMilestone;
    int active = 0;
    while (active < count - 1 && t >= as_int(milestones[active])) ++active;
    if (active > 0) t -= as_int(milestones[active - 1]);
    node = as_int(milestones[count - 1 + active]);
  }
  return {base_lr, 0, false};  // deeper than Python lets a program be built
}

// ReduceLROnPlateau: one metric observed by a group whose root schedule node is `a` (its args).
FUSEDLR_HD void plateau_observe(const double* a, double metric, double base_lr, double* state) {
  using namespace plateau_arg;
  const bool mode_max = a[kModeMax] != 0;
  const double best = state[plateau_slot::kBest];
  bool better;
  if (is_nan(best)) {
    better = mode_max ? metric > -HUGE_VAL : metric < HUGE_VAL;
  } else if (a[kThresholdAbs] != 0) {
    better = mode_max ? metric > best + a[kThreshold] : metric < best - a[kThreshold];
  } else {
    better = mode_max ? metric > best * (1.0 + a[kThreshold]) : metric < best * (1.0 - a[kThreshold]);
  }
  double num_bad = state[plateau_slot::kNumBad];
  if (better) {
    state[plateau_slot::kBest] = metric;
    num_bad = 0;
  } else {
    num_bad += 1;
  }
  double cooldown_counter = state[plateau_slot::kCooldownCounter];
  if (cooldown_counter > 0) {
    cooldown_counter -= 1;
    num_bad = 0;
  }
  if (num_bad > a[kPatience]) {
    const double old_lr = is_nan(state[plateau_slot::kLr]) ? base_lr : state[plateau_slot::kLr];
    const double reduced = old_lr * a[kFactor];
    const double new_lr = reduced > a[kMinLr] ? reduced : a[kMinLr];
    if (old_lr - new_lr > a[kEps]) state[plateau_slot::kLr] = new_lr;
    cooldown_counter = a[kCooldown];
    num_bad = 0;
  }
  state[plateau_slot::kNumBad] = num_bad;
  state[plateau_slot::kCooldownCounter] = cooldown_counter;
}

}  // namespace fusedlr
