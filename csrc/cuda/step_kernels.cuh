#pragma once
// The device side of the CUDA step: the tables a launch takes by value and the kernels. nvcc compiles
// it for the GPU (fused_step_cuda.cu); a host compiler, with csrc/emulation/cuda_shim.h included
// first, for the emulation that runs it on the CPU in the test suite. The host side that plans and
// launches the kernels is step_host.h, the same for both.
//
// [note: multi-tensor apply]
// One launch updates up to launch_capacity() tensors of one dtype (as many as the kernel arguments
// hold), with the optimizer's flags (momentum, weight decay, amsgrad) that may differ per tensor: a
// block picks the template instance of the element loop for each chunk, as the CPU kernels do. Everything a launch needs travels by
// value in the kernel arguments (__grid_constant__, read through the constant cache): each group's
// hyperparameters and schedule program, and per tensor its data pointers, size, group and step
// counter. Tensors are cut into chunks of kChunkSize elements; chunk_end[i] counts the chunks of
// tensors 0..i, and a block finds the tensor of its chunk by binary search, grid-striding over all
// chunks of the launch. A block evaluates its group's schedule from the device counters and the
// tensor's scalars in double, as the CPU kernels do, then updates the chunk.
//
// [note: counters]
// Every block reads the step counters; none writes them. After the last main launch of a step, one
// one-block kernel per main launch advances the step counters of that launch's tensors, and the
// last of them also the group counters. Kernels of one stream run in order, so no block sees an
// advanced counter, not even when two launches (two dtypes, or more tensors than a table holds)
// share one: as on the CPU, every count is read before any is advanced. A model whose tensors
// share one dtype and fit one table thus takes two launches per step; more launches only for more
// dtypes or tables. There is no host sync anywhere, so a step can be captured in a CUDA graph.

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "../optimizers.h"
#include "../schedule_math.h"
#include "../storage_math.h"
#include "../update_math.h"

namespace fusedlr {
namespace cuda_step {

// Capacities of the tables a launch takes by value. A step over more groups or a longer program
// is refused (TORCH_CHECK) before anything changes; more tensors take more launches.
constexpr int kMaxGroups = 32;
constexpr int kMaxProgram = 512;  // doubles of the `programs` argument
constexpr int kMaxHyperSlots = Optimizers::kMaxSlots;
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
  int64_t plateau_stride;  // its row width ([note: schedule state])
  // As the CPU reads them: in double (the caller converts them on the device).
  const double* grad_scale;  // null: the gradients are not scaled (ops.cpp, [note: amp])
  const double* found_inf;   // null, or nonzero to skip the step
  const double* grad_norm;  // null: no norm is computed (ops.cpp, [note: norm and master weights])
  double max_grad_norm;
  bool clip;
  bool skip_nonfinite;
};

// Per tensor of a launch; kStates state lists: the optimizer's, then the master weight.
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
  int32_t index[kCapacity];  // the tensor's index in the op's lists (its random bits' key)
  uint8_t group[kCapacity];
  int32_t count;
};

template <int kStates, int kCapacity>
struct StepArgs {
  GroupTable groups;
  TensorTable<kStates, kCapacity> tensors;
};

// The tensors a launch of kStates state lists takes: as many as fit in the kernel arguments,
// rounded down to a multiple of 32, and one counter thread each.
template <int kStates>
constexpr int launch_capacity() {
  constexpr size_t kPerTensor = sizeof(void*) * (kStates + 3) + sizeof(int64_t) + 2 * sizeof(int32_t) + sizeof(uint8_t);
  constexpr size_t kFits = (kMaxArgBytes - sizeof(GroupTable) - 2 * sizeof(int64_t)) / kPerTensor;
  return std::min<int>(static_cast<int>(kFits / 32 * 32), kCounterThreads);
}

template <typename Optimizer>
using ArgsOf = StepArgs<kStateLists<Optimizer>, launch_capacity<kStateLists<Optimizer>>()>;
static_assert(kMaxGroups <= 256, "group indices are uint8_t");
static_assert(kMaxGroups <= kCounterThreads, "one counter thread per group");

struct CounterArgs {
  const double* found_inf;
  const double* grad_norm;
  bool skip_nonfinite;
  int64_t* step[kCounterThreads];
  int32_t count;
  int64_t* group_steps;  // null but for the last launch of a step
  int32_t groups;
};

// The schedule arguments of the two schedule ops.
struct ScheduleArgs {
  double programs[kMaxProgram];
  double base_lrs[kMaxGroups];
  int32_t groups;
  int64_t plateau_stride;  // the row width of plateau_state ([note: schedule state])
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

constexpr int kMaxStates = Optimizers::kMaxStates;  // the update's states; the master weight is apart

// update(param, grad, states) on elements [begin, end) of one tensor, each thread a strided share.
// The first kStates of `state` are read and written, the parameter read from its master weight
// where it has one, each value converted as the tensor's storage S says (storage_math.h, [note:
// storage]). kVec elements at a time (16 bytes of the math type) when every pointer allows it, else
// one element at a time; the random bits of stochastic rounding are those of each element's index.
template <typename S, int kStates, typename Update>
__device__ __forceinline__ void update_range(typename S::param_t* __restrict__ param,
                                             const typename S::param_t* __restrict__ grad,
                                             typename S::state_t* const* state, typename S::master_t* __restrict__ master,
                                             int64_t begin, int64_t end, const uint64_t* keys, const Update& update) {
  using param_t = typename S::param_t;
  using math_t = typename S::math_t;
  using state_t = typename S::state_t;
  using master_t = typename S::master_t;
  constexpr bool kMaster = S::master != MasterKind::kNone;
  constexpr int kVec = 16 / sizeof(math_t);
  using ParamVec = Vec<param_t, kVec>;
  using StateVec = Vec<state_t, kVec>;
  using MasterVec = Vec<master_t, kVec>;
  auto element = [&](param_t& p, master_t& m, param_t g, math_t* lane_state, state_t* stored, int64_t e) {
    math_t value = S::param_value(p, m);
#pragma unroll
    for (int k = 0; k < kStates; ++k) lane_state[k] = S::state_value(stored[k]);
    update(value, math_of<math_t>(g), lane_state);
    S::set_param(p, m, value, S::kStochasticParam ? random_bits(keys[0], e) : 0u);
#pragma unroll
    for (int k = 0; k < kStates; ++k) {
      S::set_state(stored[k], lane_state[k],
                   S::kStochasticState ? state_random_bits(random_bits(keys[state_stream(k)], e), k) : 0u);
    }
  };
  bool aligned = is_aligned<ParamVec>(param) && is_aligned<ParamVec>(grad);
#pragma unroll
  for (int s = 0; s < kStates; ++s) aligned = aligned && is_aligned<StateVec>(state[s]);
  if (kMaster) aligned = aligned && is_aligned<MasterVec>(master);
  int64_t scalar_begin = begin;
  if (aligned) {
    const int64_t vectors = (end - begin) / kVec;
    for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
      const int64_t at = begin + v * kVec;
      ParamVec p = *reinterpret_cast<const ParamVec*>(param + at);
      MasterVec m{};
      if (kMaster) m = *reinterpret_cast<const MasterVec*>(master + at);
      const ParamVec g = *reinterpret_cast<const ParamVec*>(grad + at);
      StateVec s[kMaxStates];
#pragma unroll
      for (int k = 0; k < kStates; ++k) s[k] = *reinterpret_cast<const StateVec*>(state[k] + at);
#pragma unroll
      for (int lane = 0; lane < kVec; ++lane) {
        math_t lane_state[kMaxStates];
        state_t stored[kMaxStates];
#pragma unroll
        for (int k = 0; k < kStates; ++k) stored[k] = s[k].v[lane];
        element(p.v[lane], m.v[lane], g.v[lane], lane_state, stored, at + lane);
#pragma unroll
        for (int k = 0; k < kStates; ++k) s[k].v[lane] = stored[k];
      }
      *reinterpret_cast<ParamVec*>(param + at) = p;
      if (kMaster) *reinterpret_cast<MasterVec*>(master + at) = m;
#pragma unroll
      for (int k = 0; k < kStates; ++k) *reinterpret_cast<StateVec*>(state[k] + at) = s[k];
    }
    scalar_begin = begin + vectors * kVec;
  }
  for (int64_t e = scalar_begin + threadIdx.x; e < end; e += blockDim.x) {
    master_t no_master{};
    master_t& m = kMaster ? master[e] : no_master;
    math_t lane_state[kMaxStates];
    state_t stored[kMaxStates];
#pragma unroll
    for (int k = 0; k < kStates; ++k) stored[k] = state[k][e];
    element(param[e], m, grad[e], lane_state, stored, e);
#pragma unroll
    for (int k = 0; k < kStates; ++k) state[k][e] = stored[k];
  }
}

// update(param, grad, states) on elements [begin, end) of one tensor with 8-bit state ([note:
// 8-bit state]): each thread a strided share of the MX blocks, one block at a time as the CPU loop
// takes it (decode the block's states into float32, update each element as with float32 state,
// encode each state with the block's new scale), so the codes, scales and random bits are the
// CPU's. `begin` is a multiple of kMxBlock (kChunkSize is); `numel` places the scales.
template <typename S, int kStates, typename Update>
__device__ __forceinline__ void update_mx_range(typename S::param_t* __restrict__ param,
                                                const typename S::param_t* __restrict__ grad,
                                                uint8_t* const* codes, typename S::master_t* __restrict__ master,
                                                int64_t begin, int64_t end, int64_t numel, const uint64_t* keys,
                                                const Update& update) {
  using Block = typename S::BlockStorage;
  using master_t = typename S::master_t;
  constexpr bool kMaster = S::master != MasterKind::kNone;
  static_assert(kChunkSize % kMxBlock == 0, "chunks start on 8-bit blocks");
  for (int64_t b = begin + static_cast<int64_t>(threadIdx.x) * kMxBlock; b < end;
       b += static_cast<int64_t>(blockDim.x) * kMxBlock) {
    const int n = end - b < kMxBlock ? static_cast<int>(end - b) : static_cast<int>(kMxBlock);
    float values[kMaxStates > 0 ? kMaxStates : 1][kMxBlock];
#pragma unroll
    for (int k = 0; k < kStates; ++k) {
      const uint8_t scale = codes[k][numel + b / kMxBlock];
      for (int j = 0; j < n; ++j) values[k][j] = mx_decode(codes[k][b + j], scale);
    }
    for (int j = 0; j < n; ++j) {
      const int64_t e = b + j;
      master_t no_master{};
      master_t& m = kMaster ? master[e] : no_master;
      float value = Block::param_value(param[e], m);
      float lane_state[kMaxStates > 0 ? kMaxStates : 1];
#pragma unroll
      for (int k = 0; k < kStates; ++k) lane_state[k] = values[k][j];
      update(value, math_of<float>(grad[e]), lane_state);
      Block::set_param(param[e], m, value, Block::kStochasticParam ? random_bits(keys[0], e) : 0u);
#pragma unroll
      for (int k = 0; k < kStates; ++k) values[k][j] = lane_state[k];
    }
#pragma unroll
    for (int k = 0; k < kStates; ++k) {
      const uint64_t key = keys[mx_state_stream(k)];
      codes[k][numel + b / kMxBlock] = mx_encode_block<S::kStochasticState>(
          values[k], n, codes[k] + b, [&](int j) { return random_bits(key, b + j); });
    }
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

// [note: norm pass]
// The norm pass only reads, so what bounds it is how many loads are in flight: it runs more blocks
// per multiprocessor than the update (kSumBlocksPerSm), and each thread issues kSumUnroll 16-byte
// loads before it adds any. A thread still adds its vectors in order v, v + blockDim, v + 2 blockDim,
// ..., so the sum is the one of a plain strided loop.
constexpr int kSumBlocksPerSm = 4;
constexpr int kSumUnroll = 4;

// The sum of squares of grad[begin, end) in double over the block, in a fixed order: each thread
// its strided share, then a tree in shared memory. Every thread gets it.
template <typename param_t, typename math_t, int kBlock>
__device__ __forceinline__ double block_sum_of_squares(const param_t* __restrict__ grad, int64_t begin, int64_t end,
                                                       double* scratch) {
  constexpr int kVec = 16 / sizeof(param_t);
  using ParamVec = Vec<param_t, kVec>;
  auto add_squares = [](double& sum, const ParamVec& g) {
#pragma unroll
    for (int lane = 0; lane < kVec; ++lane) {
      const double x = static_cast<double>(math_of<math_t>(g.v[lane]));
      sum += x * x;
    }
  };
  double sum = 0;
  int64_t scalar_begin = begin;
  if (is_aligned<ParamVec>(grad)) {
    const ParamVec* vectors_at = reinterpret_cast<const ParamVec*>(grad + begin);
    const int64_t vectors = (end - begin) / kVec;
    const int64_t stride = blockDim.x;
    int64_t v = threadIdx.x;
    for (; v + (kSumUnroll - 1) * stride < vectors; v += kSumUnroll * stride) {
      ParamVec g[kSumUnroll];
#pragma unroll
      for (int u = 0; u < kSumUnroll; ++u) g[u] = vectors_at[v + u * stride];
#pragma unroll
      for (int u = 0; u < kSumUnroll; ++u) add_squares(sum, g[u]);
    }
    for (; v < vectors; v += stride) add_squares(sum, vectors_at[v]);
    scalar_begin = begin + vectors * kVec;
  }
  for (int64_t e = scalar_begin + threadIdx.x; e < end; e += blockDim.x) {
    const double x = static_cast<double>(math_of<math_t>(grad[e]));
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
                           groups.plateau_state + group * groups.plateau_stride);
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
  control.adjust.scale = groups.grad_scale != nullptr ? *groups.grad_scale : 1.0;
  control.adjust.clip = groups.clip ? clip_factor(norm, groups.max_grad_norm) : 1.0;
  return control;
}

template <typename Optimizer, typename Flags, typename math_t, size_t... I>
__device__ __forceinline__ void apply_update(math_t& param, math_t grad, math_t* state,
                                             const typename Optimizer::template Coefficients<math_t>& c,
                                             std::index_sequence<I...>) {
  Optimizer::template update<math_t, Flags>(param, grad, state[I]..., c);
}

// [note: scalars per chunk]
// A block evaluates the schedule and the tensor's scalars (double pow and cos) for a chunk only
// when its group or step count differs from the previous chunk's: consecutive tensors of a group
// usually share their step count, so a model of many small tensors pays for them about once per
// block and group. The flags of the update are decided with the scalars (optimizer_traits.h).
template <typename Optimizer, typename S>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) step_kernel(const __grid_constant__ ArgsOf<Optimizer> args) {
  using param_t = typename S::param_t;
  using math_t = typename S::math_t;
  using state_t = typename S::state_t;
  constexpr int kSlots = kHyperSlots<Optimizer>;
  constexpr int kStates = Optimizer::State::kCount;
  using Coefficients = typename Optimizer::template Coefficients<math_t>;
  const StepControl control = step_control(args.groups);
  if (control.skip) return;
  const auto& t = args.tensors;
  int scalars_group = -1;
  int64_t scalars_step = -1;
  Coefficients c{typename Optimizer::Scalars{}};
  FlagValues<Optimizer::Flag::kCount> flags{};
  RoundingKeys<kStates> keys{};
  int keys_tensor = -1;
  int64_t keys_step = -1;
  for_each_chunk(t, [&](int i, int64_t begin, int64_t end) {
    const int g = t.group[i];
    const int64_t step = *t.step[i];
    if (g != scalars_group || step != scalars_step) {
      const ScheduleValue schedule = group_schedule(args.groups, g, kSlots, Optimizer::Slot::kLr);
      const typename Optimizer::Scalars s =
          Optimizer::scalars(args.groups.hyper + g * kSlots, schedule, step, control.adjust);
      c = Coefficients(s);
      flags = Optimizer::flags(s);
      scalars_group = g;
      scalars_step = step;
    }
    // the rounding keys are the tensor's own, where the scalars are the group's
    if constexpr (S::kStochasticParam || S::kStochasticState) {
      if (i != keys_tensor || step != keys_step) {
        const double seed = args.groups.hyper[g * kSlots + kCommonSlots<Optimizer> + CommonSlot::kRoundingSeed];
        keys = RoundingKeys<kStates>::of(static_cast<uint64_t>(seed), t.index[i], step);
        keys_tensor = i;
        keys_step = step;
      }
    }
    using stored_t = std::conditional_t<S::kMxState, uint8_t, state_t>;  // 8-bit state: its bytes
    stored_t* state[kMaxStates];
#pragma unroll
    for (int k = 0; k < kStates; ++k) state[k] = static_cast<stored_t*>(t.state[k][i]);
    auto* const master = static_cast<typename S::master_t*>(t.state[kStates][i]);
    dispatch_flags(flags, [&](auto flag_set) {
      using Flags = decltype(flag_set);
      const auto update = [&](math_t& p, math_t grad, math_t* st) {
        apply_update<Optimizer, Flags>(p, grad, st, c, std::make_index_sequence<kStates>{});
      };
      if constexpr (S::kMxState) {
        update_mx_range<S, Optimizer::template states_used<Flags>()>(
            static_cast<param_t*>(t.param[i]), static_cast<const param_t*>(t.grad[i]), state, master, begin, end,
            t.numel[i], keys.key, update);
      } else {
        update_range<S, Optimizer::template states_used<Flags>()>(static_cast<param_t*>(t.param[i]),
                                                                  static_cast<const param_t*>(t.grad[i]), state,
                                                                  master, begin, end, keys.key, update);
      }
    });
  });
}

// [note: norm kernels]
// The global norm takes two kernels before the update: each block writes the sum of squares of its
// chunks' gradients to partial[first_chunk + chunk], then one block sums the partials in order and
// writes the norm. The norm is the same from run to run; the update kernels read it from there.
template <int kStates, int kCapacity, typename param_t, typename math_t>
__global__ void __launch_bounds__(kThreads, kSumBlocksPerSm) grad_sum_kernel(const __grid_constant__ StepArgs<kStates, kCapacity> args,
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
                                                                 const double* grad_scale, double* grad_norm) {
  __shared__ double scratch[kNormThreads];
  double sum = 0;
  for (int32_t c = threadIdx.x; c < count; c += kNormThreads) sum += partial[c];
  sum = block_sum<kNormThreads>(sum, scratch);
  if (threadIdx.x == 0) *grad_norm = grad_norm_of(sum, grad_scale != nullptr ? *grad_scale : 1.0);
}

__global__ void advance_counters_kernel(const __grid_constant__ CounterArgs args) {
  const double norm = args.grad_norm != nullptr ? *args.grad_norm : 0.0;
  if (step_skipped(args.found_inf != nullptr && *args.found_inf != 0, args.skip_nonfinite, norm)) return;
  const int i = threadIdx.x;
  if (i < args.count) atomicAdd(reinterpret_cast<unsigned long long*>(args.step[i]), 1ULL);
  if (args.group_steps != nullptr && i < args.groups) args.group_steps[i] += 1;
}

// One thread: GreedyLR's reset looks at every group (schedule_math.h, observe_metric).
template <typename metric_t>
__global__ void plateau_observe_kernel(const __grid_constant__ ScheduleArgs args, const metric_t* metric,
                                       double* plateau_state) {
  if (threadIdx.x != 0) return;
  uint8_t reduced[kMaxGroups];
  observe_metric(args.programs, args.groups, args.base_lrs, static_cast<double>(*metric), plateau_state,
                 args.plateau_stride, reduced);
}

__global__ void evaluate_schedules_kernel(const __grid_constant__ ScheduleArgs args, const int64_t* steps,
                                          const double* plateau_state, double* out) {
  const int g = threadIdx.x;
  if (g >= args.groups) return;
  const ScheduleValue v =
      evaluate_schedule(args.programs, g, steps[g], args.base_lrs[g], plateau_state + g * args.plateau_stride);
  out[3 * g] = v.lr;
  out[3 * g + 1] = v.has_momentum ? v.momentum : 0.0;
  out[3 * g + 2] = v.has_momentum ? 1.0 : 0.0;
}


}  // namespace cuda_step
}  // namespace fusedlr
