#pragma once
// The host side of the CUDA step: checks, the launch tables and the order of the kernels, for any
// Launcher, the thing that runs a kernel on a grid:
//
//   struct Launcher {
//     static constexpr at::DeviceType kDeviceType;  // where the tensors of a call must be
//     explicit Launcher(const at::Device&);         // the device (guard) the kernels run on
//     int multiprocessors() const;
//     template <typename... Params, typename... Args>
//     void operator()(void (*kernel)(Params...), int blocks, int threads, const Args&... args) const;
//   };
//
// fused_step_cuda.cu launches on the current CUDA stream; csrc/emulation/emulated_ops.cpp runs the
// same kernels on the CPU ([note: emulated blocks]).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <vector>

#include "../optimizers.h"
#include "../schedule_math.h"
#include "../step_inputs.h"
#include "../step_op.h"
#include "step_kernels.cuh"

namespace fusedlr {
namespace cuda_step {

inline void check_capacity(const char* op, int64_t groups, c10::ArrayRef<double> programs) {
  TORCH_CHECK(groups <= kMaxGroups, op, ": the CUDA kernels take at most ", kMaxGroups, " param groups, got ",
              groups);
  TORCH_CHECK(programs.size() <= static_cast<size_t>(kMaxProgram), op,
              ": the CUDA kernels take schedule programs of at most ", kMaxProgram, " values, got ", programs.size(),
              " (groups that share one schedule object share its program)");
}

inline void fill_programs(double* out, c10::ArrayRef<double> programs) {
  for (int k = 0; k < kMaxProgram; ++k) out[k] = k < static_cast<int>(programs.size()) ? programs[k] : 0.0;
}

// The gradient options of a step on the device: the AMP inputs in double, as the CPU reads them (a
// conversion, if any, is a device op, not a sync), and the norm tensor.
struct DeviceGradOptions {
  at::Tensor grad_scale, found_inf;  // undefined when absent
  double* grad_norm;                 // null: no norm
  std::optional<double> max_grad_norm;
  bool skip_nonfinite;

  explicit DeviceGradOptions(const GradOptions& o)
      : grad_scale(GradOptions::given(o.grad_scale) ? o.grad_scale->to(at::kDouble).contiguous() : at::Tensor()),
        found_inf(GradOptions::given(o.found_inf) ? o.found_inf->to(at::kDouble).contiguous() : at::Tensor()),
        grad_norm(o.wants_norm() ? o.grad_norm->mutable_data_ptr<double>() : nullptr),
        max_grad_norm(o.max_grad_norm),
        skip_nonfinite(o.skip_nonfinite) {}

  const double* scale_ptr() const { return grad_scale.defined() ? grad_scale.const_data_ptr<double>() : nullptr; }
  const double* inf_ptr() const { return found_inf.defined() ? found_inf.const_data_ptr<double>() : nullptr; }
};

inline GroupTable group_table(c10::ArrayRef<double> hyper, c10::ArrayRef<double> programs, const at::Tensor& group_steps,
                       const at::Tensor& plateau_state, const DeviceGradOptions& options) {
  GroupTable table{};
  for (size_t k = 0; k < hyper.size(); ++k) table.hyper[k] = hyper[k];
  fill_programs(table.programs, programs);
  table.group_steps = group_steps.const_data_ptr<int64_t>();
  table.plateau_state = plateau_state.const_data_ptr<double>();
  table.plateau_stride = plateau_state.size(1);
  table.grad_scale = options.scale_ptr();
  table.found_inf = options.inf_ptr();
  table.grad_norm = options.grad_norm;
  table.clip = options.max_grad_norm.has_value();
  table.max_grad_norm = options.max_grad_norm.value_or(0.0);
  table.skip_nonfinite = options.skip_nonfinite;
  return table;
}

// Whether the schedule of `group` may set the momentum at some step: a OneCycleLR or CyclicLR node
// that cycles it anywhere below the group's root. The momentum a step uses is known on the device
// only, so the host check that a momentum buffer exists must assume it.
inline bool schedule_may_set_momentum(c10::ArrayRef<double> programs, int64_t group) {
  auto value_at = [&](int64_t index) {
    TORCH_CHECK(index >= 0 && index < static_cast<int64_t>(programs.size()),
                "fusedlr: malformed schedule program of group ", group);
    return programs[index];
  };
  std::vector<int64_t> pending{as_int(value_at(group))};
  for (int visited = 0; !pending.empty(); ++visited) {
    TORCH_CHECK(visited < kMaxProgram, "fusedlr: malformed schedule program of group ", group);
    const int64_t node = pending.back();
    pending.pop_back();
    const int64_t args = node + kNodeHeader;
    const double kind = value_at(node);
    TORCH_CHECK(kind >= 0 && kind < kScheduleKindCount, "fusedlr: malformed schedule program of group ", group);
    const ScheduleKindInfo& info = kScheduleKinds[static_cast<int>(kind)];
    if (info.momentum_flag_arg != kNoArg && value_at(args + info.momentum_flag_arg) != 0) return true;
    const NodeChildren children = node_children(static_cast<ScheduleKind>(static_cast<int>(kind)), programs.data() + args);
    for (int64_t k = 0; k < children.count; ++k) pending.push_back(as_int(value_at(children.offsets - programs.data() + k)));
  }
  return false;
}


inline void* data_or_null(const at::Tensor& t) {
  return t.numel() == 0 ? nullptr : t.mutable_data_ptr();
}

// A launch updates tensors of one dtype and storage ([note: storage]) with one kernel instance.
template <typename Args>
struct Launch {
  at::ScalarType dtype;
  TensorStorage storage;
  bool stochastic;
  Args args;
};

// What a step launches: the active tensors by dtype and storage, each kind in tables of at most the
// table's capacity, and the norm's per-chunk sums where the step computes the norm. Planned in full
// before any kernel runs, so that nothing fails once one has.
template <typename Args>
struct StepPlan {
  std::vector<Launch<Args>> launches;
  at::Tensor partial;  // undefined: no norm

  static int32_t chunks_of(const Launch<Args>& launch) {
    const auto& t = launch.args.tensors;
    return t.chunk_end[t.count - 1];
  }
};

// The kind of launch a tensor joins: its dtype, its storage and whether its group rounds
// stochastically, as one number below kLaunchKinds (kinds in ascending order give the launches'
// order).
constexpr int kLaunchKinds = 4 * 3 * 3 * 2;

inline int launch_kind(at::ScalarType dtype, TensorStorage storage, bool stochastic) {
  int d = 0;
  switch (dtype) {
    case at::kFloat: d = 0; break;
    case at::kBFloat16: d = 1; break;
    case at::kHalf: d = 2; break;
    default: d = 3; break;
  }
  const int state = storage.mx_state ? 2 : storage.bfloat16_state ? 1 : 0;
  return ((d * 3 + state) * 3 + static_cast<int>(storage.master)) * 2 + stochastic;
}

template <typename Args, size_t kStates>
StepPlan<Args> plan_step(const ActiveTensors& active, at::TensorList params,
                         const std::array<at::TensorList, kStates>& states, at::TensorList steps,
                         at::IntArrayRef tensor_group, const GroupTable& groups, const at::Tensor& group_steps,
                         const std::vector<char>& group_stochastic) {
  constexpr int kCapacity = decltype(Args::tensors)::capacity;
  StepPlan<Args> plan;
  auto& launches = plan.launches;
  launches.reserve(active.index.size() / kCapacity + 4);
  // each kind's tensors in order, one pass over the tensors per kind present (usually one or two)
  std::vector<int8_t> kinds(active.index.size());
  std::array<bool, kLaunchKinds> present{};
  for (size_t j = 0; j < active.index.size(); ++j) {
    const int64_t i = active.index[j];
    kinds[j] = static_cast<int8_t>(
        launch_kind(params[i].scalar_type(), active.storage[j], group_stochastic[tensor_group[i]] != 0));
    present[kinds[j]] = true;
  }
  Launch<Args>* launch = nullptr;
  int launch_kind_of = -1;
  for (int kind = 0; kind < kLaunchKinds; ++kind) {
    if (!present[kind]) continue;
    for (size_t j = 0; j < active.index.size(); ++j) {
      if (kinds[j] != kind) continue;
      const int64_t i = active.index[j];
      const at::Tensor& param = params[i];
      if (launch == nullptr || kind != launch_kind_of || launch->args.tensors.count == kCapacity) {
        launches.emplace_back();
        launch = &launches.back();
        launch_kind_of = kind;
        launch->dtype = param.scalar_type();
        launch->storage = active.storage[j];
        launch->stochastic = group_stochastic[tensor_group[i]] != 0;
        launch->args.groups = groups;
        launch->args.tensors.count = 0;
      }
      auto& t = launch->args.tensors;
      const int n = t.count++;
      t.index[n] = static_cast<int32_t>(i);
      t.param[n] = data_or_null(param);
      t.grad[n] = active.grad_data[j];
      for (size_t k = 0; k < kStates; ++k) t.state[k][n] = data_or_null(states[k][i]);
      t.step[n] = steps[i].mutable_data_ptr<int64_t>();
      t.numel[n] = param.numel();
      t.group[n] = static_cast<uint8_t>(tensor_group[i]);
      const int32_t chunks = static_cast<int32_t>((param.numel() + kChunkSize - 1) / kChunkSize);
      t.chunk_end[n] = (n == 0 ? 0 : t.chunk_end[n - 1]) + chunks;
    }
  }
  if (groups.grad_norm != nullptr) {
    int64_t total_chunks = 0;
    for (const auto& launch : launches) total_chunks += StepPlan<Args>::chunks_of(launch);
    plan.partial = at::empty({total_chunks}, group_steps.options().dtype(at::kDouble));
  }
  return plan;
}

// Runs a step's plan: the norm kernels where the step computes the norm ([note: norm kernels]),
// each main launch, then the counter kernels ([note: counters]).
template <typename Launcher, typename Args, typename SumKernelOf, typename MainKernelOf>
void run_step(const Launcher& launcher, const StepPlan<Args>& plan, const at::Tensor& group_steps,
              const DeviceGradOptions& options, const SumKernelOf& sum_kernel_of, const MainKernelOf& main_kernel_of) {
  const auto& launches = plan.launches;
  const int multiprocessors = launcher.multiprocessors();
  const at::Tensor& partial_sums = plan.partial;
  if (partial_sums.defined()) {
    double* partial = partial_sums.mutable_data_ptr<double>();
    int32_t first_chunk = 0;
    for (const auto& launch : launches) {
      const int32_t chunks = StepPlan<Args>::chunks_of(launch);
      if (chunks > 0) {
        launcher(sum_kernel_of(launch.dtype), std::min(chunks, multiprocessors * kSumBlocksPerSm), kThreads,
                 launch.args, partial, first_chunk);
      }
      first_chunk += chunks;
    }
    launcher(grad_norm_kernel, 1, kNormThreads, static_cast<const double*>(partial), first_chunk,
             options.scale_ptr(), options.grad_norm);
  }
  for (const auto& launch : launches) {
    const int32_t chunks = StepPlan<Args>::chunks_of(launch);
    if (chunks > 0) {
      launcher(main_kernel_of(launch), std::min(chunks, multiprocessors * kBlocksPerSm), kThreads, launch.args);
    }
  }
  auto advance_counters = [&](const Launch<Args>* launch, bool last) {
    CounterArgs counters{};
    counters.found_inf = options.inf_ptr();
    counters.grad_norm = options.grad_norm;
    counters.skip_nonfinite = options.skip_nonfinite;
    counters.count = launch != nullptr ? launch->args.tensors.count : 0;
    for (int n = 0; n < counters.count; ++n) counters.step[n] = launch->args.tensors.step[n];
    counters.group_steps = last ? group_steps.mutable_data_ptr<int64_t>() : nullptr;
    counters.groups = last ? static_cast<int32_t>(group_steps.numel()) : 0;
    launcher(advance_counters_kernel, 1, kCounterThreads, counters);
  };
  if (launches.empty()) advance_counters(nullptr, true);
  for (size_t l = 0; l < launches.size(); ++l) advance_counters(&launches[l], l + 1 == launches.size());
}

// The kernel instances of a launch's dtype.
template <typename Args>
auto grad_sum_kernel_of(at::ScalarType dtype) {
  using Table = decltype(Args::tensors);
  void (*kernel)(const Args, double*, int32_t) = nullptr;
  dispatch_param_dtype(dtype, [&](auto types) {
    using Types = decltype(types);
    kernel = grad_sum_kernel<Table::states, Table::capacity, typename Types::param_t, typename Types::math_t>;
  });
  return kernel;
}

template <typename Optimizer>
auto step_kernel_of(const Launch<ArgsOf<Optimizer>>& launch) {
  void (*kernel)(const ArgsOf<Optimizer>) = nullptr;
  dispatch_storage(launch.dtype, launch.storage, launch.stochastic,
                   [&](auto storage) { kernel = step_kernel<Optimizer, decltype(storage)>; });
  return kernel;
}

// [note: versions on the device]
// Whether a step is skipped (found_inf, a non-finite norm) is known on the device only, so the
// version counter of every parameter the step may update is bumped when its kernels are
// launched, skipped or not; the CPU does the same (cpu/fused_step_cpu.cpp).
template <typename Optimizer, typename Launcher>
void step(const StepCall<Optimizer>& call) {
  using Args = ArgsOf<Optimizer>;
  static_assert(sizeof(Args) <= kMaxArgBytes, "kernel arguments too large");
  constexpr int kSlots = kHyperSlots<Optimizer>;
  const char* op = step_op_label<Optimizer>();
  const ActiveTensors active =
      check_step_inputs(op, Launcher::kDeviceType, call.params, call.grads, state_lists<Optimizer>(call.states),
                        call.steps, call.tensor_group, call.hyper, kSlots, call.programs, call.group_steps,
                        call.plateau_state);
  const int64_t groups = static_cast<int64_t>(call.hyper.size()) / kSlots;
  check_capacity(op, groups, call.programs);
  // The momentum a step uses is known on the device only: a group's may be nonzero when its
  // setting is or its schedule may cycle it.
  std::vector<int8_t> momentum_nonzero(groups, -1);
  for (const int64_t i : active.index) {
    const int64_t g = call.tensor_group[i];
    if (momentum_nonzero[g] < 0) {
      momentum_nonzero[g] =
          call.hyper[g * kSlots + Optimizer::kMomentumSlot] != 0 || schedule_may_set_momentum(call.programs, g);
    }
    check_needed_states<Optimizer>(op, call.hyper, g, momentum_nonzero[g] != 0, static_cast<size_t>(i), [&](int k) {
      return call.states[k][i].numel() != 0 || call.params[i].numel() == 0;  // absent: empty (check_param_tensors)
    });
  }
  check_grad_options(op, call.group_steps.device(), call.options);
  const Launcher launcher(call.group_steps.device());
  const DeviceGradOptions device_options(call.options);
  std::vector<char> group_stochastic(groups);
  for (int64_t g = 0; g < groups; ++g) {
    group_stochastic[g] = call.hyper[g * kSlots + kCommonSlots<Optimizer> + CommonSlot::kStochasticRounding] != 0;
  }
  const auto plan = plan_step<Args, kStateLists<Optimizer>>(
      active, call.params, call.states, call.steps, call.tensor_group,
      group_table(call.hyper, call.programs, call.group_steps, call.plateau_state, device_options), call.group_steps,
      group_stochastic);
  bump_versions(active, call.params);
  run_step(launcher, plan, call.group_steps, device_options, grad_sum_kernel_of<Args>, step_kernel_of<Optimizer>);
}

inline ScheduleArgs schedule_args(const char* op, c10::ArrayRef<double> programs, c10::ArrayRef<double> base_lrs,
                                  const at::Tensor& plateau_state) {
  check_capacity(op, static_cast<int64_t>(base_lrs.size()), programs);
  ScheduleArgs args{};
  fill_programs(args.programs, programs);
  for (size_t g = 0; g < base_lrs.size(); ++g) args.base_lrs[g] = base_lrs[g];
  args.groups = static_cast<int32_t>(base_lrs.size());
  args.plateau_stride = plateau_state.size(1);
  return args;
}

template <typename Launcher>
void plateau_observe(const at::Tensor& metric, c10::ArrayRef<double> base_lrs, c10::ArrayRef<double> programs,
                     const at::Tensor& plateau_state) {
  const char* op = "fusedlr.plateau_observe_";
  const int64_t groups = static_cast<int64_t>(base_lrs.size());
  TORCH_CHECK(metric.numel() == 1 && metric.is_floating_point(), op,
              ": the metric must be a one-element floating-point tensor, got ", metric.scalar_type(), " of shape ",
              metric.sizes());
  TORCH_CHECK(plateau_state.device().type() == Launcher::kDeviceType && metric.device() == plateau_state.device(), op,
              ": the metric is on ", metric.device(), " but plateau_state on ", plateau_state.device(),
              "; they must be on one device");
  check_schedule_inputs(op, programs, groups, plateau_state);
  const ScheduleArgs args = schedule_args(op, programs, base_lrs, plateau_state);
  const Launcher launcher(plateau_state.device());
  if (groups == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, metric.scalar_type(), "plateau_observe", [&] {
    launcher(plateau_observe_kernel<scalar_t>, 1, 1, args, metric.const_data_ptr<scalar_t>(),
             plateau_state.mutable_data_ptr<double>());
  });
}

template <typename Launcher>
at::Tensor evaluate_schedules(c10::ArrayRef<double> programs, c10::ArrayRef<double> base_lrs, const at::Tensor& steps,
                              const at::Tensor& plateau_state) {
  const char* op = "fusedlr.evaluate_schedules";
  const int64_t groups = static_cast<int64_t>(base_lrs.size());
  check_schedule_inputs(op, programs, groups, steps, plateau_state);
  const ScheduleArgs args = schedule_args(op, programs, base_lrs, plateau_state);
  const Launcher launcher(plateau_state.device());
  at::Tensor out = at::empty({groups, 3}, plateau_state.options());
  if (groups == 0) return out;
  launcher(evaluate_schedules_kernel, 1, kMaxGroups, args, steps.const_data_ptr<int64_t>(),
           plateau_state.const_data_ptr<double>(), out.mutable_data_ptr<double>());
  return out;
}

}  // namespace cuda_step
}  // namespace fusedlr
