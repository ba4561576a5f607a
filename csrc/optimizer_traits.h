#pragma once
// [note: optimizer traits]
// Each optimizer is one struct in csrc/optimizers/ that says all the plumbing needs to know of it,
// next to its update math; the registry (optimizers.h) lists them. The op schemas, the CPU and CUDA
// kernels, the step plans and the descriptors the Python side reads (fusedlr/_ops.py) are derived
// from it, so a new elementwise optimizer is its header and one line in the registry:
//
//   struct Name {
//     static constexpr const char* kName;      // "sgd": the op fusedlr::sgd_step_
//     static constexpr const char* kPlanName;  // its step plan class in fusedlr._C ("SgdPlan")
//     struct Slot { enum : int { kLr, ..., kCount }; };  // hyperparameters per group in `hyper`
//     static constexpr const char* kSlotNames[Slot::kCount];  // their names on the Python side
//     static constexpr int kMomentumSlot;  // the slot a schedule that cycles the momentum replaces
//     struct State { enum : int { ..., kCount }; };  // state lists, optional ones last
//     static constexpr StateSpec kStates[State::kCount];
//     struct Flag { enum : int { ..., kCount }; };  // switches of the element update, per tensor
//     struct Scalars;  // the values of a tensor's step, in double
//     template <typename T> struct Coefficients;  // built from Scalars, in the math type
//     static Scalars scalars(const double* group_hyper, ScheduleValue, int64_t completed_steps, GradAdjust);
//     static FlagValues<Flag::kCount> flags(const Scalars&);
//     template <typename Flags> static constexpr int states_used();  // the leading states an update reads
//     template <typename T, typename Flags>
//     static void update(T& param, T grad, T&... states, const Coefficients<T>&);  // one per state
//     static bool needs_state(int state, const double* group_hyper, bool momentum_nonzero);
//   };
//
// A parameter's state lists hold its math type (float32 for low-precision parameters) or bfloat16
// (storage_math.h, [note: storage]); after the optimizer's own lists every op takes the master
// weights (kMasterWeights: float32 masters or int16 remainders), then the step counters. After the
// optimizer's own slots, every group's `hyper` holds the common slots (CommonSlot). An update is
// elementwise: each state element is read and written by the update of its parameter's element
// only.

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "macros.h"

namespace fusedlr {

struct StateSpec {
  const char* key;          // its key in the optimizer's per-parameter state ("exp_avg")
  const char* list;         // the op argument of the list ("exp_avgs")
  bool optional;            // an empty tensor stands for a parameter that has none
  const char* needed_when;  // for an optional one: when a parameter must have it (for messages)
};

// The master weights of bfloat16 / float16 parameters (ops.cpp, [note: norm and master weights]):
// float32 copies, or the int16 remainders that complete bfloat16 parameters (storage_math.h).
inline constexpr StateSpec kMasterWeights{"master_weight", "master_weights", true, "master_weights is on"};

// The hyperparameter slots every optimizer has after its own: how its tensors round
// (storage_math.h, [note: stochastic rounding]). The seed is an integer below 2^53.
struct CommonSlot {
  enum : int { kStochasticRounding, kRoundingSeed, kCount };
};
inline constexpr const char* kCommonSlotNames[CommonSlot::kCount] = {"stochastic_rounding", "rounding_seed"};

// The slots of an optimizer's groups in `hyper`: its own, then the common ones at kCommonSlots<O>.
template <typename Optimizer>
inline constexpr int kCommonSlots = Optimizer::Slot::kCount;
template <typename Optimizer>
inline constexpr int kHyperSlots = Optimizer::Slot::kCount + CommonSlot::kCount;

// The state lists of an optimizer's op: its own, then the master weights.
template <typename Optimizer>
inline constexpr int kStateLists = Optimizer::State::kCount + 1;

// The flags of a tensor's update, decided at run time, and as template arguments.
template <int kCount>
struct FlagValues {
  bool value[kCount > 0 ? kCount : 1];
};

template <bool... kValues>
struct FlagSet {
  static constexpr bool has(int flag) {
    constexpr bool values[] = {kValues..., false};
    return values[flag];
  }
};

// Calls fn(FlagSet<flags...>{}) for the flags' values: one template instance per combination.
template <int kCount, bool... kDone, typename Fn>
FUSEDLR_HD void dispatch_flags(const FlagValues<kCount>& flags, const Fn& fn) {
  if constexpr (sizeof...(kDone) == kCount) {
    fn(FlagSet<kDone...>{});
  } else if (flags.value[sizeof...(kDone)]) {
    dispatch_flags<kCount, kDone..., true>(flags, fn);
  } else {
    dispatch_flags<kCount, kDone..., false>(flags, fn);
  }
}

template <typename T>
struct TypeTag {
  using type = T;
};

// The registry's type: for_each calls fn(TypeTag<Optimizer>{}) for each, in order.
template <typename... Optimizers>
struct OptimizerList {
  static constexpr int kMaxSlots = std::max({0, kHyperSlots<Optimizers>...});
  static constexpr int kMaxStates = std::max({0, static_cast<int>(Optimizers::State::kCount)...});

  template <typename Fn>
  static void for_each(Fn&& fn) {
    (fn(TypeTag<Optimizers>{}), ...);
  }
};

}  // namespace fusedlr
