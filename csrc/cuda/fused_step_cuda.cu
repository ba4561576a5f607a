// CUDA kernels of the fusedlr ops.
//
// [note: multi-tensor apply]
// One launch updates up to kSgdCapacity or kAdamCapacity tensors of one dtype, with flags (momentum,
// weight decay, amsgrad) that may differ per tensor: a block picks the template instance of the
// element loop for each chunk, as the CPU kernels do. Everything a launch needs travels by
// value in the kernel arguments (__grid_constant__, read through the constant cache): each group's
// hyperparameters and schedule program, and per tensor its data pointers, size, group and step
// counter. Tensors are cut into chunks of kChunkSize elements; chunk_end[i] counts the chunks of
// tensors 0..i, and a block finds the tensor of its chunk by binary search, grid-striding over all
// chunks of the launch. A block evaluates its group's schedule from the device counters and the
// tensor's scalars in double, as the CPU kernels do, then updates the chunk.
//
// [note: counters]
// Every block reads the step counters; none writes them. After each main launch a one-block
// kernel advances the step counters of that launch's tensors, and the one after the last main
// launch also advances the group counters. Kernels of one stream run in order, so no block can
// see an advanced counter. A model whose tensors share one dtype and fit one table thus takes two
// launches per step; more launches only for more dtypes or tables. There is no host sync
// anywhere, so a step can be captured in a CUDA graph.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../schedule_math.h"
#include "../step_inputs.h"
#include "../update_math.h"

namespace fusedlr {
namespace {

// Capacities of the tables a launch takes by value. A step over more groups or a longer program
// is refused (TORCH_CHECK) before anything changes; more tensors take more launches.
constexpr int kMaxGroups = 32;
constexpr int kMaxProgram = 512;  // doubles of the `programs` argument
constexpr int kMaxHyperSlots = std::max<int>(adam_slot::kCount, sgd_slot::kCount);
constexpr int kSgdCapacity = 448;  // tensors per launch
constexpr int kAdamCapacity = 320;
constexpr size_t kMaxArgBytes = 30000;  // the limit is 32764 (CUDA 12.1+, sm_70+)

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 3;
constexpr int64_t kChunkSize = 65536;  // a multiple of every vector width
constexpr int kCounterThreads = 512;
constexpr int kNormThreads = 512;

// Per-group inputs of a launch.
struct GroupTable {
  double hyper[kMaxGroups * kMaxHyperSlots];
  double programs[kMaxProgram];
  const int64_t* group_steps;
  const double* plateau_state;
  const float* grad_scale;  // null: the gradients are not scaled (ops.cpp, [note: amp])
  const float* found_inf;   // null, or nonzero to skip the step
  const double* grad_norm;  // null: no norm is computed (ops.cpp, [note: norm and master weights])
  double max_grad_norm;
  bool clip;
  bool skip_nonfinite;
};

// Per tensor of a launch; kStates state lists (a momentum buffer; exp_avg, exp_avg_sq, max_exp_avg_sq),
// then the master weight.
template <int kStates, int kCapacity>
struct TensorTable {
  static constexpr int states = kStates;
  static constexpr int capacity = kCapacity;
  void* param[kCapacity];
  const void* grad[kCapacity];
  void* state[kStates][kCapacity];  // null: no such state
  int64_t* step[kCapacity];
  int64_t numel[kCapacity];
  int32_t chunk_end[kCapacity];
  uint8_t group[kCapacity];
  int32_t count;
};

template <int kStates, int kCapacity>
struct StepArgs {
  GroupTable groups;
  TensorTable<kStates, kCapacity> tensors;
};

using SgdArgs = StepArgs<2, kSgdCapacity>;
using AdamArgs = StepArgs<4, kAdamCapacity>;
static_assert(sizeof(SgdArgs) <= kMaxArgBytes && sizeof(AdamArgs) <= kMaxArgBytes, "kernel arguments too large");
static_assert(kMaxGroups <= 256, "group indices are uint8_t");

struct CounterArgs {
  const float* found_inf;
  const double* grad_norm;
  bool skip_nonfinite;
  int64_t* step[kCounterThreads];
  int32_t count;
  int64_t* group_steps;  // null but for the last launch of a step
  int32_t groups;
};
static_assert(kSgdCapacity <= kCounterThreads && kAdamCapacity <= kCounterThreads && kMaxGroups <= kCounterThreads,
              "one counter thread per tensor and per group");

// The schedule arguments of the two schedule ops.
struct ScheduleArgs {
  double programs[kMaxProgram];
  double base_lrs[kMaxGroups];
  int32_t groups;
};

// ---------------------------------------------------------------------------------------------
// Device side

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename V, typename T>
__device__ __forceinline__ bool is_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % alignof(V) == 0;
}

// Calls fn(std::bool_constant<a>{}, std::bool_constant<b>{}): runtime flags, uniform across a block,
// to template arguments.
template <typename Fn>
__device__ __forceinline__ void dispatch_flags(bool a, bool b, const Fn& fn) {
  if (a) {
    if (b) fn(std::true_type{}, std::true_type{});
    else fn(std::true_type{}, std::false_type{});
  } else {
    if (b) fn(std::false_type{}, std::true_type{});
    else fn(std::false_type{}, std::false_type{});
  }
}

constexpr int kMaxStates = 3;  // the update's states; the master weight is apart

// update(param, grad, states) on elements [begin, end) of one tensor, each thread a strided share.
// The first kStates of `state` are read and written. With kMaster the parameter is read from its
// master copy, and both are written (ops.cpp, [note: norm and master weights]). 16-byte accesses of
// the math type (and kVec elements of the parameter type) when every pointer allows them, else one
// element at a time.
template <typename param_t, typename math_t, int kStates, bool kMaster, typename Update>
__device__ __forceinline__ void update_range(param_t* __restrict__ param, const param_t* __restrict__ grad,
                                             math_t* const* state, math_t* __restrict__ master, int64_t begin,
                                             int64_t end, const Update& update) {
  constexpr int kVec = 16 / sizeof(math_t);
  using ParamVec = Vec<param_t, kVec>;
  using StateVec = Vec<math_t, kVec>;
  bool aligned = is_aligned<ParamVec>(param) && is_aligned<ParamVec>(grad);
#pragma unroll
  for (int s = 0; s < kStates; ++s) aligned = aligned && is_aligned<StateVec>(state[s]);
  if (kMaster) aligned = aligned && is_aligned<StateVec>(master);
  int64_t scalar_begin = begin;
  if (aligned) {
    const int64_t vectors = (end - begin) / kVec;
    for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
      const int64_t at = begin + v * kVec;
      ParamVec p;
      StateVec m;
      if (kMaster) m = *reinterpret_cast<const StateVec*>(master + at);
      else p = *reinterpret_cast<const ParamVec*>(param + at);
      const ParamVec g = *reinterpret_cast<const ParamVec*>(grad + at);
      StateVec s[kMaxStates];
#pragma unroll
      for (int k = 0; k < kStates; ++k) s[k] = *reinterpret_cast<const StateVec*>(state[k] + at);
#pragma unroll
      for (int lane = 0; lane < kVec; ++lane) {
        math_t value = kMaster ? m.v[lane] : static_cast<math_t>(p.v[lane]);
        math_t lane_state[kMaxStates];
#pragma unroll
        for (int k = 0; k < kStates; ++k) lane_state[k] = s[k].v[lane];
        update(value, static_cast<math_t>(g.v[lane]), lane_state);
        p.v[lane] = static_cast<param_t>(value);
        if (kMaster) m.v[lane] = value;
#pragma unroll
        for (int k = 0; k < kStates; ++k) s[k].v[lane] = lane_state[k];
      }
      *reinterpret_cast<ParamVec*>(param + at) = p;
      if (kMaster) *reinterpret_cast<StateVec*>(master + at) = m;
#pragma unroll
      for (int k = 0; k < kStates; ++k) *reinterpret_cast<StateVec*>(state[k] + at) = s[k];
    }
    scalar_begin = begin + vectors * kVec;
  }
  for (int64_t e = scalar_begin + threadIdx.x; e < end; e += blockDim.x) {
    math_t value = kMaster ? master[e] : static_cast<math_t>(param[e]);
    math_t lane_state[kMaxStates];
#pragma unroll
    for (int k = 0; k < kStates; ++k) lane_state[k] = state[k][e];
    update(value, static_cast<math_t>(grad[e]), lane_state);
    param[e] = static_cast<param_t>(value);
    if (kMaster) master[e] = value;
#pragma unroll
    for (int k = 0; k < kStates; ++k) state[k][e] = lane_state[k];
  }
}

// Calls fn(std::bool_constant<master>): master weights exist for low-precision parameters only.
template <typename param_t, typename math_t, typename Fn>
__device__ __forceinline__ void dispatch_master(const void* master, const Fn& fn) {
  if constexpr (std::is_same_v<param_t, math_t>) {
    fn(std::false_type{});
  } else {
    if (master != nullptr) fn(std::true_type{});
    else fn(std::false_type{});
  }
}

// The sum of `value` over a block of kBlock threads (a power of two), in a fixed tree; every thread
// gets it. scratch: kBlock doubles of shared memory.
template <int kBlock>
__device__ __forceinline__ double block_sum(double value, double* scratch) {
  scratch[threadIdx.x] = value;
  __syncthreads();
  for (int half = kBlock / 2; half > 0; half /= 2) {
    if (static_cast<int>(threadIdx.x) < half) scratch[threadIdx.x] += scratch[threadIdx.x + half];
    __syncthreads();
  }
  const double total = scratch[0];
  __syncthreads();  // before the scratch is used again
  return total;
}

// The sum of squares of grad[begin, end) in double over the block, in a fixed order: each thread
// its strided share, then a tree in shared memory. The result is valid in thread 0.
template <typename param_t, typename math_t, int kBlock>
__device__ __forceinline__ double block_sum_of_squares(const param_t* __restrict__ grad, int64_t begin, int64_t end,
                                                       double* scratch) {
  constexpr int kVec = 16 / sizeof(param_t);
  using ParamVec = Vec<param_t, kVec>;
  double sum = 0;
  int64_t scalar_begin = begin;
  if (is_aligned<ParamVec>(grad)) {
    const int64_t vectors = (end - begin) / kVec;
    for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
      const ParamVec g = *reinterpret_cast<const ParamVec*>(grad + begin + v * kVec);
#pragma unroll
      for (int lane = 0; lane < kVec; ++lane) {
        const double x = static_cast<double>(static_cast<math_t>(g.v[lane]));
        sum += x * x;
      }
    }
    scalar_begin = begin + vectors * kVec;
  }
  for (int64_t e = scalar_begin + threadIdx.x; e < end; e += blockDim.x) {
    const double x = static_cast<double>(static_cast<math_t>(grad[e]));
    sum += x * x;
  }
  return block_sum<kBlock>(sum, scratch);
}

// Calls fn(tensor, begin, end) for each chunk of the table this block owns.
template <typename Table, typename Fn>
__device__ __forceinline__ void for_each_chunk(const Table& t, const Fn& fn) {
  const int32_t chunks = t.chunk_end[t.count - 1];
  for (int32_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    int lo = 0, hi = t.count - 1;  // the first tensor whose chunk_end exceeds c
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (t.chunk_end[mid] > c) hi = mid;
      else lo = mid + 1;
    }
    const int64_t begin = (c - (lo == 0 ? 0 : t.chunk_end[lo - 1])) * kChunkSize;
    fn(lo, begin, begin + kChunkSize < t.numel[lo] ? begin + kChunkSize : t.numel[lo]);
  }
}

__device__ __forceinline__ ScheduleValue group_schedule(const GroupTable& groups, int group, int slots, int lr_slot) {
  return evaluate_schedule(groups.programs, group, groups.group_steps[group], groups.hyper[group * slots + lr_slot],
                           groups.plateau_state + group * plateau_slot::kCount);
}

// What the step does to its gradients, and whether it is skipped (update_math.h, [note: gradient
// adjustments]), from the device AMP inputs and the norm a previous kernel wrote.
struct StepControl {
  GradAdjust adjust;
  bool skip;
};

__device__ __forceinline__ StepControl step_control(const GroupTable& groups) {
  const double norm = groups.grad_norm != nullptr ? *groups.grad_norm : 0.0;
  StepControl control;
  control.skip = step_skipped(groups.found_inf != nullptr && *groups.found_inf != 0, groups.skip_nonfinite, norm);
  control.adjust.scale = groups.grad_scale != nullptr ? static_cast<double>(*groups.grad_scale) : 1.0;
  control.adjust.clip = groups.clip ? clip_factor(norm, groups.max_grad_norm) : 1.0;
  return control;
}

// [note: scalars per chunk]
// A block evaluates the schedule and the tensor's scalars (double pow and cos) for a chunk only
// when its group or step count differs from the previous chunk's: consecutive tensors of a group
// usually share their step count, so a model of many small tensors pays for them about once per
// block and group.
template <typename param_t, typename math_t>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) sgd_kernel(const __grid_constant__ SgdArgs args) {
  const StepControl control = step_control(args.groups);
  if (control.skip) return;
  const auto& t = args.tensors;
  int scalars_group = -1;
  int64_t scalars_step = -1;
  SgdCoefficients<math_t> c(SgdScalars{});
  bool momentum = false, weight_decay = false;
  for_each_chunk(t, [&](int i, int64_t begin, int64_t end) {
    const int g = t.group[i];
    const int64_t step = *t.step[i];
    if (g != scalars_group || step != scalars_step) {
      const ScheduleValue schedule = group_schedule(args.groups, g, sgd_slot::kCount, sgd_slot::kLr);
      const SgdScalars s = sgd_scalars(args.groups.hyper + g * sgd_slot::kCount, schedule, step, control.adjust);
      c = SgdCoefficients<math_t>(s);
      momentum = s.momentum != 0;
      weight_decay = s.weight_decay != 0;
      scalars_group = g;
      scalars_step = step;
    }
    math_t* const state[kMaxStates] = {momentum ? static_cast<math_t*>(t.state[0][i]) : nullptr};
    math_t* const master = static_cast<math_t*>(t.state[1][i]);
    dispatch_master<param_t, math_t>(master, [&](auto with_master) {
      dispatch_flags(state[0] != nullptr, weight_decay, [&](auto with_momentum, auto with_weight_decay) {
        constexpr bool kMomentum = decltype(with_momentum)::value;
        constexpr bool kWeightDecay = decltype(with_weight_decay)::value;
        update_range<param_t, math_t, kMomentum ? 1 : 0, decltype(with_master)::value>(
            static_cast<param_t*>(t.param[i]), static_cast<const param_t*>(t.grad[i]), state, master, begin, end,
            [&](math_t& p, math_t grad, math_t* st) { sgd_update<math_t, kMomentum, kWeightDecay>(p, grad, st[0], c); });
      });
    });
  });
}

template <typename param_t, typename math_t>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) adam_kernel(const __grid_constant__ AdamArgs args) {
  const StepControl control = step_control(args.groups);
  if (control.skip) return;
  const auto& t = args.tensors;
  int scalars_group = -1;
  int64_t scalars_step = -1;
  AdamCoefficients<math_t> c(AdamScalars{});
  bool amsgrad = false, weight_decay = false;
  for_each_chunk(t, [&](int i, int64_t begin, int64_t end) {
    const int g = t.group[i];
    const int64_t step = *t.step[i] + 1;
    if (g != scalars_group || step != scalars_step) {
      const ScheduleValue schedule = group_schedule(args.groups, g, adam_slot::kCount, adam_slot::kLr);
      const AdamScalars s = adam_scalars(args.groups.hyper + g * adam_slot::kCount, schedule, step, control.adjust);
      c = AdamCoefficients<math_t>(s);
      amsgrad = s.amsgrad;
      weight_decay = s.weight_decay != 0;
      scalars_group = g;
      scalars_step = step;
    }
    math_t* const state[kMaxStates] = {static_cast<math_t*>(t.state[0][i]), static_cast<math_t*>(t.state[1][i]),
                                       static_cast<math_t*>(t.state[2][i])};
    math_t* const master = static_cast<math_t*>(t.state[3][i]);
    dispatch_master<param_t, math_t>(master, [&](auto with_master) {
      dispatch_flags(amsgrad, weight_decay, [&](auto with_amsgrad, auto with_weight_decay) {
        constexpr bool kAmsgrad = decltype(with_amsgrad)::value;
        constexpr bool kWeightDecay = decltype(with_weight_decay)::value;
        update_range<param_t, math_t, kAmsgrad ? 3 : 2, decltype(with_master)::value>(
            static_cast<param_t*>(t.param[i]), static_cast<const param_t*>(t.grad[i]), state, master, begin, end,
            [&](math_t& p, math_t grad, math_t* st) {
              adam_update<math_t, kAmsgrad, kWeightDecay>(p, grad, st[0], st[1], st[2], c);
            });
      });
    });
  });
}

// [note: norm kernels]
// The global norm takes two kernels before the update: each block writes the sum of squares of its
// chunks' gradients to partial[first_chunk + chunk], then one block sums the partials in order and
// writes the norm. The norm is the same from run to run; the update kernels read it from there.
template <int kStates, int kCapacity, typename param_t, typename math_t>
__global__ void __launch_bounds__(kThreads) grad_sum_kernel(const __grid_constant__ StepArgs<kStates, kCapacity> args,
                                                            double* partial, int32_t first_chunk) {
  __shared__ double scratch[kThreads];
  const auto& t = args.tensors;
  const int32_t chunks = t.chunk_end[t.count - 1];
  for (int32_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    int lo = 0, hi = t.count - 1;  // the first tensor whose chunk_end exceeds c
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (t.chunk_end[mid] > c) hi = mid;
      else lo = mid + 1;
    }
    const int64_t begin = (c - (lo == 0 ? 0 : t.chunk_end[lo - 1])) * kChunkSize;
    const int64_t end = begin + kChunkSize < t.numel[lo] ? begin + kChunkSize : t.numel[lo];
    const double sum = block_sum_of_squares<param_t, math_t, kThreads>(static_cast<const param_t*>(t.grad[lo]), begin,
                                                                       end, scratch);
    if (threadIdx.x == 0) partial[first_chunk + c] = sum;
  }
}

__global__ void __launch_bounds__(kNormThreads) grad_norm_kernel(const double* partial, int32_t count,
                                                                 const float* grad_scale, double* grad_norm) {
  __shared__ double scratch[kNormThreads];
  double sum = 0;
  for (int32_t c = threadIdx.x; c < count; c += kNormThreads) sum += partial[c];
  sum = block_sum<kNormThreads>(sum, scratch);
  if (threadIdx.x == 0) *grad_norm = grad_norm_of(sum, grad_scale != nullptr ? static_cast<double>(*grad_scale) : 1.0);
}

__global__ void advance_counters_kernel(const __grid_constant__ CounterArgs args) {
  const double norm = args.grad_norm != nullptr ? *args.grad_norm : 0.0;
  if (step_skipped(args.found_inf != nullptr && *args.found_inf != 0, args.skip_nonfinite, norm)) return;
  const int i = threadIdx.x;
  if (i < args.count) atomicAdd(reinterpret_cast<unsigned long long*>(args.step[i]), 1ULL);
  if (args.group_steps != nullptr && i < args.groups) args.group_steps[i] += 1;
}

template <typename metric_t>
__global__ void plateau_observe_kernel(const __grid_constant__ ScheduleArgs args, const metric_t* metric,
                                       double* plateau_state) {
  const int g = threadIdx.x;
  if (g >= args.groups) return;
  const int64_t node = as_int(args.programs[g]);
  if (static_cast<ScheduleKind>(static_cast<int>(args.programs[node])) != ScheduleKind::kReduceLROnPlateau) return;
  plateau_observe(args.programs + node + kNodeHeader, static_cast<double>(*metric), args.base_lrs[g],
                  plateau_state + g * plateau_slot::kCount);
}

__global__ void evaluate_schedules_kernel(const __grid_constant__ ScheduleArgs args, const int64_t* steps,
                                          const double* plateau_state, double* out) {
  const int g = threadIdx.x;
  if (g >= args.groups) return;
  const ScheduleValue v =
      evaluate_schedule(args.programs, g, steps[g], args.base_lrs[g], plateau_state + g * plateau_slot::kCount);
  out[3 * g] = v.lr;
  out[3 * g + 1] = v.has_momentum ? v.momentum : 0.0;
  out[3 * g + 2] = v.has_momentum ? 1.0 : 0.0;
}

// ---------------------------------------------------------------------------------------------
// Host side

void check_capacity(const char* op, int64_t groups, c10::ArrayRef<double> programs) {
  TORCH_CHECK(groups <= kMaxGroups, op, ": the CUDA kernels take at most ", kMaxGroups, " param groups, got ",
              groups);
  TORCH_CHECK(programs.size() <= static_cast<size_t>(kMaxProgram), op,
              ": the CUDA kernels take schedule programs of at most ", kMaxProgram, " values, got ", programs.size(),
              " (groups that share one schedule object share its program)");
}

void fill_programs(double* out, c10::ArrayRef<double> programs) {
  for (int k = 0; k < kMaxProgram; ++k) out[k] = k < static_cast<int>(programs.size()) ? programs[k] : 0.0;
}

// The gradient options of a step on the device: the AMP inputs as float32 (a conversion, if any, is
// a device op, not a sync) and the norm tensor.
struct DeviceGradOptions {
  at::Tensor grad_scale, found_inf;  // undefined when absent
  double* grad_norm;                 // null: no norm
  std::optional<double> max_grad_norm;
  bool skip_nonfinite;

  explicit DeviceGradOptions(const GradOptions& o)
      : grad_scale(GradOptions::given(o.grad_scale) ? o.grad_scale->to(at::kFloat).contiguous() : at::Tensor()),
        found_inf(GradOptions::given(o.found_inf) ? o.found_inf->to(at::kFloat).contiguous() : at::Tensor()),
        grad_norm(o.wants_norm() ? o.grad_norm->mutable_data_ptr<double>() : nullptr),
        max_grad_norm(o.max_grad_norm),
        skip_nonfinite(o.skip_nonfinite) {}

  const float* scale_ptr() const { return grad_scale.defined() ? grad_scale.const_data_ptr<float>() : nullptr; }
  const float* inf_ptr() const { return found_inf.defined() ? found_inf.const_data_ptr<float>() : nullptr; }
};

GroupTable group_table(c10::ArrayRef<double> hyper, c10::ArrayRef<double> programs, const at::Tensor& group_steps,
                       const at::Tensor& plateau_state, const DeviceGradOptions& options) {
  GroupTable table{};
  for (size_t k = 0; k < hyper.size(); ++k) table.hyper[k] = hyper[k];
  fill_programs(table.programs, programs);
  table.group_steps = group_steps.const_data_ptr<int64_t>();
  table.plateau_state = plateau_state.const_data_ptr<double>();
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
bool schedule_may_set_momentum(c10::ArrayRef<double> programs, int64_t group) {
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
    switch (static_cast<ScheduleKind>(static_cast<int>(value_at(node)))) {
      case ScheduleKind::kOneCycleLR:
        if (value_at(args + one_cycle_arg::kCycleMomentum) != 0) return true;
        break;
      case ScheduleKind::kCyclicLR:
        if (value_at(args + cyclic_arg::kCycleMomentum) != 0) return true;
        break;
      case ScheduleKind::kSequentialLR: {
        const int64_t count = as_int(value_at(args + sequential_arg::kCount));
        const int64_t children = args + sequential_arg::kFirstMilestone + count - 1;
        for (int64_t k = 0; k < count; ++k) pending.push_back(as_int(value_at(children + k)));
        break;
      }
      default:
        break;
    }
  }
  return false;
}

void* data_or_null(const at::Tensor& t) {
  return t.numel() == 0 ? nullptr : t.mutable_data_ptr();
}

int multiprocessors(c10::DeviceIndex device) {
  static std::array<std::atomic<int>, C10_COMPILE_TIME_MAX_GPUS> counts{};
  int count = counts[device].load(std::memory_order_relaxed);
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    counts[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

template <typename Args>
struct Launch {
  at::ScalarType dtype;
  Args args;
};

// The launches of one step: the active tensors by dtype, each dtype in tables of at most the
// table's capacity.
template <typename Args, size_t kStates>
std::vector<Launch<Args>> plan_launches(const ActiveTensors& active, at::TensorList params,
                                        const std::array<at::TensorList, kStates>& states, at::TensorList steps,
                                        at::IntArrayRef tensor_group, const GroupTable& groups) {
  constexpr int kCapacity = decltype(Args::tensors)::capacity;
  std::vector<Launch<Args>> launches;
  launches.reserve(active.index.size() / kCapacity + 4);
  for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble}) {
    Launch<Args>* launch = nullptr;
    for (size_t j = 0; j < active.index.size(); ++j) {
      const int64_t i = active.index[j];
      const at::Tensor& param = params[i];
      if (param.scalar_type() != dtype) continue;
      if (launch == nullptr || launch->args.tensors.count == kCapacity) {
        launches.emplace_back();
        launch = &launches.back();
        launch->dtype = dtype;
        launch->args.groups = groups;
        launch->args.tensors.count = 0;
      }
      auto& t = launch->args.tensors;
      const int n = t.count++;
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
  return launches;
}

// Runs the norm kernels where the step computes the norm ([note: norm kernels]), then each launch
// followed by the kernel advancing its counters (the group counters after the last).
template <typename Args, typename SumKernel, typename MainKernel>
void run_launches(std::vector<Launch<Args>>& launches, const at::Tensor& group_steps,
                  const DeviceGradOptions& options, const SumKernel& sum_kernel, const MainKernel& main_kernel) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int max_blocks = multiprocessors(group_steps.get_device()) * kBlocksPerSm;
  auto chunks_of = [](const Launch<Args>& launch) {
    const auto& t = launch.args.tensors;
    return t.chunk_end[t.count - 1];
  };
  if (options.grad_norm != nullptr) {
    int64_t total_chunks = 0;
    for (const auto& launch : launches) total_chunks += chunks_of(launch);
    const at::Tensor partial = at::empty({total_chunks}, group_steps.options().dtype(at::kDouble));
    int32_t first_chunk = 0;
    for (const auto& launch : launches) {
      const int32_t chunks = chunks_of(launch);
      if (chunks > 0) {
        sum_kernel(launch, std::min(chunks, max_blocks), stream, partial.mutable_data_ptr<double>(), first_chunk);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      first_chunk += chunks;
    }
    grad_norm_kernel<<<1, kNormThreads, 0, stream>>>(partial.const_data_ptr<double>(), first_chunk,
                                                     options.scale_ptr(), options.grad_norm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  CounterArgs counters{};
  counters.found_inf = options.inf_ptr();
  counters.grad_norm = options.grad_norm;
  counters.skip_nonfinite = options.skip_nonfinite;
  if (launches.empty()) {
    counters.group_steps = group_steps.mutable_data_ptr<int64_t>();
    counters.groups = static_cast<int32_t>(group_steps.numel());
    advance_counters_kernel<<<1, kCounterThreads, 0, stream>>>(counters);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  for (size_t l = 0; l < launches.size(); ++l) {
    const auto& t = launches[l].args.tensors;
    const int32_t chunks = chunks_of(launches[l]);
    if (chunks > 0) {
      main_kernel(launches[l], std::min(chunks, max_blocks), stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    counters.count = t.count;
    for (int n = 0; n < t.count; ++n) counters.step[n] = t.step[n];
    const bool last = l + 1 == launches.size();
    counters.group_steps = last ? group_steps.mutable_data_ptr<int64_t>() : nullptr;
    counters.groups = last ? static_cast<int32_t>(group_steps.numel()) : 0;
    advance_counters_kernel<<<1, kCounterThreads, 0, stream>>>(counters);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Launches grad_sum_kernel for the dtype of a launch.
template <typename Args>
void launch_grad_sum(const Launch<Args>& launch, int blocks, cudaStream_t stream, double* partial,
                     int32_t first_chunk) {
  dispatch_param_dtype(launch.dtype, [&](auto types) {
    using Types = decltype(types);
    using Table = decltype(Args::tensors);
    grad_sum_kernel<Table::states, Table::capacity, typename Types::param_t, typename Types::math_t>
        <<<blocks, kThreads, 0, stream>>>(launch.args, partial, first_chunk);
  });
}

void sgd_step_cuda(at::TensorList params, const OptionalTensorList& grads, at::TensorList momentum_buffers,
                   at::TensorList master_weights, at::TensorList steps, at::IntArrayRef tensor_group,
                   c10::ArrayRef<double> hyper, c10::ArrayRef<double> programs, const at::Tensor& group_steps,
                   const at::Tensor& plateau_state, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf, std::optional<double> max_grad_norm,
                   bool skip_nonfinite, const std::optional<at::Tensor>& grad_norm) {
  const char* op = "fusedlr.sgd_step_";
  const ActiveTensors active = check_step_inputs(
      op, at::kCUDA, params, grads,
      sgd_state_lists(momentum_buffers, master_weights), steps,
      tensor_group, hyper, sgd_slot::kCount, programs, group_steps, plateau_state);
  const int64_t groups = static_cast<int64_t>(hyper.size()) / sgd_slot::kCount;
  check_capacity(op, groups, programs);
  std::vector<int8_t> may_use_momentum(groups, -1);
  for (const int64_t i : active.index) {
    const int64_t g = tensor_group[i];
    if (may_use_momentum[g] < 0) {
      may_use_momentum[g] =
          hyper[g * sgd_slot::kCount + sgd_slot::kMomentum] != 0 || schedule_may_set_momentum(programs, g);
    }
    TORCH_CHECK(!may_use_momentum[g] || momentum_buffers[i].numel() == params[i].numel(), op, ": parameter ", i,
                " is in a group with momentum (or a schedule that cycles it) but has no momentum_buffer");
  }
  const GradOptions options{grad_scale, found_inf, max_grad_norm, skip_nonfinite, grad_norm};
  check_grad_options(op, group_steps.device(), options);
  const c10::cuda::CUDAGuard guard(group_steps.device());
  const DeviceGradOptions device_options(options);
  auto launches = plan_launches<SgdArgs, 2>(active, params, {momentum_buffers, master_weights}, steps, tensor_group,
                                            group_table(hyper, programs, group_steps, plateau_state, device_options));
  bump_versions(active, params);
  run_launches(launches, group_steps, device_options, launch_grad_sum<SgdArgs>,
               [](const Launch<SgdArgs>& launch, int blocks, cudaStream_t stream) {
                 dispatch_param_dtype(launch.dtype, [&](auto types) {
                   using Types = decltype(types);
                   sgd_kernel<typename Types::param_t, typename Types::math_t>
                       <<<blocks, kThreads, 0, stream>>>(launch.args);
                 });
               });
}

void adam_step_cuda(at::TensorList params, const OptionalTensorList& grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList master_weights,
                    at::TensorList steps, at::IntArrayRef tensor_group, c10::ArrayRef<double> hyper,
                    c10::ArrayRef<double> programs, const at::Tensor& group_steps, const at::Tensor& plateau_state,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                    std::optional<double> max_grad_norm, bool skip_nonfinite,
                    const std::optional<at::Tensor>& grad_norm) {
  const char* op = "fusedlr.adam_step_";
  const ActiveTensors active = check_step_inputs(
      op, at::kCUDA, params, grads,
      adam_state_lists(exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_weights),
      steps, tensor_group, hyper, adam_slot::kCount, programs, group_steps, plateau_state);
  check_capacity(op, static_cast<int64_t>(hyper.size()) / adam_slot::kCount, programs);
  for (const int64_t i : active.index) {
    const bool amsgrad = hyper[tensor_group[i] * adam_slot::kCount + adam_slot::kAmsgrad] != 0;
    TORCH_CHECK(!amsgrad || max_exp_avg_sqs[i].numel() == params[i].numel(), op, ": parameter ", i,
                " is in an amsgrad group but has no max_exp_avg_sq");
  }
  const GradOptions options{grad_scale, found_inf, max_grad_norm, skip_nonfinite, grad_norm};
  check_grad_options(op, group_steps.device(), options);
  const c10::cuda::CUDAGuard guard(group_steps.device());
  const DeviceGradOptions device_options(options);
  auto launches = plan_launches<AdamArgs, 4>(active, params, {exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_weights},
                                             steps, tensor_group,
                                             group_table(hyper, programs, group_steps, plateau_state, device_options));
  bump_versions(active, params);
  run_launches(launches, group_steps, device_options, launch_grad_sum<AdamArgs>,
               [](const Launch<AdamArgs>& launch, int blocks, cudaStream_t stream) {
                 dispatch_param_dtype(launch.dtype, [&](auto types) {
                   using Types = decltype(types);
                   adam_kernel<typename Types::param_t, typename Types::math_t>
                       <<<blocks, kThreads, 0, stream>>>(launch.args);
                 });
               });
}

ScheduleArgs schedule_args(const char* op, c10::ArrayRef<double> programs, c10::ArrayRef<double> base_lrs) {
  check_capacity(op, static_cast<int64_t>(base_lrs.size()), programs);
  ScheduleArgs args{};
  fill_programs(args.programs, programs);
  for (size_t g = 0; g < base_lrs.size(); ++g) args.base_lrs[g] = base_lrs[g];
  args.groups = static_cast<int32_t>(base_lrs.size());
  return args;
}

void plateau_observe_cuda(const at::Tensor& metric, c10::ArrayRef<double> base_lrs, c10::ArrayRef<double> programs,
                          const at::Tensor& plateau_state) {
  const char* op = "fusedlr.plateau_observe_";
  const int64_t groups = static_cast<int64_t>(base_lrs.size());
  TORCH_CHECK(metric.numel() == 1 && metric.is_floating_point(), op,
              ": the metric must be a one-element floating-point tensor, got ", metric.scalar_type(), " of shape ",
              metric.sizes());
  TORCH_CHECK(plateau_state.is_cuda() && metric.device() == plateau_state.device(), op, ": the metric is on ",
              metric.device(), " but plateau_state on ", plateau_state.device(), "; they must be on one device");
  check_schedule_inputs(op, programs, groups, plateau_state);
  const ScheduleArgs args = schedule_args(op, programs, base_lrs);
  const c10::cuda::CUDAGuard guard(plateau_state.device());
  if (groups == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, metric.scalar_type(), "plateau_observe_cuda", [&] {
    plateau_observe_kernel<scalar_t><<<1, kMaxGroups, 0, c10::cuda::getCurrentCUDAStream()>>>(
        args, metric.const_data_ptr<scalar_t>(), plateau_state.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor evaluate_schedules_cuda(c10::ArrayRef<double> programs, c10::ArrayRef<double> base_lrs,
                                   const at::Tensor& steps, const at::Tensor& plateau_state) {
  const char* op = "fusedlr.evaluate_schedules";
  const int64_t groups = static_cast<int64_t>(base_lrs.size());
  check_schedule_inputs(op, programs, groups, steps, plateau_state);
  const ScheduleArgs args = schedule_args(op, programs, base_lrs);
  const c10::cuda::CUDAGuard guard(plateau_state.device());
  at::Tensor out = at::empty({groups, 3}, plateau_state.options());
  if (groups == 0) return out;
  evaluate_schedules_kernel<<<1, kMaxGroups, 0, c10::cuda::getCurrentCUDAStream()>>>(
      args, steps.const_data_ptr<int64_t>(), plateau_state.const_data_ptr<double>(), out.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedlr, CUDA, m) {
  m.impl("sgd_step_", &sgd_step_cuda);
  m.impl("adam_step_", &adam_step_cuda);
  m.impl("plateau_observe_", &plateau_observe_cuda);
  m.impl("evaluate_schedules", &evaluate_schedules_cuda);
}

// As on the CPU: a sparse gradient routes the call here, and check_step_inputs refuses it.
TORCH_LIBRARY_IMPL(fusedlr, SparseCUDA, m) {
  m.impl("sgd_step_", &sgd_step_cuda);
  m.impl("adam_step_", &adam_step_cuda);
}

TORCH_LIBRARY_IMPL(fusedlr, SparseCsrCUDA, m) {
  m.impl("sgd_step_", &sgd_step_cuda);
  m.impl("adam_step_", &adam_step_cuda);
}

}  // namespace fusedlr
