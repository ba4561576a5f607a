#include "step_inputs.h"

#include "schedule_math.h"

namespace fusedlr {

at::ScalarType state_dtype(at::ScalarType param_dtype) {
  return param_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

namespace {

bool is_supported_param_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf;
}

// `what` of parameter `index` must be on `device`.
void check_on_device(const char* op, const at::Tensor& t, at::DeviceType device_type, const at::Device& device,
                     const char* what, size_t index) {
  TORCH_CHECK(t.device().type() == device_type && t.device() == device, op, ": ", what, " of parameter ", index,
              " is on ", t.device(), " but the optimizer's step counters are on ", device,
              "; all tensors of one optimizer must be on one device");
}

}  // namespace

void check_schedule_inputs(const char* op, c10::ArrayRef<double> programs, int64_t groups, const at::Tensor& steps,
                           const at::Tensor& plateau_state) {
  TORCH_CHECK(static_cast<int64_t>(programs.size()) >= groups, op, ": programs holds ", programs.size(),
              " values, fewer than the ", groups, " group offsets it must start with");
  for (int64_t g = 0; g < groups; ++g) {
    const double offset = programs[g];
    TORCH_CHECK(offset >= groups && offset + kNodeHeader <= static_cast<double>(programs.size()), op,
                ": schedule program of group ", g, " starts outside the programs array");
  }
  TORCH_CHECK(steps.scalar_type() == at::kLong && steps.dim() == 1 && steps.numel() == groups && steps.is_contiguous(),
              op, ": group_steps must be a contiguous int64 vector of ", groups, " step counters, got ",
              steps.scalar_type(), " of shape ", steps.sizes());
  TORCH_CHECK(plateau_state.scalar_type() == at::kDouble && plateau_state.dim() == 2 &&
                  plateau_state.size(0) == groups && plateau_state.size(1) == plateau_slot::kCount &&
                  plateau_state.is_contiguous(),
              op, ": plateau_state must be a contiguous float64 tensor of shape [", groups, ", ", plateau_slot::kCount,
              "], got ", plateau_state.scalar_type(), " of shape ", plateau_state.sizes());
  TORCH_CHECK(plateau_state.device() == steps.device(), op, ": plateau_state is on ", plateau_state.device(),
              " but group_steps on ", steps.device());
}

ActiveTensors check_step_inputs(const char* op, at::DeviceType device_type, at::TensorList params,
                                          const OptionalTensorList& grads, const std::vector<StateList>& states,
                                          at::TensorList steps, at::IntArrayRef tensor_group,
                                          c10::ArrayRef<double> hyper, int64_t hyper_slots,
                                          c10::ArrayRef<double> programs, const at::Tensor& group_steps,
                                          const at::Tensor& plateau_state) {
  const size_t n = params.size();
  TORCH_CHECK(hyper.size() % hyper_slots == 0, op, ": hyper holds ", hyper.size(), " values, not a multiple of ",
              hyper_slots, " per group");
  const int64_t groups = static_cast<int64_t>(hyper.size()) / hyper_slots;
  check_schedule_inputs(op, programs, groups, group_steps, plateau_state);
  TORCH_CHECK(group_steps.device().type() == device_type, op, ": group_steps is on ", group_steps.device());
  const at::Device device = group_steps.device();

  auto check_length = [&](const char* name, size_t length) {
    TORCH_CHECK(length == n, op, ": ", name, " has ", length, " entries but params has ", n);
  };
  check_length("grads", grads.size());
  check_length("steps", steps.size());
  check_length("tensor_group", tensor_group.size());
  for (const StateList& state : states) check_length(state.name, state.tensors.size());

  ActiveTensors active;
  active.index.reserve(n);
  active.grad_data.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const std::optional<at::Tensor> maybe_grad = grads[i];
    if (!maybe_grad.has_value() || !maybe_grad->defined()) continue;
    const at::Tensor& param = params[i];
    const at::Tensor& grad = *maybe_grad;
    TORCH_CHECK(tensor_group[i] >= 0 && tensor_group[i] < groups, op, ": tensor_group", " of parameter ", i, " is ",
                tensor_group[i], ", outside [0, ", groups, ")");
    check_on_device(op, param, device_type, device, "the tensor", i);
    check_on_device(op, grad, device_type, device, "the gradient", i);
    TORCH_CHECK(!param.is_complex() && !grad.is_complex(), op, ": complex parameter or gradient", " of parameter ", i,
                " is not supported");
    TORCH_CHECK(grad.layout() == at::kStrided, op, ": the gradient", " of parameter ", i, " is sparse (", grad.layout(),
                "); fusedlr optimizers take dense gradients only");
    TORCH_CHECK(param.layout() == at::kStrided && param.is_non_overlapping_and_dense(), op, ": parameter ", i,
                " must be a dense tensor (no overlapping or strided views)");
    TORCH_CHECK(is_supported_param_dtype(param.scalar_type()), op, ": parameter ", i, " has dtype ",
                param.scalar_type(), "; supported are float32, float64, bfloat16 and float16");
    TORCH_CHECK(grad.scalar_type() == param.scalar_type(), op, ": the gradient", " of parameter ", i, " has dtype ",
                grad.scalar_type(), " but the parameter ", param.scalar_type());
    TORCH_CHECK(grad.sizes() == param.sizes(), op, ": the gradient", " of parameter ", i, " has shape ", grad.sizes(),
                " but the parameter ", param.sizes());
    const at::ScalarType want_state = state_dtype(param.scalar_type());
    for (const StateList& state : states) {
      const at::Tensor& s = state.tensors[i];
      if (state.optional && s.numel() == 0 && param.numel() != 0) continue;
      check_on_device(op, s, device_type, device, state.name, i);
      TORCH_CHECK(s.scalar_type() == want_state, op, ": ", state.name, " of parameter ", i, " has dtype ", s.scalar_type(),
                  ", expected ", want_state);
      TORCH_CHECK(s.sizes() == param.sizes() && s.strides() == param.strides(), op, ": ", state.name, " of parameter ", i,
                  " has shape ", s.sizes(), " and strides ", s.strides(), " but the parameter has shape ",
                  param.sizes(), " and strides ", param.strides(),
                  " (a state_dict from a different parameter layout?)");
    }
    const at::Tensor& step = steps[i];
    check_on_device(op, step, device_type, device, "the step counter", i);
    TORCH_CHECK(step.scalar_type() == at::kLong && step.numel() == 1, op, ": the step counter", " of parameter ", i,
                " must be a one-element int64 tensor, got ", step.scalar_type(), " of shape ", step.sizes());
    active.index.push_back(static_cast<int64_t>(i));
    if (grad.strides() == param.strides()) {
      active.grad_data.push_back(grad.const_data_ptr());
    } else {
      active.copies.push_back(at::empty_like(param).copy_(grad));
      active.grad_data.push_back(active.copies.back().const_data_ptr());
    }
  }
  return active;
}

void bump_versions(const ActiveTensors& active, at::TensorList params) {
  for (const int64_t i : active.index) params[i].unsafeGetTensorImpl()->bump_version();
}

}  // namespace fusedlr
