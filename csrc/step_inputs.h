#pragma once
// Host-side checks and bookkeeping shared by the CPU and CUDA backends of the step ops.

#include <ATen/ATen.h>

#include "optimizer_traits.h"
#include "storage_math.h"

#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace fusedlr {

// One per-parameter list of optimizer state passed to a step op. Optional lists hold an empty
// tensor for a parameter that has no such state (no momentum buffer, not amsgrad).
struct StateList {
  const char* name;
  at::TensorList tensors;
  bool optional;
  bool master = false;  // the master weights: float32, or int16 remainders of bfloat16 parameters
};

// How a parameter's tensors are stored (storage_math.h, [note: storage]), as its checks found them.
struct TensorStorage {
  bool bfloat16_state = false;  // its optimizer state is bfloat16, not its math type
  bool mx_state = false;        // its optimizer state is 8-bit ([note: 8-bit state]): uint8 codes and scales
  MasterKind master = MasterKind::kNone;
};

using OptionalTensorList = c10::List<std::optional<at::Tensor>>;

// The parameters a step updates: those with a gradient.
struct ActiveTensors {
  std::vector<int64_t> index;          // into the op's lists
  std::vector<const void*> grad_data;  // each gradient in its parameter's layout...
  std::vector<at::Tensor> copies;      // ...copied into it, and kept alive here, where it was not
  std::vector<TensorStorage> storage;
};

// Everything a step op checks before it touches anything. A failed check raises, and leaves every
// tensor of the call as it was.
ActiveTensors check_step_inputs(const char* op, at::DeviceType device_type, at::TensorList params,
                                const OptionalTensorList& grads, const std::vector<StateList>& states,
                                at::TensorList steps, at::IntArrayRef tensor_group, c10::ArrayRef<double> hyper,
                                int64_t hyper_slots, c10::ArrayRef<double> programs, const at::Tensor& group_steps,
                                const at::Tensor& plateau_state);

// The parts of check_step_inputs, for a caller that checks the optimizer's own tensors once and the
// gradients at every step (cpu/prepared_step.h). check_step_lists returns the number of groups.
int64_t check_step_lists(const char* op, at::DeviceType device_type, size_t params, size_t grads,
                         const std::vector<StateList>& states, at::TensorList steps, at::IntArrayRef tensor_group,
                         c10::ArrayRef<double> hyper, int64_t hyper_slots, c10::ArrayRef<double> programs,
                         const at::Tensor& group_steps, const at::Tensor& plateau_state);
TensorStorage check_param_tensors(const char* op, at::DeviceType device_type, const at::Device& device,
                                  const at::Tensor& param, const std::vector<StateList>& states, const at::Tensor& step,
                                  int64_t group, int64_t groups, size_t i);
// The gradient's data in its parameter's layout: the gradient's own, or a copy kept in `copies`.
const void* checked_grad_data(const char* op, at::DeviceType device_type, const at::Device& device,
                              const at::Tensor& param, const at::Tensor& grad, size_t i,
                              std::vector<at::Tensor>& copies);

// The optional inputs of a step that act on its gradients: AMP (ops.cpp, [note: amp]) and the global
// norm (ops.cpp, [note: norm and master weights]).
struct GradOptions {
  const std::optional<at::Tensor>& grad_scale;
  const std::optional<at::Tensor>& found_inf;
  std::optional<double> max_grad_norm;
  bool skip_nonfinite;
  const std::optional<at::Tensor>& grad_norm;

  static bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }
  bool wants_norm() const { return given(grad_norm); }
};

void check_grad_options(const char* op, const at::Device& device, const GradOptions& options);

// The schedule programs of `groups` groups: every node well formed.
void check_programs(const char* op, c10::ArrayRef<double> programs, int64_t groups);

// The schedule programs and the plateau state of `groups` groups; the second form also checks the
// groups' step counters.
void check_schedule_inputs(const char* op, c10::ArrayRef<double> programs, int64_t groups,
                           const at::Tensor& plateau_state);
void check_schedule_inputs(const char* op, c10::ArrayRef<double> programs, int64_t groups, const at::Tensor& steps,
                           const at::Tensor& plateau_state);

// The row of schedule state ([note: schedule state], schedule_math.h) that group `group`'s schedule
// needs, and the widest of all groups' (at least plateau_slot::kCount); the programs checked first.
int64_t group_state_width(c10::ArrayRef<double> programs, int64_t group);
int64_t schedule_state_width(c10::ArrayRef<double> programs, int64_t groups);

// Empty when every group's row of `state` is one its schedule can reach (counts whole and >= 0, the
// window's indices inside it), else what is wrong, naming the group and slot: for a state loaded
// from a checkpoint, before it replaces the optimizer's.
std::string schedule_state_problem(c10::ArrayRef<double> programs, int64_t groups, const at::Tensor& state);

// The dtype of optimizer state for a parameter dtype: float32 for the low-precision types. State may
// also be bfloat16 where this is float32 ([note: storage]).
at::ScalarType state_dtype(at::ScalarType param_dtype);

// Bumps the version counters of the parameters a step updates (ops.cpp, [note: no autograd]).
void bump_versions(const ActiveTensors& active, at::TensorList params);

template <typename Param, typename Math>
struct TypePair {
  using param_t = Param;
  using math_t = Math;
};

// Calls fn(TypePair<param type, math type>{}) for a parameter dtype that check_step_inputs accepted.
template <typename Fn>
void dispatch_param_dtype(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kDouble: fn(TypePair<double, double>{}); break;
    case at::kFloat: fn(TypePair<float, float>{}); break;
    case at::kBFloat16: fn(TypePair<at::BFloat16, float>{}); break;
    case at::kHalf: fn(TypePair<at::Half, float>{}); break;
    default: TORCH_CHECK(false, "fusedlr: unsupported parameter dtype ", dtype);
  }
}

// Calls fn(Storage<...>{}) (storage_math.h) for a parameter of `dtype` whose tensors check_param_tensors
// found stored as `storage`, rounding stochastically where `stochastic` and something rounds: one
// instance per storage that can occur.
template <typename Fn>
void dispatch_storage(at::ScalarType dtype, TensorStorage storage, bool stochastic, Fn&& fn) {
  dispatch_param_dtype(dtype, [&](auto types) {
    using Types = decltype(types);
    using param_t = typename Types::param_t;
    using math_t = typename Types::math_t;
    auto with_state = [&](auto state_tag) {
      using state_t = typename decltype(state_tag)::type;
      auto with_master = [&](auto master_tag) {
        constexpr MasterKind kMaster = decltype(master_tag)::value;
        using Nearest = Storage<param_t, math_t, state_t, kMaster, false>;
        using Stochastic = Storage<param_t, math_t, state_t, kMaster, true>;
        if constexpr (Stochastic::kStochasticParam || Stochastic::kStochasticState) {
          if (stochastic) {
            fn(Stochastic{});
            return;
          }
        }
        fn(Nearest{});
      };
      using None = std::integral_constant<MasterKind, MasterKind::kNone>;
      using Float = std::integral_constant<MasterKind, MasterKind::kFloat>;
      using Remainder = std::integral_constant<MasterKind, MasterKind::kRemainder>;
      if constexpr (std::is_same_v<param_t, c10::BFloat16>) {
        switch (storage.master) {
          case MasterKind::kNone: with_master(None{}); break;
          case MasterKind::kFloat: with_master(Float{}); break;
          case MasterKind::kRemainder: with_master(Remainder{}); break;
        }
      } else if constexpr (std::is_same_v<param_t, c10::Half>) {
        TORCH_CHECK(storage.master != MasterKind::kRemainder, "fusedlr: remainders complete bfloat16 parameters only");
        if (storage.master == MasterKind::kFloat) {
          with_master(Float{});
        } else {
          with_master(None{});
        }
      } else {
        with_master(None{});
      }
    };
    if constexpr (std::is_same_v<math_t, float>) {
      if (storage.bfloat16_state) {
        with_state(TypeTag<c10::BFloat16>{});
        return;
      }
      if (storage.mx_state) {
        with_state(TypeTag<Mx8State>{});
        return;
      }
    }
    with_state(TypeTag<math_t>{});
  });
}

// Calls fn(std::bool_constant<flag>{}): turns a runtime flag into a template argument.
template <typename Fn>
void dispatch_bool(bool flag, Fn&& fn) {
  if (flag) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

}  // namespace fusedlr
