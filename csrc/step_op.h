#pragma once
// The step op of an optimizer, derived from its traits (optimizer_traits.h, [note: optimizer
// traits]): its name, its schema, and the adapter from the op's arguments, one tensor list per
// state list, to a StepCall that the kernels of every backend take.

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "optimizer_traits.h"
#include "step_inputs.h"

namespace fusedlr {

// "sgd_step_", and "fusedlr.sgd_step_" for messages.
template <typename Optimizer>
const std::string& step_op_name() {
  static const std::string name = std::string(Optimizer::kName) + "_step_";
  return name;
}

template <typename Optimizer>
const char* step_op_label() {
  static const std::string label = "fusedlr." + step_op_name<Optimizer>();
  return label.c_str();
}

// The state list k of the op (the optimizer's, then the master weights).
template <typename Optimizer>
constexpr const StateSpec& state_spec(int k) {
  return k < Optimizer::State::kCount ? Optimizer::kStates[k] : kMasterWeights;
}

// The schema: every mutated list and tensor with an alias set of its own (Tensor(x!)), no return.
template <typename Optimizer>
std::string step_schema() {
  std::string schema = step_op_name<Optimizer>() + "(";
  char alias = 'a';
  auto mutated = [&](const char* type, const std::string& name) {
    schema += std::string("Tensor(") + alias++ + "!)" + type + " " + name + ", ";
  };
  mutated("[]", "params");
  schema += "Tensor?[] grads, ";
  for (int k = 0; k < kStateLists<Optimizer>; ++k) mutated("[]", state_spec<Optimizer>(k).list);
  mutated("[]", "steps");
  schema += "int[] tensor_group, float[] hyper, float[] programs, ";
  mutated("", "group_steps");
  schema += "Tensor plateau_state, Tensor? grad_scale=None, Tensor? found_inf=None, float? max_grad_norm=None, "
            "bool skip_nonfinite=False, ";
  schema += std::string("Tensor(") + alias + "!)? grad_norm=None) -> ()";
  return schema;
}

// The arguments of one call of a step op.
template <typename Optimizer>
struct StepCall {
  static constexpr int kLists = kStateLists<Optimizer>;
  at::TensorList params;
  const OptionalTensorList& grads;
  std::array<at::TensorList, kLists> states;  // [state list][parameter]
  at::TensorList steps;
  at::IntArrayRef tensor_group;
  c10::ArrayRef<double> hyper, programs;
  const at::Tensor& group_steps;
  const at::Tensor& plateau_state;
  GradOptions options;
};

// The StateLists of the checks (step_inputs.h) for a call's lists.
template <typename Optimizer, typename Lists>
std::vector<StateList> state_lists(const Lists& lists) {
  std::vector<StateList> out;
  for (int k = 0; k < kStateLists<Optimizer>; ++k) {
    const StateSpec& spec = state_spec<Optimizer>(k);
    out.push_back({spec.key, lists[k], spec.optional, k == Optimizer::State::kCount});
  }
  return out;
}

// Raises unless a parameter in `group` has every optional state its settings need: has_state(k)
// says whether it has list k's. momentum_nonzero: whether the step may use a nonzero momentum.
template <typename Optimizer, typename HasState>
void check_needed_states(const char* op, c10::ArrayRef<double> hyper, int64_t group, bool momentum_nonzero,
                         size_t index, const HasState& has_state) {
  const double* group_hyper = hyper.data() + group * kHyperSlots<Optimizer>;
  for (int k = 0; k < Optimizer::State::kCount; ++k) {
    const StateSpec& spec = Optimizer::kStates[k];
    TORCH_CHECK(!spec.optional || has_state(k) || !Optimizer::needs_state(k, group_hyper, momentum_nonzero), op,
                ": parameter ", index, " has no ", spec.key, ", which it needs when ", spec.needed_when);
  }
}

// The op's kernel: StepOp<Optimizer, kRun>::call has the op's signature and hands kRun its StepCall.
template <typename Optimizer, void (*kRun)(const StepCall<Optimizer>&),
          typename Indices = std::make_index_sequence<kStateLists<Optimizer>>>
struct StepOp;

template <typename Optimizer, void (*kRun)(const StepCall<Optimizer>&), size_t... I>
struct StepOp<Optimizer, kRun, std::index_sequence<I...>> {
  template <size_t>
  using List = at::TensorList;

  static void call(at::TensorList params, const OptionalTensorList& grads, List<I>... states, at::TensorList steps,
                   at::IntArrayRef tensor_group, c10::ArrayRef<double> hyper, c10::ArrayRef<double> programs,
                   const at::Tensor& group_steps, const at::Tensor& plateau_state,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                   std::optional<double> max_grad_norm, bool skip_nonfinite,
                   const std::optional<at::Tensor>& grad_norm) {
    kRun(StepCall<Optimizer>{params,
                             grads,
                             {states...},
                             steps,
                             tensor_group,
                             hyper,
                             programs,
                             group_steps,
                             plateau_state,
                             GradOptions{grad_scale, found_inf, max_grad_norm, skip_nonfinite, grad_norm}});
  }
};

// The op's C++ signature, for a typed dispatcher call (python_plan.cpp).
template <typename Optimizer, typename Indices = std::make_index_sequence<kStateLists<Optimizer>>>
struct StepSignature;

template <typename Optimizer, size_t... I>
struct StepSignature<Optimizer, std::index_sequence<I...>> {
  template <size_t>
  using List = at::TensorList;
  using type = void(at::TensorList, const OptionalTensorList&, List<I>..., at::TensorList, at::IntArrayRef,
                    c10::ArrayRef<double>, c10::ArrayRef<double>, const at::Tensor&, const at::Tensor&,
                    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, std::optional<double>, bool,
                    const std::optional<at::Tensor>&);
};

}  // namespace fusedlr
