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
    case ScheduleKind::kReduceLROnPlateau: {
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

}  // namespace fusedlr
