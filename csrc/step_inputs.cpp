#include "step_inputs.h"

#include "schedule_math.h"

#include <c10/core/InferenceMode.h>

#include <utility>
#include <vector>

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

// Whether a strided tensor's elements lie inside its storage (a storage can be shrunk under a
// tensor): its last element, by its sizes and strides, is one. (A broadcast gradient, stride 0, may
// have fewer elements in its storage than it has.)
bool fits_storage(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  if (!t.has_storage()) return false;
  uint64_t last = static_cast<uint64_t>(t.storage_offset());
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.stride(d) < 0) return false;
    last += static_cast<uint64_t>(t.size(d) - 1) * static_cast<uint64_t>(t.stride(d));
  }
  return t.storage().nbytes() / t.element_size() > last;
}

// A tensor the kernels can read: a plain tensor with its data in memory. A tensor subclass such as
// DTensor, whose elements live in another tensor (the DTensor's local shard), has none of its
// own: its data pointer is null. (fusedlr's optimizers pass DTensors' local tensors.)
void check_readable(const char* op, const at::Tensor& t, const char* what, size_t index) {
  TORCH_CHECK(!t.key_set().has(c10::DispatchKey::Python), op, ": ", what, " of parameter ", index,
              " is a tensor subclass (such as DTensor) whose data the kernels cannot read; pass its local tensor");
  TORCH_CHECK(!t.is_meta(), op, ": ", what, " of parameter ", index, " is a meta tensor, which has no data");
  TORCH_CHECK(t.numel() == 0 || (t.has_storage() && t.storage().data() != nullptr), op, ": ", what,
              " of parameter ", index, " has no data (a null data pointer)");
}

}  // namespace

namespace {

// 2^53: every integer below it is a double exactly (counts, indices and seeds in doubles).
constexpr double kMaxExactInteger = 9007199254740992.0;

// The number of args of a node of `kind` whose args start at a (the array ends at `end`), after
// checking that its count and the args the table marks are at least 1 (the evaluation divides by
// them or counts with them).
int64_t node_args(const char* op, ScheduleKind kind, const double* a, const double* end) {
  const ScheduleKindInfo& info = kScheduleKinds[static_cast<int>(kind)];
  if (info.count_arg != kNoArg) {
    TORCH_CHECK(a + info.count_arg < end && a[info.count_arg] >= 0 && a[info.count_arg] <= kMaxExactInteger &&
                    a[info.count_arg] == std::floor(a[info.count_arg]),
                op, ": a ", info.name, " schedule program is truncated");
  }
  const int64_t args = node_arg_count(info, a);
  TORCH_CHECK(args >= 0 && a + args <= end, op, ": a schedule program node runs past the programs array");
  for (int i = 0; i < 32; ++i) {
    if (info.at_least_one & (uint32_t{1} << i)) {
      TORCH_CHECK(i < args && a[i] >= 1 && a[i] <= kMaxExactInteger, op, ": a ", info.name, " schedule program has arg ", i,
                  " outside [1, 2^53]");
    }
  }
  if (kind == ScheduleKind::kGreedyLR) {  // its window is part of its row of state: bounded
    TORCH_CHECK(a[greedy_arg::kWindow] <= kMaxGreedyWindow, op, ": a GreedyLR schedule program has a window of ",
                a[greedy_arg::kWindow], ", more than ", kMaxGreedyWindow);
  }
  return args;
}

}  // namespace

void check_programs(const char* op, c10::ArrayRef<double> programs, int64_t groups) {
  TORCH_CHECK(static_cast<int64_t>(programs.size()) >= groups, op, ": programs holds ", programs.size(),
              " values, fewer than the ", groups, " group offsets it must start with");
  // Every node reachable from a root: known kind, steps_per_epoch >= 1, args inside the array, children
  // after their parent, no deeper than the evaluation walks. A malformed program raises here instead
  // of dividing by zero or reading out of bounds in a kernel.
  const double* begin = programs.data();
  const double* end = begin + programs.size();
  std::vector<std::pair<int64_t, int>> pending;
  for (int64_t g = 0; g < groups; ++g) {
    const double offset = programs[g];
    TORCH_CHECK(offset >= groups && offset + kNodeHeader <= static_cast<double>(programs.size()), op,
                ": schedule program of group ", g, " starts outside the programs array");
    pending.emplace_back(as_int(offset), 1);
  }
  while (!pending.empty()) {
    const auto [node, depth] = pending.back();
    pending.pop_back();
    TORCH_CHECK(depth <= kMaxScheduleDepth, op, ": a schedule program nests deeper than ", kMaxScheduleDepth);
    TORCH_CHECK(node >= groups && node + kNodeHeader <= static_cast<int64_t>(programs.size()), op,
                ": a schedule program node lies outside the programs array");
    const double kind = begin[node];
    TORCH_CHECK(kind >= 0 && kind < kScheduleKindCount && kind == static_cast<int>(kind), op,
                ": a schedule program has an unknown node kind ", kind);
    TORCH_CHECK(begin[node + 1] >= 1, op, ": a schedule program has steps_per_epoch < 1");
    const double* a = begin + node + kNodeHeader;
    const auto schedule_kind = static_cast<ScheduleKind>(static_cast<int>(kind));
    node_args(op, schedule_kind, a, end);
    const NodeChildren children = node_children(schedule_kind, a);
    for (int64_t k = 0; k < children.count; ++k) {
      const double child = children.offsets[k];
      TORCH_CHECK(child > node && child < static_cast<double>(programs.size()), op, ": a ",
                  kScheduleKinds[static_cast<int>(kind)].name, " schedule program names a child outside the programs array");
      pending.emplace_back(as_int(child), depth + 1);
    }
  }
}

void check_schedule_inputs(const char* op, c10::ArrayRef<double> programs, int64_t groups,
                           const at::Tensor& plateau_state) {
  check_programs(op, programs, groups);
  const int64_t width = schedule_state_width(programs, groups);
  TORCH_CHECK(plateau_state.scalar_type() == at::kDouble && plateau_state.dim() == 2 &&
                  plateau_state.size(0) == groups && plateau_state.size(1) >= width && plateau_state.is_contiguous(),
              op, ": plateau_state must be a contiguous float64 tensor of ", groups, " rows of at least ", width,
              " (the schedules' state), got ", plateau_state.scalar_type(), " of shape ", plateau_state.sizes());
}

int64_t schedule_state_width(c10::ArrayRef<double> programs, int64_t groups) {
  int64_t width = plateau_slot::kCount;
  for (int64_t g = 0; g < groups; ++g) width = std::max(width, group_state_width(programs, g));
  return width;
}

int64_t group_state_width(c10::ArrayRef<double> programs, int64_t group) {
  const int64_t node = as_int(programs[group]);
  return schedule_state_width(static_cast<ScheduleKind>(static_cast<int>(programs[node])),
                              programs.data() + node + kNodeHeader);
}

std::string schedule_state_problem(c10::ArrayRef<double> programs, int64_t groups, const at::Tensor& state) {
  check_schedule_inputs("fusedlr.schedule_state_problem", programs, groups, state);
  const double* rows = state.const_data_ptr<double>();
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t node = as_int(programs[g]);
    const auto kind = static_cast<ScheduleKind>(static_cast<int>(programs[node]));
    const double* a = programs.data() + node + kNodeHeader;
    const double* s = rows + g * state.size(1);
    auto problem = [&](const char* slot, double value, const char* rule) {
      return c10::str("group ", g, "'s ", kScheduleKinds[static_cast<int>(kind)].name, " state has ", slot, " = ",
                      value, ", which is not ", rule);
    };
    auto count = [](double v) { return v >= 0 && v == std::floor(v) && v < kMaxExactInteger; };
    if (!(is_nan(s[plateau_slot::kLr]) || s[plateau_slot::kLr] >= 0)) return problem("lr", s[0], "an lr >= 0 (or NaN)");
    if (kind == ScheduleKind::kGreedyLR) {
      using namespace greedy_slot;
      for (int k = kNumBad; k <= kAtMinReductions; ++k) {
        if (!count(s[k])) return problem(kGreedySlotNames[k], s[k], "a count");
      }
      if (a[greedy_arg::kSmooth] != 0) {
        const double window = a[greedy_arg::kWindow];
        if (!count(s[kWindowCount]) || s[kWindowCount] > window) {
          return problem("window_count", s[kWindowCount], "a count up to the window_size");
        }
        if (!count(s[kWindowHead]) || s[kWindowHead] >= window) {
          return problem("window_head", s[kWindowHead], "an index into the window");
        }
      }
    } else {
      for (int k = plateau_slot::kNumBad; k < plateau_slot::kCount; ++k) {
        if (!count(s[k])) return problem(kPlateauSlotNames[k], s[k], "a count");
      }
    }
  }
  return "";
}

void check_schedule_inputs(const char* op, c10::ArrayRef<double> programs, int64_t groups, const at::Tensor& steps,
                           const at::Tensor& plateau_state) {
  check_schedule_inputs(op, programs, groups, plateau_state);
  TORCH_CHECK(steps.scalar_type() == at::kLong && steps.dim() == 1 && steps.numel() == groups && steps.is_contiguous(),
              op, ": group_steps must be a contiguous int64 vector of ", groups, " step counters, got ",
              steps.scalar_type(), " of shape ", steps.sizes());
  TORCH_CHECK(plateau_state.device() == steps.device(), op, ": plateau_state is on ", plateau_state.device(),
              " but group_steps on ", steps.device());
}

void check_grad_options(const char* op, const at::Device& device, const GradOptions& options) {
  for (const auto& [name, t] : {std::pair{"grad_scale", &options.grad_scale}, std::pair{"found_inf", &options.found_inf}}) {
    if (!GradOptions::given(*t)) continue;
    const at::Tensor& value = **t;
    TORCH_CHECK(value.numel() == 1 && value.is_floating_point() && value.device() == device, op, ": ", name,
                " must be a one-element floating-point tensor on ", device, ", got ", value.scalar_type(),
                " of shape ", value.sizes(), " on ", value.device());
  }
  if (options.max_grad_norm.has_value()) {
    TORCH_CHECK(*options.max_grad_norm > 0, op, ": max_grad_norm must be > 0, got ", *options.max_grad_norm);
  }
  TORCH_CHECK(options.wants_norm() || (!options.max_grad_norm.has_value() && !options.skip_nonfinite), op,
              ": max_grad_norm and skip_nonfinite need a grad_norm tensor to write the norm to");
  if (options.wants_norm()) {
    const at::Tensor& norm = *options.grad_norm;
    TORCH_CHECK(norm.numel() == 1 && norm.scalar_type() == at::kDouble && norm.device() == device, op,
                ": grad_norm must be a one-element float64 tensor on ", device, ", got ", norm.scalar_type(),
                " of shape ", norm.sizes(), " on ", norm.device());
  }
}

int64_t check_step_lists(const char* op, at::DeviceType device_type, size_t params, size_t grads,
                         const std::vector<StateList>& states, at::TensorList steps, at::IntArrayRef tensor_group,
                         c10::ArrayRef<double> hyper, int64_t hyper_slots, c10::ArrayRef<double> programs,
                         const at::Tensor& group_steps, const at::Tensor& plateau_state) {
  TORCH_CHECK(hyper.size() % hyper_slots == 0, op, ": hyper holds ", hyper.size(), " values, not a multiple of ",
              hyper_slots, " per group");
  const int64_t groups = static_cast<int64_t>(hyper.size()) / hyper_slots;
  // the common slots, last in each group's (optimizer_traits.h): the kernels convert the seed to
  // an integer, which a double outside [0, 2^53) or with a fraction does not survive
  for (int64_t g = 0; g < groups; ++g) {
    const double* common = hyper.data() + (g + 1) * hyper_slots - CommonSlot::kCount;
    const double stochastic = common[CommonSlot::kStochasticRounding];
    const double seed = common[CommonSlot::kRoundingSeed];
    TORCH_CHECK(stochastic == 0 || stochastic == 1, op, ": group ", g, "'s stochastic_rounding slot is ", stochastic,
                ", not 0 or 1");
    TORCH_CHECK(seed >= 0 && seed < kMaxExactInteger && seed == std::floor(seed), op, ": group ", g,
                "'s rounding seed is ", seed, ", not an integer in [0, 2^53)");
  }
  check_schedule_inputs(op, programs, groups, group_steps, plateau_state);
  TORCH_CHECK(group_steps.device().type() == device_type, op, ": group_steps is on ", group_steps.device());
  auto check_length = [&](const char* name, size_t length) {
    TORCH_CHECK(length == params, op, ": ", name, " has ", length, " entries but params has ", params);
  };
  check_length("grads", grads);
  check_length("steps", steps.size());
  check_length("tensor_group", tensor_group.size());
  for (const StateList& state : states) check_length(state.name, state.tensors.size());
  return groups;
}

TensorStorage check_param_tensors(const char* op, at::DeviceType device_type, const at::Device& device,
                                  const at::Tensor& param, const std::vector<StateList>& states, const at::Tensor& step,
                                  int64_t group, int64_t groups, size_t i) {
  TORCH_CHECK(group >= 0 && group < groups, op, ": tensor_group", " of parameter ", i, " is ", group, ", outside [0, ",
              groups, ")");
  check_on_device(op, param, device_type, device, "the tensor", i);
  TORCH_CHECK(!param.is_complex(), op, ": complex parameter ", i, " is not supported");
  TORCH_CHECK(param.layout() == at::kStrided && param.is_non_overlapping_and_dense() && !param.is_neg(), op,
              ": parameter ", i, " must be a dense tensor (no overlapping, strided or negative views)");
  check_readable(op, param, "the tensor", i);
  TORCH_CHECK(!param.is_inference() || c10::InferenceMode::is_enabled(), op, ": parameter ", i,
              " is an inference tensor, which can be updated in place only in inference mode");
  TORCH_CHECK(fits_storage(param), op, ": parameter ", i, " lies outside its storage");
  TORCH_CHECK(is_supported_param_dtype(param.scalar_type()), op, ": parameter ", i, " has dtype ", param.scalar_type(),
              "; supported are float32, float64, bfloat16 and float16");
  // The optimizer's state: all in the math type, or all in bfloat16 where the math type is float32.
  const at::ScalarType math_type = state_dtype(param.scalar_type());
  std::optional<at::ScalarType> state_type;
  TensorStorage storage;
  for (const StateList& state : states) {
    const at::Tensor& s = state.tensors[i];
    if (state.optional && s.numel() == 0) continue;  // absent (or nothing to hold)
    check_readable(op, s, state.name, i);
    const at::ScalarType dtype = param.scalar_type();
    TORCH_CHECK(!state.master || dtype == at::kBFloat16 || dtype == at::kHalf, op, ": ", state.name, " of parameter ",
                i, " is given, but only bfloat16 and float16 parameters take one (the parameter is ", dtype, ")");
    check_on_device(op, s, device_type, device, state.name, i);
    if (state.master) {
      const bool remainder = s.scalar_type() == at::kShort;
      TORCH_CHECK(s.scalar_type() == at::kFloat || (remainder && dtype == at::kBFloat16), op, ": ", state.name,
                  " of parameter ", i, " has dtype ", s.scalar_type(), ", expected float32",
                  dtype == at::kBFloat16 ? " (a master weight) or int16 (a remainder)" : "");
      storage.master = remainder ? MasterKind::kRemainder : MasterKind::kFloat;
    } else {
      const bool low = math_type == at::kFloat && (s.scalar_type() == at::kBFloat16 || s.scalar_type() == at::kByte);
      TORCH_CHECK(s.scalar_type() == math_type || low, op, ": ", state.name, " of parameter ", i, " has dtype ",
                  s.scalar_type(), ", expected ", math_type,
                  math_type == at::kFloat ? ", bfloat16 or uint8 (8-bit state)" : "");
      TORCH_CHECK(!state_type.has_value() || *state_type == s.scalar_type(), op, ": ", state.name, " of parameter ",
                  i, " has dtype ", s.scalar_type(), " but its other state ", *state_type,
                  "; a parameter's optimizer state has one dtype");
      state_type = s.scalar_type();
      storage.bfloat16_state = s.scalar_type() == at::kBFloat16;
      storage.mx_state = s.scalar_type() == at::kByte;
    }
    if (s.scalar_type() == at::kByte && !state.master) {
      // [note: 8-bit state]: the codes of the parameter's elements in memory order, then the scales
      TORCH_CHECK(s.dim() == 1 && s.is_contiguous() && s.numel() == mx_bytes(param.numel()), op, ": ", state.name,
                  " of parameter ", i, " is 8-bit state, which must be a contiguous 1-D uint8 tensor of ",
                  mx_bytes(param.numel()), " bytes (", param.numel(), " codes and ", mx_blocks(param.numel()),
                  " block scales), got shape ", s.sizes(), " and strides ", s.strides());
      TORCH_CHECK(fits_storage(s), op, ": ", state.name, " of parameter ", i, " lies outside its storage");
      continue;
    }
    TORCH_CHECK(s.sizes() == param.sizes() && s.strides() == param.strides(), op, ": ", state.name, " of parameter ", i,
                " has shape ", s.sizes(), " and strides ", s.strides(), " but the parameter has shape ", param.sizes(),
                " and strides ", param.strides(), " (a state_dict from a different parameter layout?)");
    TORCH_CHECK(fits_storage(s), op, ": ", state.name, " of parameter ", i, " lies outside its storage");
  }
  check_readable(op, step, "the step counter", i);
  check_on_device(op, step, device_type, device, "the step counter", i);
  TORCH_CHECK(step.scalar_type() == at::kLong && step.numel() == 1, op, ": the step counter", " of parameter ", i,
              " must be a one-element int64 tensor, got ", step.scalar_type(), " of shape ", step.sizes());
  TORCH_CHECK(fits_storage(step), op, ": the step counter of parameter ", i, " lies outside its storage");
  return storage;
}

const void* checked_grad_data(const char* op, at::DeviceType device_type, const at::Device& device,
                              const at::Tensor& param, const at::Tensor& grad, size_t i,
                              std::vector<at::Tensor>& copies) {
  check_on_device(op, grad, device_type, device, "the gradient", i);
  TORCH_CHECK(!grad.is_complex(), op, ": the complex gradient of parameter ", i, " is not supported");
  TORCH_CHECK(grad.layout() == at::kStrided, op, ": the gradient", " of parameter ", i, " is sparse (", grad.layout(),
              "); fusedlr optimizers take dense gradients only");
  check_readable(op, grad, "the gradient", i);
  TORCH_CHECK(grad.scalar_type() == param.scalar_type(), op, ": the gradient", " of parameter ", i, " has dtype ",
              grad.scalar_type(), " but the parameter ", param.scalar_type());
  TORCH_CHECK(grad.sizes() == param.sizes(), op, ": the gradient", " of parameter ", i, " has shape ", grad.sizes(),
              " but the parameter ", param.sizes());
  TORCH_CHECK(fits_storage(grad), op, ": the gradient of parameter ", i, " lies outside its storage");
  if (grad.strides() == param.strides() && !grad.is_neg()) return grad.const_data_ptr();
  copies.push_back(at::empty_like(param).copy_(grad));
  return copies.back().const_data_ptr();
}

ActiveTensors check_step_inputs(const char* op, at::DeviceType device_type, at::TensorList params,
                                const OptionalTensorList& grads, const std::vector<StateList>& states,
                                at::TensorList steps, at::IntArrayRef tensor_group, c10::ArrayRef<double> hyper,
                                int64_t hyper_slots, c10::ArrayRef<double> programs, const at::Tensor& group_steps,
                                const at::Tensor& plateau_state) {
  const size_t n = params.size();
  const int64_t groups = check_step_lists(op, device_type, n, grads.size(), states, steps, tensor_group, hyper,
                                          hyper_slots, programs, group_steps, plateau_state);
  const at::Device device = group_steps.device();
  ActiveTensors active;
  active.index.reserve(n);
  active.grad_data.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const std::optional<at::Tensor> maybe_grad = grads[i];
    if (!maybe_grad.has_value() || !maybe_grad->defined()) continue;
    active.storage.push_back(
        check_param_tensors(op, device_type, device, params[i], states, steps[i], tensor_group[i], groups, i));
    active.index.push_back(static_cast<int64_t>(i));
    active.grad_data.push_back(checked_grad_data(op, device_type, device, params[i], *maybe_grad, i, active.copies));
  }
  return active;
}

void bump_versions(const ActiveTensors& active, at::TensorList params) {
  for (const int64_t i : active.index) params[i].unsafeGetTensorImpl()->bump_version();
}

}  // namespace fusedlr
