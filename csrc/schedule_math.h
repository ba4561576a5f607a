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

constexpr int kNodeHeader = 2;  // kind, steps_per_epoch
constexpr int kMaxScheduleDepth = 16;

// The args of each node kind, in order.
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
// OneCycleLR: a header, then kStride doubles per phase.
namespace one_cycle_arg { enum : int { kTotalSteps, kLinearAnneal, kCycleMomentum, kPhaseCount, kFirstPhase }; }
namespace one_cycle_phase { enum : int { kEndStep, kStartLr, kEndLr, kStartMomentum, kEndMomentum, kStride }; }
namespace cyclic_arg {
enum : int { kBaseLr, kMaxLr, kTotalSize, kStepRatio, kScaleFn, kScaleByCycle, kGamma, kCycleMomentum, kBaseMomentum, kMaxMomentum };
}
enum class CyclicScale : int { kTriangular = 0, kTriangular2 = 1, kExpRange = 2 };
namespace plateau_arg {
enum : int { kModeMax, kFactor, kPatience, kThreshold, kThresholdAbs, kCooldown, kMinLr, kEps };
}
// HF transformers' GreedyLR; kSmooth: average each metric over the last kWindow observed, at most
// kMaxGreedyWindow (the window is part of the group's row of state).
constexpr int64_t kMaxGreedyWindow = int64_t{1} << 20;
namespace greedy_arg {
enum : int {
  kModeMax, kFactor, kPatience, kThreshold, kThresholdAbs, kCooldown, kWarmup, kMinLr, kMaxLr, kEps, kSmooth,
  kWindow, kResetStart
};
}
// SequentialLR: count, then count-1 milestones, then count child offsets.
namespace sequential_arg { enum : int { kCount, kFirstMilestone }; }
// Warmup: a ramp over the first kSteps steps, then its child (seeing t - kSteps when kPrefix, else t).
// The ramp's position is p = (t + kOffset) / kSpan; its lr start + (target - start) * shape(p) with
// start kStart (a factor of the base lr, or an lr when kStartAbsolute) and target the base lr, or
// with kTargetSchedule the child's lr where the ramp ends (timm's tanh schedule warms up so).
namespace warmup_arg {
enum : int { kChild, kSteps, kOffset, kSpan, kStart, kStartAbsolute, kShape, kPrefix, kTargetSchedule };
}
enum class WarmupShape : int { kLinear = 0, kCosine = 1, kOneMinusSqrt = 2 };
// Decay: with p = (t + kOffset) / kSpan, the factor floor + (1 - floor) * shape(p) of the base lr
// (floor a factor), or the lr floor + (base - floor) * shape(p) (kFloorAbsolute); from step kEnd on,
// the floor. kParam is the polynomial's power or the cosines' number of cycles.
// inverse_sqrt: 1 / sqrt((position + span) / span), span the timescale; it has no end.
namespace decay_arg { enum : int { kSpan, kOffset, kEnd, kShape, kParam, kFloor, kFloorAbsolute }; }
enum class DecayShape : int { kLinear = 0, kCosine = 1, kCosineRestarts = 2, kPolynomial = 3, kOneMinusSqrt = 4, kInverseSqrt = 5 };
// Cycles: cycles of kTInitial * kCycleMul^i steps, the i-th peaking at base * kCycleDecay^i, each
// annealed to kLrMin by a shape; after kCycleLimit cycles, kLrMin.
namespace cycles_arg {
enum : int { kTInitial, kCycleMul, kCycleDecay, kCycleLimit, kLrMin, kShape, kKDecay, kPower, kLb, kUb };
}
enum class CycleShape : int { kCosine = 0, kTanh = 1, kPolynomial = 2 };
// Product (torch's ChainedScheduler): base_lr times the product of its children's factors (each
// child evaluated for a base lr of 1), count then the count child offsets.
namespace product_arg { enum : int { kCount, kFirstChild }; }

// [note: schedule kinds]
// The one table of node kinds. Python reads it through `_C.schedule_kinds()` and finds a kind's id
// by its name, so a kind is added here (and in the switches the compiler then points at:
// -Werror=switch) and as a Python class, nowhere else. Per kind: its name; its number of args,
// fixed_args + args_per_item * a[count_arg] (count_arg kNoArg: fixed_args); the args that must be
// at least 1, because the evaluation divides by them or counts with them (checked before any kernel
// runs); the arg that says whether the node sets the momentum / beta1 (kNoArg: it never does).
constexpr int kNoArg = -1;

constexpr uint32_t args_mask() { return 0; }
template <typename... Rest>
constexpr uint32_t args_mask(int first, Rest... rest) {
  return (uint32_t{1} << first) | args_mask(rest...);
}

// X(name, fixed_args, count_arg, args_per_item, at_least_one, momentum_flag_arg)
#define FUSEDLR_SCHEDULE_KINDS(X)                                                                                   \
  X(Constant, 0, kNoArg, 0, args_mask(), kNoArg)                                                                   \
  X(ConstantLR, 2, kNoArg, 0, args_mask(), kNoArg)                                                                 \
  X(LinearLR, 3, kNoArg, 0, args_mask(linear_lr_arg::kTotalIters), kNoArg)                                         \
  X(StepLR, 2, kNoArg, 0, args_mask(step_lr_arg::kStepSize), kNoArg)                                               \
  X(MultiStepLR, multi_step_lr_arg::kFirstMilestone, multi_step_lr_arg::kCount, 1, args_mask(), kNoArg)            \
  X(ExponentialLR, 1, kNoArg, 0, args_mask(), kNoArg)                                                              \
  X(ExponentialDecay, 1, kNoArg, 0, args_mask(), kNoArg)                                                           \
  X(CosineAnnealingLR, 2, kNoArg, 0, args_mask(cosine_arg::kTMax), kNoArg)                                         \
  X(CosineAnnealingWarmRestarts, 3, kNoArg, 0, args_mask(warm_restarts_arg::kT0, warm_restarts_arg::kTMult),       \
    kNoArg)                                                                                                         \
  X(PolynomialLR, 2, kNoArg, 0, args_mask(polynomial_arg::kTotalIters), kNoArg)                                    \
  X(InverseSqrt, 1, kNoArg, 0, args_mask(inverse_sqrt_arg::kWarmupSteps), kNoArg)                                  \
  X(WarmupStableDecay, 5, kNoArg, 0, args_mask(wsd_arg::kDecay), kNoArg)                                           \
  X(OneCycleLR, one_cycle_arg::kFirstPhase, one_cycle_arg::kPhaseCount, one_cycle_phase::kStride,                  \
    args_mask(one_cycle_arg::kTotalSteps, one_cycle_arg::kPhaseCount), one_cycle_arg::kCycleMomentum)               \
  X(CyclicLR, 10, kNoArg, 0, args_mask(), cyclic_arg::kCycleMomentum)                                              \
  X(ReduceLROnPlateau, 8, kNoArg, 0, args_mask(), kNoArg)                                                          \
  X(GreedyLR, 13, kNoArg, 0, args_mask(greedy_arg::kWindow), kNoArg)                                               \
  X(SequentialLR, 0, sequential_arg::kCount, 2, args_mask(sequential_arg::kCount), kNoArg)                         \
  X(Warmup, 9, kNoArg, 0, args_mask(warmup_arg::kSteps, warmup_arg::kSpan), kNoArg)                                \
  X(Decay, 7, kNoArg, 0, args_mask(decay_arg::kSpan), kNoArg)                                                      \
  X(Cycles, 10, kNoArg, 0, args_mask(cycles_arg::kTInitial, cycles_arg::kCycleLimit), kNoArg)                   \
  X(Product, product_arg::kFirstChild, product_arg::kCount, 1, args_mask(product_arg::kCount), kNoArg)

#define FUSEDLR_KIND_ENUM(name, ...) k##name,
enum class ScheduleKind : int { FUSEDLR_SCHEDULE_KINDS(FUSEDLR_KIND_ENUM) };
#undef FUSEDLR_KIND_ENUM

struct ScheduleKindInfo {
  const char* name;
  int fixed_args;
  int count_arg;
  int args_per_item;
  uint32_t at_least_one;
  int momentum_flag_arg;
};

#define FUSEDLR_KIND_INFO(name, ...) {#name, __VA_ARGS__},
constexpr ScheduleKindInfo kScheduleKinds[] = {FUSEDLR_SCHEDULE_KINDS(FUSEDLR_KIND_INFO)};
#undef FUSEDLR_KIND_INFO
constexpr int kScheduleKindCount = static_cast<int>(sizeof(kScheduleKinds) / sizeof(kScheduleKinds[0]));
static_assert(kScheduleKindCount <= 32, "at_least_one is a 32-bit mask of args");

// The number of args of a node of `kind` whose args start at a, given that a[count_arg] is readable.
FUSEDLR_HD int64_t node_arg_count(const ScheduleKindInfo& info, const double* a) {
  const int64_t items = info.count_arg == kNoArg ? 0 : static_cast<int64_t>(a[info.count_arg]);
  return info.fixed_args + info.args_per_item * items;
}

// [note: schedule state]
// A metric-driven schedule (ReduceLROnPlateau, GreedyLR: only ever a group's root) keeps its state
// in its group's row of `plateau_state`, a float64 [groups, width] tensor on the device, width the
// widest row a group's schedule needs (schedule_state_width; at least plateau_slot::kCount). NaN in
// kLr means "not changed yet: use the group's lr"; NaN in kBest "no metric seen yet". The slots'
// names (kStateSlotNames) are how Python and checkpoints address them.
namespace plateau_slot { enum : int { kLr, kBest, kNumBad, kCooldownCounter, kCount }; }
// GreedyLR: kAtMinReductions counts the reductions seen with every GreedyLR group at its min_lr
// (HF's reset_start counts them down); the smoothing window is a ring of kWindow values from
// kFirstValue on, its oldest at kWindowHead.
namespace greedy_slot {
enum : int {
  kLr, kBest, kNumBad, kNumGood, kCooldownCounter, kWarmupCounter, kAtMinReductions, kWindowCount, kWindowSum,
  kWindowHead, kFirstValue
};
}
static_assert(static_cast<int>(greedy_slot::kLr) == plateau_slot::kLr &&
                  static_cast<int>(greedy_slot::kBest) == plateau_slot::kBest,
              "the step reads the lr of either from one slot");
constexpr const char* kPlateauSlotNames[] = {"lr", "best", "num_bad", "cooldown_counter"};
constexpr const char* kGreedySlotNames[] = {"lr",         "best",       "num_bad",     "num_good",
                                            "cooldown_counter", "warmup_counter", "at_min_reductions",
                                            "window_count", "window_sum", "window_head", "window_values"};
static_assert(sizeof(kPlateauSlotNames) / sizeof(char*) == plateau_slot::kCount &&
                  sizeof(kGreedySlotNames) / sizeof(char*) == greedy_slot::kFirstValue + 1,
              "a name per slot (window_values: the first of the window)");

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

FUSEDLR_HD double warmup_shape(WarmupShape shape, double p) {
  switch (shape) {
    case WarmupShape::kLinear: return p;
    case WarmupShape::kCosine: return 0.5 * (1.0 - cos(M_PI * p));
    case WarmupShape::kOneMinusSqrt: return 1.0 - sqrt(1.0 - p);
  }
  return p;
}

// The ramp of a Warmup node at step t < a[kSteps], towards `target` (the base lr, or the child's lr
// at the ramp's end).
FUSEDLR_HD double warmup_value(const double* a, int64_t t, double base_lr, double target) {
  using namespace warmup_arg;
  const auto shape = static_cast<WarmupShape>(static_cast<int>(a[kShape]));
  const double position = static_cast<double>(t) + a[kOffset];
  const double r = warmup_shape(shape, position / a[kSpan]);
  if (a[kStartAbsolute] == 0 && a[kTargetSchedule] == 0) return base_lr * (r * (1.0 - a[kStart]) + a[kStart]);
  const double start = a[kStartAbsolute] != 0 ? a[kStart] : base_lr * a[kStart];
  // linear as timm computes it: start + t * ((target - start) / span)
  if (shape == WarmupShape::kLinear) return start + position * ((target - start) / a[kSpan]);
  return start + (target - start) * r;
}

// The shape at position t + offset of a decay over `span` steps (p = position / span). Linear and
// inverse_sqrt divide once, as HF's schedules compute them.
FUSEDLR_HD double decay_shape(DecayShape shape, double position, double span, double param) {
  const double p = position / span;
  switch (shape) {
    case DecayShape::kLinear: return (span - position) / span;
    case DecayShape::kCosine: return 0.5 * (1.0 + cos(M_PI * param * 2.0 * p));
    case DecayShape::kCosineRestarts: return 0.5 * (1.0 + cos(M_PI * fmod(param * p, 1.0)));
    case DecayShape::kPolynomial: return pow(1.0 - p, param);
    case DecayShape::kOneMinusSqrt: return 1.0 - sqrt(p);
    case DecayShape::kInverseSqrt: return 1.0 / sqrt((position + span) / span);
  }
  return 1.0 - p;
}

// WarmupStableDecay: (t + 1) / W, then 1, then a Decay's shape (decay_shape) to the min ratio.
FUSEDLR_HD double warmup_stable_decay_factor(const double* a, int64_t t) {
  using namespace wsd_arg;
  const int64_t warmup = as_int(a[kWarmup]);
  const int64_t decay_start = warmup + as_int(a[kStable]);
  if (t < warmup) return static_cast<double>(t + 1) / static_cast<double>(warmup);
  if (t < decay_start) return 1.0;
  const int64_t decay = as_int(a[kDecay]);
  DecayShape shape = DecayShape::kLinear;
  switch (static_cast<WsdShape>(static_cast<int>(a[kShape]))) {
    case WsdShape::kLinear: shape = DecayShape::kLinear; break;
    case WsdShape::kCosine: shape = DecayShape::kCosine; break;
    case WsdShape::kOneMinusSqrt: shape = DecayShape::kOneMinusSqrt; break;
  }
  const int64_t into = t - decay_start < decay ? t - decay_start : decay;
  const double remaining = decay_shape(shape, static_cast<double>(into), static_cast<double>(decay), 0.5);
  return a[kMinRatio] + (1.0 - a[kMinRatio]) * remaining;
}

FUSEDLR_HD double decay_value(const double* a, int64_t t, double base_lr) {
  using namespace decay_arg;
  const bool absolute = a[kFloorAbsolute] != 0;
  if (static_cast<double>(t) >= a[kEnd]) return absolute ? a[kFloor] : base_lr * a[kFloor];
  const double f = decay_shape(static_cast<DecayShape>(static_cast<int>(a[kShape])), static_cast<double>(t) + a[kOffset],
                               a[kSpan], a[kParam]);
  if (absolute) return a[kFloor] + (base_lr - a[kFloor]) * f;
  return base_lr * (f * (1.0 - a[kFloor]) + a[kFloor]);
}

// timm's cycle arithmetic: cycle i, its length t_i and the time t_curr into it.
FUSEDLR_HD double cycles_value(const double* a, int64_t t, double base_lr) {
  using namespace cycles_arg;
  const double t_initial = a[kTInitial];
  const double mul = a[kCycleMul];
  const double epoch = static_cast<double>(t);
  double i, t_i, t_curr;
  if (mul != 1.0) {
    i = floor(log(1.0 - epoch / t_initial * (1.0 - mul)) / log(mul));
    t_i = pow(mul, i) * t_initial;
    t_curr = epoch - (1.0 - pow(mul, i)) / (1.0 - mul) * t_initial;
  } else {
    const int64_t cycle = t / as_int(t_initial);
    i = static_cast<double>(cycle);
    t_i = t_initial;
    t_curr = static_cast<double>(t - as_int(t_initial) * cycle);
  }
  const double lr_min = a[kLrMin];
  if (!(i < a[kCycleLimit])) return lr_min;
  const double lr_max = base_lr * pow(a[kCycleDecay], i);
  switch (static_cast<CycleShape>(static_cast<int>(a[kShape]))) {
    case CycleShape::kCosine:
      return lr_min + 0.5 * (lr_max - lr_min) * (1.0 + cos(M_PI * pow(t_curr, a[kKDecay]) / pow(t_i, a[kKDecay])));
    case CycleShape::kTanh: {
      const double tr = t_curr / t_i;
      return lr_min + 0.5 * (lr_max - lr_min) * (1.0 - tanh(a[kLb] * (1.0 - tr) + a[kUb] * tr));
    }
    case CycleShape::kPolynomial:
      return lr_min + (lr_max - lr_min) * pow(1.0 - pow(t_curr, a[kKDecay]) / pow(t_i, a[kKDecay]), a[kPower]);
  }
  return lr_min;
}

// [note: schedule evaluation]
// One node at schedule time t either gives the value or hands on to a child with the child's
// time: SequentialLR picks the child whose milestone has passed, Warmup its child once the ramp is
// over. Every kind is a case of this one switch, so a new kind that is not handled fails to build.
struct NodeStep {
  bool done;
  ScheduleValue value;  // when done
  int64_t child;        // else: the child's offset and its time
  int64_t t;
};

FUSEDLR_HD NodeStep leaf(double lr) { return {true, {lr, 0, false}, 0, 0}; }
FUSEDLR_HD NodeStep leaf(ScheduleValue v) { return {true, v, 0, 0}; }

FUSEDLR_HD NodeStep step_node(ScheduleKind kind, const double* a, int64_t t, double base_lr, const double* plateau) {
  const double epoch = static_cast<double>(t);
  switch (kind) {
    case ScheduleKind::kConstant:
      return leaf(base_lr);
    case ScheduleKind::kConstantLR: {
      using namespace constant_lr_arg;
      return leaf(t < as_int(a[kTotalIters]) ? base_lr * a[kFactor] : base_lr);
    }
    case ScheduleKind::kLinearLR: {
      using namespace linear_lr_arg;
      const int64_t total = as_int(a[kTotalIters]);
      const double progress = static_cast<double>(t < total ? t : total);
      return leaf(base_lr * (a[kStartFactor] + (a[kEndFactor] - a[kStartFactor]) * progress / a[kTotalIters]));
    }
    case ScheduleKind::kStepLR: {
      using namespace step_lr_arg;
      return leaf(base_lr * pow(a[kGamma], static_cast<double>(t / as_int(a[kStepSize]))));
    }
    case ScheduleKind::kMultiStepLR: {
      using namespace multi_step_lr_arg;
      const int count = static_cast<int>(a[kCount]);
      int passed = 0;
      for (int i = 0; i < count; ++i) passed += as_int(a[kFirstMilestone + i]) <= t;
      return leaf(base_lr * pow(a[kGamma], static_cast<double>(passed)));
    }
    case ScheduleKind::kExponentialLR:
      return leaf(base_lr * pow(a[exponential_lr_arg::kGamma], epoch));
    case ScheduleKind::kExponentialDecay:
      return leaf(base_lr * exp(-a[exponential_decay_arg::kDecayRate] * epoch));
    case ScheduleKind::kCosineAnnealingLR: {
      using namespace cosine_arg;
      if (t >= as_int(a[kTMax])) return leaf(a[kEtaMin]);
      return leaf(cosine_annealing(base_lr, a[kEtaMin], epoch, a[kTMax]));
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
      return leaf(cosine_annealing(base_lr, a[kEtaMin], static_cast<double>(t_cur), static_cast<double>(period)));
    }
    case ScheduleKind::kPolynomialLR: {
      using namespace polynomial_arg;
      const int64_t total = as_int(a[kTotalIters]);
      const double progress = static_cast<double>(t < total ? t : total);
      return leaf(base_lr * pow(1.0 - progress / a[kTotalIters], a[kPower]));
    }
    case ScheduleKind::kInverseSqrt: {
      const double warmup = a[inverse_sqrt_arg::kWarmupSteps];
      const double n = epoch + 1;
      return leaf(base_lr * (n < warmup ? n / warmup : sqrt(warmup / n)));
    }
    case ScheduleKind::kWarmupStableDecay:
      return leaf(base_lr * warmup_stable_decay_factor(a, t));
    case ScheduleKind::kOneCycleLR:
      return leaf(one_cycle_value(a, t));
    case ScheduleKind::kCyclicLR:
      return leaf(cyclic_value(a, t));
    case ScheduleKind::kReduceLROnPlateau:
    case ScheduleKind::kGreedyLR: {
      const double lr = plateau[plateau_slot::kLr];
      return leaf(is_nan(lr) ? base_lr : lr);
    }
    case ScheduleKind::kSequentialLR: {
      const int count = static_cast<int>(a[sequential_arg::kCount]);
      const double* milestones = a + sequential_arg::kFirstMilestone;
      int active = 0;
      while (active < count - 1 && t >= as_int(milestones[active])) ++active;
      const int64_t start = active > 0 ? as_int(milestones[active - 1]) : 0;
      return {false, {}, as_int(milestones[count - 1 + active]), t - start};
    }
    case ScheduleKind::kWarmup: {
      using namespace warmup_arg;
      const int64_t steps = as_int(a[kSteps]);
      if (t < steps) return leaf(warmup_value(a, t, base_lr, base_lr));  // a schedule target: see walk
      return {false, {}, as_int(a[kChild]), a[kPrefix] != 0 ? t - steps : t};
    }
    case ScheduleKind::kDecay:
      return leaf(decay_value(a, t, base_lr));
    case ScheduleKind::kCycles:
      return leaf(cycles_value(a, t, base_lr));
    case ScheduleKind::kProduct:
      break;  // walk_schedule evaluates its children; Python never nests one in another
  }
  return leaf(base_lr);
}

// The value of the schedule rooted at `node` at time t. A Warmup ramping to its child's lr at the
// ramp's end evaluates the child there with a second walk, and a Product each child; Python keeps
// those walks free of such ramps and products (kNested), so the evaluation never recurses further.
template <bool kNested>
FUSEDLR_HD ScheduleValue walk_schedule(const double* programs, int64_t node, int64_t t, double base_lr,
                                       const double* plateau_row) {
  for (int depth = 0; depth < kMaxScheduleDepth; ++depth) {
    const ScheduleKind kind = static_cast<ScheduleKind>(static_cast<int>(programs[node]));
    t /= as_int(programs[node + 1]);
    const double* a = programs + node + kNodeHeader;
    if constexpr (!kNested) {
      using namespace warmup_arg;
      if (kind == ScheduleKind::kWarmup && a[kTargetSchedule] != 0 && t < as_int(a[kSteps])) {
        const int64_t end = a[kPrefix] != 0 ? 0 : as_int(a[kSteps]);
        const double target = walk_schedule<true>(programs, as_int(a[kChild]), end, base_lr, plateau_row).lr;
        return {warmup_value(a, t, base_lr, target), 0, false};
      }
      if (kind == ScheduleKind::kProduct) {
        double lr = base_lr;
        const int64_t count = as_int(a[product_arg::kCount]);
        for (int64_t i = 0; i < count; ++i)
          lr *= walk_schedule<true>(programs, as_int(a[product_arg::kFirstChild + i]), t, 1.0, plateau_row).lr;
        return {lr, 0, false};
      }
    }
    const NodeStep next = step_node(kind, a, t, base_lr, plateau_row);
    if (next.done) return next.value;
    node = next.child;
    t = next.t;
  }
  return {base_lr, 0, false};  // deeper than Python lets a program be built
}

// The schedule of group `group` after `step` completed optimizer steps.
FUSEDLR_HD ScheduleValue evaluate_schedule(const double* programs, int group, int64_t step, double base_lr,
                                           const double* plateau_row) {
  return walk_schedule<false>(programs, as_int(programs[group]), step, base_lr, plateau_row);
}

// The children of a node (their offsets, contiguous in its args), for the walks that check a program
// or look for momentum-setting nodes.
struct NodeChildren {
  const double* offsets;
  int64_t count;
};

inline NodeChildren node_children(ScheduleKind kind, const double* a) {
  switch (kind) {
    case ScheduleKind::kSequentialLR: {
      const int64_t count = as_int(a[sequential_arg::kCount]);
      return {a + sequential_arg::kFirstMilestone + count - 1, count};
    }
    case ScheduleKind::kWarmup:
      return {a + warmup_arg::kChild, 1};
    case ScheduleKind::kProduct:
      return {a + product_arg::kFirstChild, as_int(a[product_arg::kCount])};
    case ScheduleKind::kConstant:
    case ScheduleKind::kConstantLR:
    case ScheduleKind::kLinearLR:
    case ScheduleKind::kStepLR:
    case ScheduleKind::kMultiStepLR:
    case ScheduleKind::kExponentialLR:
    case ScheduleKind::kExponentialDecay:
    case ScheduleKind::kCosineAnnealingLR:
    case ScheduleKind::kCosineAnnealingWarmRestarts:
    case ScheduleKind::kPolynomialLR:
    case ScheduleKind::kInverseSqrt:
    case ScheduleKind::kWarmupStableDecay:
    case ScheduleKind::kOneCycleLR:
    case ScheduleKind::kCyclicLR:
    case ScheduleKind::kReduceLROnPlateau:
    case ScheduleKind::kGreedyLR:
    case ScheduleKind::kDecay:
    case ScheduleKind::kCycles:
      break;
  }
  return {nullptr, 0};
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

// The row of schedule state that group g's root schedule node `a` of `kind` needs ([note:
// schedule state]); every row is at least plateau_slot::kCount wide.
FUSEDLR_HD int64_t schedule_state_width(ScheduleKind kind, const double* a) {
  if (kind == ScheduleKind::kGreedyLR) {
    using namespace greedy_arg;
    return greedy_slot::kFirstValue + (a[kSmooth] != 0 ? as_int(a[kWindow]) : 0);
  }
  return plateau_slot::kCount;
}

// GreedyLR's smoothing (HF's StreamingAverage): the mean of the last kWindow metrics, this one
// included, summed as HF sums them (the new value added, then the one leaving subtracted).
FUSEDLR_HD double greedy_smoothed(const double* a, double metric, double* s) {
  using namespace greedy_slot;
  const int64_t window = as_int(a[greedy_arg::kWindow]);
  int64_t count = as_int(s[kWindowCount]);
  int64_t head = as_int(s[kWindowHead]);
  if (!(count >= 0 && count <= window && head >= 0 && head < window)) {  // not a reachable row: start afresh
    count = 0;
    head = 0;
    s[kWindowSum] = 0.0;
  }
  double* values = s + kFirstValue;
  double sum = s[kWindowSum] + metric;
  if (count < window) {
    values[(head + count) % window] = metric;
    ++count;
  } else {
    sum -= values[head];
    values[head] = metric;
    head = (head + 1) % window;
  }
  s[kWindowSum] = sum;
  s[kWindowCount] = static_cast<double>(count);
  s[kWindowHead] = static_cast<double>(head);
  return sum / static_cast<double>(count);
}

// What one observation did to a GreedyLR group's lr.
enum class GreedyChange : int { kNone, kIncreased, kReduced };

// GreedyLR: one metric observed by a group whose root node is `a`, up to the reset, which needs
// every GreedyLR group's lr (observe_metric).
FUSEDLR_HD GreedyChange greedy_observe(const double* a, double metric, double base_lr, double* s) {
  using namespace greedy_arg;
  const double current = a[kSmooth] != 0 ? greedy_smoothed(a, metric, s) : metric;
  if (s[greedy_slot::kCooldownCounter] > 0 || s[greedy_slot::kWarmupCounter] > 0) {
    // observations pass unjudged after a change: the cooldown's after a reduction, then the warmup's
    s[s[greedy_slot::kCooldownCounter] > 0 ? greedy_slot::kCooldownCounter : greedy_slot::kWarmupCounter] -= 1;
    s[greedy_slot::kNumBad] = 0;
    s[greedy_slot::kNumGood] = 0;
    return GreedyChange::kNone;
  }
  const bool mode_max = a[kModeMax] != 0;
  const double best = is_nan(s[greedy_slot::kBest]) ? (mode_max ? -HUGE_VAL : HUGE_VAL) : s[greedy_slot::kBest];
  bool better;
  if (a[kThresholdAbs] != 0) {
    better = mode_max ? current > best + a[kThreshold] : current < best - a[kThreshold];
  } else {
    better = mode_max ? current > best * (1.0 + a[kThreshold]) : current < best * (1.0 - a[kThreshold]);
  }
  if (better) {
    s[greedy_slot::kBest] = current;
    s[greedy_slot::kNumBad] = 0;
    s[greedy_slot::kNumGood] += 1;
  } else {
    s[greedy_slot::kNumBad] += 1;
    s[greedy_slot::kNumGood] = 0;
  }
  const double old_lr = is_nan(s[greedy_slot::kLr]) ? base_lr : s[greedy_slot::kLr];
  if (s[greedy_slot::kNumGood] > a[kPatience]) {
    const double raised = old_lr / a[kFactor];
    const double new_lr = a[kMaxLr] < raised ? a[kMaxLr] : raised;
    if (new_lr - old_lr > a[kEps]) s[greedy_slot::kLr] = new_lr;
    s[greedy_slot::kWarmupCounter] = a[kWarmup];
    s[greedy_slot::kNumGood] = 0;
    s[greedy_slot::kAtMinReductions] = 0;
    return GreedyChange::kIncreased;
  }
  if (s[greedy_slot::kNumBad] > a[kPatience]) {
    const double reduced = old_lr * a[kFactor];
    const double new_lr = a[kMinLr] > reduced ? a[kMinLr] : reduced;
    if (old_lr - new_lr > a[kEps]) s[greedy_slot::kLr] = new_lr;
    s[greedy_slot::kCooldownCounter] = a[kCooldown];
    s[greedy_slot::kNumBad] = 0;
    return GreedyChange::kReduced;
  }
  return GreedyChange::kNone;
}

// GreedyLR's reset, as HF's step leaves it: the base lr, nothing seen, the cooldown just set kept.
FUSEDLR_HD void greedy_reset(double* s, int64_t width) {
  s[greedy_slot::kLr] = NAN;
  s[greedy_slot::kBest] = NAN;
  for (int64_t k = greedy_slot::kNumBad; k < width; ++k) {
    if (k != greedy_slot::kCooldownCounter) s[k] = 0.0;
  }
}

// One metric observed by every group with a metric-driven root schedule: the one loop of the CPU
// op and the CUDA kernel (a single thread: a few groups, and GreedyLR's reset looks at them all,
// as one HF GreedyLR drives all of its optimizer's groups). `state` holds rows of `stride`;
// `reduced` is the caller's scratch, a flag per group.
FUSEDLR_HD void observe_metric(const double* programs, int64_t groups, const double* base_lrs, double metric,
                               double* state, int64_t stride, uint8_t* reduced) {
  bool any_reduced = false;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t node = as_int(programs[g]);
    const auto kind = static_cast<ScheduleKind>(static_cast<int>(programs[node]));
    const double* a = programs + node + kNodeHeader;
    double* s = state + g * stride;
    if (kind == ScheduleKind::kReduceLROnPlateau) plateau_observe(a, metric, base_lrs[g], s);
    reduced[g] = kind == ScheduleKind::kGreedyLR && greedy_observe(a, metric, base_lrs[g], s) == GreedyChange::kReduced;
    any_reduced = any_reduced || reduced[g];
  }
  if (!any_reduced) return;
  bool all_at_min = true;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t node = as_int(programs[g]);
    if (static_cast<ScheduleKind>(static_cast<int>(programs[node])) != ScheduleKind::kGreedyLR) continue;
    const double lr = state[g * stride + greedy_slot::kLr];
    all_at_min = all_at_min && (is_nan(lr) ? base_lrs[g] : lr) <= programs[node + kNodeHeader + greedy_arg::kMinLr];
  }
  if (!all_at_min) return;
  for (int64_t g = 0; g < groups; ++g) {
    if (!reduced[g]) continue;
    const double* a = programs + as_int(programs[g]) + kNodeHeader;
    double* s = state + g * stride;
    s[greedy_slot::kAtMinReductions] += 1;
    if (s[greedy_slot::kAtMinReductions] >= a[greedy_arg::kResetStart]) greedy_reset(s, stride);
  }
}

}  // namespace fusedlr
