#pragma once
// Host-side checks and bookkeeping shared by the CPU and CUDA backends of the step ops.

#include <ATen/ATen.h>

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
  bool low_precision_only = false;  // only bfloat16 and float16 parameters may have it (master weights)
};

using OptionalTensorList = c10::List<std::optional<at::Tensor>>;

// The parameters a step updates: those with a gradient.
struct ActiveTensors {
  std::vector<int64_t> index;          // into the op's lists
  std::vector<const void*> grad_data;  // each gradient in its parameter's layout...
  std::vector<at::Tensor> copies;      // ...copied into it, and kept alive here, where it was not
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
void check_param_tensors(const char* op, at::DeviceType device_type, const at::Device& device, const at::Tensor& param,
                         const std::vector<StateList>& states, const at::Tensor& step, int64_t group, int64_t groups,
                         size_t i);
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

// The schedule programs (every node well formed) and the plateau state of `groups` groups; the
// second form also checks the groups' step counters.
void check_schedule_inputs(const char* op, c10::ArrayRef<double> programs, int64_t groups,
                           const at::Tensor& plateau_state);
void check_schedule_inputs(const char* op, c10::ArrayRef<double> programs, int64_t groups, const at::Tensor& steps,
                           const at::Tensor& plateau_state);

// The dtype of optimizer state for a parameter dtype: float32 for the low-precision types.
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
