// CPU kernels of the fusedlr ops.
//
// [note: one parallel region]
// A step splits every tensor of the call into chunks of at most kChunkSize elements and hands each
// thread a contiguous run of chunks holding about the same number of elements, all in ONE parallel
// region. torch's fused CPU optimizers open a region per tensor, which is what makes them slow on
// models with many small tensors. A step smaller than kSerialBelow elements runs on the calling
// thread: waking the pool would cost more than the work.

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../optimizers.h"
#include "../schedule_math.h"
#include "../step_inputs.h"
#include "../step_op.h"
#include "../update_math.h"
#include "cpu_isa.h"
#include "prepared_step.h"

namespace fusedlr {
namespace {


constexpr int64_t kChunkSize = int64_t{1} << 16;
static_assert((int64_t{1} << 32) % kChunkSize == 0, "a chunk never spans two 2^32 blocks of indices (RandomStream)");
constexpr int64_t kSerialBelow = int64_t{1} << 15;

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// The chunks of a step's tensors and each thread's run of them ([note: one parallel region]).
struct ChunkPlan {
  std::vector<Chunk> chunks;
  std::vector<size_t> first;  // thread t runs chunks [first[t], first[t + 1])
};

// Fills `plan` with the chunks of the jobs' tensors (JobT::numel), reusing its memory.
template <typename JobT>
void plan_chunks(const std::vector<JobT>& jobs, ChunkPlan& plan) {
  plan.chunks.clear();
  int64_t total = 0;
  for (size_t i = 0; i < jobs.size(); ++i) {
    const int64_t numel = jobs[i].numel;
    for (int64_t begin = 0; begin < numel; begin += kChunkSize) {
      plan.chunks.push_back({static_cast<int64_t>(i), begin, std::min(begin + kChunkSize, numel)});
    }
    total += numel;
  }
  const auto& chunks = plan.chunks;
  const int64_t threads =
      total < kSerialBelow ? 1 : std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(chunks.size()));
  // each thread gets about total / threads elements
  plan.first.assign(std::max<int64_t>(threads, 1) + 1, chunks.size());
  plan.first[0] = 0;
  int64_t done = 0;
  size_t next = 0;
  for (int64_t t = 1; t < threads; ++t) {
    const int64_t target = total * t / threads;
    while (next < chunks.size() && done + (chunks[next].end - chunks[next].begin) / 2 < target) {
      done += chunks[next].end - chunks[next].begin;
      ++next;
    }
    plan.first[t] = next;
  }
}

// Runs fn(chunk index, chunk) over every chunk of the plan, in one parallel region.
template <typename Fn>
void run_chunks(const ChunkPlan& plan, const Fn& fn) {
  const int64_t threads = static_cast<int64_t>(plan.first.size()) - 1;
  auto run_thread = [&](int64_t t) {
    for (size_t c = plan.first[t]; c < plan.first[t + 1]; ++c) fn(c, plan.chunks[c]);
  };
  if (threads <= 1) {
    for (int64_t t = 0; t < threads; ++t) run_thread(t);
    return;
  }
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) run_thread(t);
  });
}

// [note: sum of squares]
// The norm pass reads the gradients once more, so it must run at the machine's read bandwidth. In
// double, in kLanes independent sums (a fixed order the compiler can vectorize, as it may not
// reorder one running sum), it does not: a float32 gradient is summed in float32 over blocks of
// kRows values per lane, and the block sums in double, within 1e-6 of the exact sum. A chunk whose
// blocked sum is outside [1e-30, 1e30] (a square overflowed, or underflowed, or the chunk is
// zero) is summed again in double. Both orders are fixed: the same sum on every machine and for
// every number of threads.
constexpr int kLanes = 16;
constexpr int kRows = 16;

// Both orders end alike: the squares of grad[i, end) one by one in double, then the lanes' sums.
template <typename math_t, typename param_t>
double finish_sum_of_squares(const double (&lanes)[kLanes], const param_t* grad, int64_t i, int64_t end) {
  double total = 0;
  for (; i < end; ++i) {
    const double x = static_cast<double>(math_of<math_t>(grad[i]));
    total += x * x;
  }
  for (int k = 0; k < kLanes; ++k) total += lanes[k];
  return total;
}

template <typename param_t, typename math_t>
FUSEDLR_LOOP_INLINE inline double sum_of_squares_in_double(const param_t* __restrict__ grad, int64_t begin, int64_t end) {
  double lanes[kLanes] = {};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const double x = static_cast<double>(math_of<math_t>(grad[i + k]));
      lanes[k] += x * x;
    }
  }
  return finish_sum_of_squares<math_t>(lanes, grad, i, end);
}

template <typename param_t>
FUSEDLR_LOOP_INLINE inline double sum_of_squares_blocked(const param_t* __restrict__ grad, int64_t begin, int64_t end) {
  double lanes[kLanes] = {};
  int64_t i = begin;
  for (; i + kRows * kLanes <= end; i += kRows * kLanes) {
    float block[kLanes] = {};
    for (int r = 0; r < kRows; ++r) {
      for (int k = 0; k < kLanes; ++k) {
        const float x = math_of<float>(grad[i + r * kLanes + k]);
        block[k] += x * x;
      }
    }
    for (int k = 0; k < kLanes; ++k) lanes[k] += block[k];
  }
  return finish_sum_of_squares<float>(lanes, grad, i, end);
}

template <typename param_t, typename math_t>
double sum_of_squares(const param_t* grad, int64_t begin, int64_t end) {
  double sum = 0;
  run_for_cpu_isa([&]() FUSEDLR_LOOP_INLINE {
    if constexpr (std::is_same_v<math_t, double>) {
      sum = sum_of_squares_in_double<param_t, math_t>(grad, begin, end);
    } else {
      sum = sum_of_squares_blocked(grad, begin, end);
      if (!(sum >= 1e-30 && sum <= 1e30)) sum = sum_of_squares_in_double<param_t, math_t>(grad, begin, end);
    }
  });
  return sum;
}

// [note: no allocation]
// A step of a small model takes microseconds, and the first malloc of a kilobyte or more after
// other code has freed many small blocks can cost as much: glibc then consolidates its free lists.
// The vectors a step needs (its jobs, their chunks, the groups' schedule values, the norm's
// partial sums) are kept from one step to the next: by the prepared step (prepared_step.h) for
// good, by an op call for that call.
struct StepScratch {
  ChunkPlan plan;
  std::vector<ScheduleValue> schedule;
  std::vector<double> partial;
};

// What a step does to its gradients, and whether it is skipped (update_math.h, [note: gradient
// adjustments]). With options.grad_norm the global norm is computed, by chunks in a fixed order
// (the same norm whatever the number of threads), and written there.
struct StepControl {
  GradAdjust adjust;
  bool skip;
};

template <typename Job>
StepControl control_step(const GradOptions& options, StepScratch& scratch, const std::vector<Job>& jobs) {
  const ChunkPlan& plan = scratch.plan;
  StepControl control;
  const bool found_inf = GradOptions::given(options.found_inf) && options.found_inf->item<double>() != 0;
  if (GradOptions::given(options.grad_scale)) control.adjust.scale = options.grad_scale->item<double>();
  double norm = 0;
  if (options.wants_norm()) {
    std::vector<double>& partial = scratch.partial;
    partial.assign(plan.chunks.size(), 0.0);
    run_chunks(plan, [&](size_t c, const Chunk& chunk) {
      const Job& job = jobs[chunk.tensor];
      dispatch_param_dtype(job.dtype, [&](auto types) {
        using Types = decltype(types);
        partial[c] = sum_of_squares<typename Types::param_t, typename Types::math_t>(
            static_cast<const typename Types::param_t*>(job.grad), chunk.begin, chunk.end);
      });
    });
    double total = 0;
    for (const double p : partial) total += p;
    norm = grad_norm_of(total, control.adjust.scale);
    *options.grad_norm->mutable_data_ptr<double>() = norm;
    if (options.max_grad_norm.has_value()) control.adjust.clip = clip_factor(norm, *options.max_grad_norm);
  }
  control.skip = step_skipped(found_inf, options.skip_nonfinite, norm);
  return control;
}

// The schedule of every group at its current step, in `values`.
void evaluate_groups(c10::ArrayRef<double> hyper, int64_t hyper_slots, int64_t lr_slot, c10::ArrayRef<double> programs,
                     const at::Tensor& group_steps, const at::Tensor& plateau_state,
                     std::vector<ScheduleValue>& values) {
  const int64_t groups = group_steps.numel();
  const int64_t* step = group_steps.data_ptr<int64_t>();
  const double* plateau = plateau_state.data_ptr<double>();
  values.resize(groups);
  for (int64_t g = 0; g < groups; ++g) {
    TORCH_CHECK(step[g] >= 0, "fusedlr: the step counter of group ", g, " is negative (", step[g], ")");
    values[g] = evaluate_schedule(programs.data(), static_cast<int>(g), step[g], hyper[g * hyper_slots + lr_slot],
                                  plateau + g * plateau_state.size(1));
  }
}

// What every job (one updated tensor) of a step carries besides its update's own pointers.
struct Job {
  size_t index;  // the parameter's index in the op's lists, for messages
  void* param;
  const void* grad;
  at::ScalarType dtype;
  int64_t numel;
  int64_t group;
  int64_t* step;                 // the tensor's step counter
  c10::TensorImpl* param_impl;  // for its version counter (ops.cpp, [note: no autograd])
  TensorStorage storage;        // how its tensors are stored (storage_math.h, [note: storage])
};

// Once every check has passed: each group and each updated tensor has completed one more step,
// and each updated parameter has a new version. A tensor's counters advance with its first chunk,
// in the parallel region (the scalars of the step are computed before it); a tensor without
// elements has no chunk, so its counters advance here.
void advance_tensor_counters(const Job& job);

template <typename JobT>
void advance_group_counters(const at::Tensor& group_steps, const std::vector<JobT>& jobs) {
  int64_t* group_step = group_steps.data_ptr<int64_t>();
  for (int64_t g = 0; g < group_steps.numel(); ++g) group_step[g] += 1;
  for (const JobT& job : jobs) {
    if (job.numel == 0) advance_tensor_counters(job);
  }
}

// An inference tensor has no version counter (check_param_tensors allows one in inference mode,
// which the pool's threads do not inherit).
void bump_version(const Job& job) {
  if (job.param_impl->version_counter().enabled()) job.param_impl->bump_version();
}

void advance_tensor_counters(const Job& job) {
  // atomic: tensors passed to the op may share a step counter
  __atomic_fetch_add(job.step, int64_t{1}, __ATOMIC_RELAXED);
  bump_version(job);
}

// A skipped step changes no value, but bumps the versions as a step that runs does: on CUDA whether
// a step is skipped is known on the device only (cuda/step_host.h, [note: versions on the device]).
template <typename JobT>
void bump_versions_of_skipped_step(const std::vector<JobT>& jobs) {
  for (const JobT& job : jobs) bump_version(job);
}

// A job's common part from the op's lists: parameter i with the gradient data the checks returned.
Job job_of(size_t i, at::TensorList params, const void* grad, at::TensorList steps, at::IntArrayRef tensor_group,
           TensorStorage storage) {
  const at::Tensor& param = params[i];
  return {i,
          param.mutable_data_ptr(),
          grad,
          param.scalar_type(),
          param.numel(),
          tensor_group[i],
          steps[i].mutable_data_ptr<int64_t>(),
          param.unsafeGetTensorImpl(),
          storage};
}

template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.numel() == 0 ? nullptr : static_cast<T*>(t.mutable_data_ptr());
}

// ---------------------------------------------------------------------------------------------
// The update of any optimizer (optimizer_traits.h, [note: optimizer traits])

template <typename Optimizer>
struct OptimizerJob : Job {
  std::array<void*, kStateLists<Optimizer>> state;  // null: none; the last, the master weight
  typename Optimizer::Scalars scalars;
  FlagValues<Optimizer::Flag::kCount> flags;
  bool stochastic;                                    // rounds stochastically ([note: stochastic rounding])
  RoundingKeys<Optimizer::State::kCount> keys;        // then with these keys
};

template <typename T, size_t>
using StatePointer = T*;
template <typename T, size_t>
using StateSlot = T&;

// [note: page prefetch]
// An update streams two to six arrays at once (parameter, gradient, master, state lists). The
// hardware prefetchers follow a stream within its 4 KB page only: at each page it enters, a
// stream's first lines miss before they fetch ahead again, and the allocator leaves the arrays at
// unrelated offsets within their pages, so the streams enter their pages at different times and
// the loop stalls at each one's entry. Where every array started at the same page offset, a step
// of remainders + bfloat16 state took 0.8x the time of one with the gradient or the state half a
// page off; with the streams of 2-byte values (bfloat16 state, remainders) the stalls are most of
// the step. So the loop runs in blocks of kPrefetchBlock elements, and before each block asks for
// the first kPrefetchLines lines of every page each stream enters kPrefetchAhead elements on. On
// GPT-2 small in bfloat16 (2 threads here) that took remainders + bfloat16 state from 94 to 67 ms
// and stochastic rounding + bfloat16 state from 165 to 101 ms; float32 masters from 85 to 83 ms. A
// prefetch of every line, or of one line per page, gained little or nothing. A prefetch changes no
// value: the steps are bitwise as without it.
constexpr int64_t kPrefetchBlock = 512;
constexpr int64_t kPrefetchAhead = 1024;
constexpr int kPrefetchLines = 4;
constexpr uintptr_t kPageBytes = 4096;
constexpr uintptr_t kLineBytes = 64;

// Asks for the first lines of each page that data[begin, end) enters.
template <typename T>
FUSEDLR_LOOP_INLINE inline void prefetch_page_starts(const T* data, int64_t begin, int64_t end) {
#if defined(__GNUC__)
  const uintptr_t last = reinterpret_cast<uintptr_t>(data + end);
  for (uintptr_t page = (reinterpret_cast<uintptr_t>(data + begin) + kPageBytes - 1) & ~(kPageBytes - 1);
       page < last; page += kPageBytes) {
    for (int line = 0; line < kPrefetchLines; ++line) {
      __builtin_prefetch(reinterpret_cast<const void*>(page + kLineBytes * line));
    }
  }
#else
  (void)data, (void)begin, (void)end;
#endif
}

// [note: page prefetch]: before the block [block, block_end) of an element loop, the pages its
// streams enter kPrefetchAhead elements on, within the tensor (a page's first lines may lie past
// its end: a prefetch does not fault); of the state lists, the first kUsed.
template <int kUsed, bool kHasMaster, typename Param, typename Master, typename... State>
FUSEDLR_LOOP_INLINE inline void prefetch_ahead(const Param* param, const Param* grad, const Master* master,
                                               int64_t block, int64_t block_end, int64_t numel,
                                               const State*... state) {
  const int64_t ahead_begin = block + kPrefetchAhead, ahead_end = std::min(block_end + kPrefetchAhead, numel);
  if (ahead_begin >= ahead_end) return;
  prefetch_page_starts(param, ahead_begin, ahead_end);
  prefetch_page_starts(grad, ahead_begin, ahead_end);
  if constexpr (kHasMaster) prefetch_page_starts(master, ahead_begin, ahead_end);
  int list = 0;
  ((list++ < kUsed ? prefetch_page_starts(state, ahead_begin, ahead_end) : static_cast<void>(0)), ...);
}

// One element's update: the parameter read from its master weight where it has one, the first
// states_used() state values read, each converted to the math type, updated, and stored back as
// the tensor's storage says (storage_math.h, [note: storage]). `spread_index` is the element's
// index times kIndexSpread (random_bits_spread).
template <typename Optimizer, typename Flags, typename S, size_t... I>
FUSEDLR_LOOP_INLINE inline void update_element(typename S::param_t& param, typename S::master_t& master,
                                               typename S::param_t grad,
                                               const typename Optimizer::template Coefficients<typename S::math_t>& c,
                                               const RandomStream& param_stream,
                                               const RandomStream (&state_streams)[sizeof...(I)],
                                               uint32_t spread_index, StateSlot<typename S::state_t, I>... state) {
  using math_t = typename S::math_t;
  constexpr int kUsed = Optimizer::template states_used<Flags>();
  math_t p = S::param_value(param, master);
  math_t values[] = {(static_cast<int>(I) < kUsed ? S::state_value(state) : math_t(0))...};
  Optimizer::template update<math_t, Flags>(p, math_of<math_t>(grad), values[I]..., c);
  S::set_param(param, master, p, S::kStochasticParam ? random_bits_spread(param_stream, spread_index) : 0u);
  ((static_cast<int>(I) < kUsed
        ? S::set_state(state, values[I],
                       S::kStochasticState ? state_random_bits(random_bits_spread(state_streams[I], spread_index), I)
                                           : 0u)
        : static_cast<void>(0)),
   ...);
}

// [note: element pairs]
// Where every array a loop streams holds 2-byte values (a bfloat16 or float16 parameter and
// gradient, its remainder, bfloat16 state), the loop reads and writes them as 32-bit words, two
// elements each, the low half the first: the vectorized loop then takes a word's elements apart,
// and puts them together, with a shift or a mask per value in a 32-bit lane. Element by element,
// the compilers widen 16-bit values to 32-bit lanes with shuffles, which on AVX-512 run on one
// port only: in the caches an AdamW step of remainders + bfloat16 state took 1.12x the time it
// takes by pairs (AVX2: 1.13x). Each element is updated as alone (update_element), so the bits are
// the same.
template <typename S, int kUsed>
inline constexpr bool kInPairs =
    std::endian::native == std::endian::little &&  // a word's low half is its first element
    sizeof(typename S::param_t) == 2 && (S::master != MasterKind::kFloat) &&
    (kUsed == 0 || sizeof(typename S::state_t) == 2);

// The word of data[i] and data[i + 1] where the loop reads that list (kRead), else 0 (data may
// then be null, and is not indexed).
template <bool kRead, typename T>
FUSEDLR_LOOP_INLINE inline uint32_t load_pair(const T* data, int64_t i) {
  uint32_t word = 0;
  if constexpr (kRead) {
    static_assert(sizeof(T) == 2, "pairs of 2-byte values");
    std::memcpy(&word, data + i, sizeof word);  // an unaligned load where a view starts mid-word
  }
  return word;
}

// A word's low and high value; a list the loop does not read (not 2 bytes wide, perhaps: a float32
// master or state type that the step never touches) gets a zero it never stores.
template <typename T>
FUSEDLR_LOOP_INLINE inline T low_of(uint32_t word) {
  if constexpr (sizeof(T) == 2) return fusedlr::bit_cast<T>(static_cast<uint16_t>(word));
  return T{};
}

template <typename T>
FUSEDLR_LOOP_INLINE inline T high_of(uint32_t word) {
  if constexpr (sizeof(T) == 2) return fusedlr::bit_cast<T>(static_cast<uint16_t>(word >> 16));
  return T{};
}

template <bool kWrite, typename T>
FUSEDLR_LOOP_INLINE inline void store_pair(T* data, int64_t i, const T& low, const T& high) {
  if constexpr (kWrite) {
    const uint32_t word = static_cast<uint32_t>(fusedlr::bit_cast<uint16_t>(low)) |
                          (static_cast<uint32_t>(fusedlr::bit_cast<uint16_t>(high)) << 16);
    std::memcpy(data + i, &word, sizeof word);
  }
}

// The element loop, each list through a pointer of its own (restrict: the loop vectorizes), in
// blocks with the pages ahead asked for ([note: page prefetch]), by pairs where it can ([note:
// element pairs]).
template <typename Optimizer, typename Flags, typename S, size_t... I>
FUSEDLR_LOOP_INLINE inline void update_elements(typename S::param_t* __restrict__ param,
                                                typename S::master_t* __restrict__ master,
                                                const typename S::param_t* __restrict__ grad, int64_t begin,
                                                int64_t end, int64_t numel,
                                                const typename Optimizer::template Coefficients<typename S::math_t>& c,
                                                const RoundingKeys<Optimizer::State::kCount>& keys,
                                                StatePointer<typename S::state_t, I> __restrict__... state) {
  using master_t = typename S::master_t;
  using state_t = typename S::state_t;
  constexpr int kUsed = Optimizer::template states_used<Flags>();
  constexpr bool kHasMaster = S::master != MasterKind::kNone;
  // the random bits of elements [begin, end), which share their index's high half (a chunk)
  const RandomStream param_stream = random_stream(keys.key[0], begin);
  const RandomStream state_streams[] = {random_stream(keys.key[state_stream(I)], begin)...};
  // the index's low half times kIndexSpread, as a running sum (storage_math.h, random_bits_spread)
  uint32_t spread_index = static_cast<uint32_t>(begin) * kIndexSpread;
  for (int64_t block = begin; block < end; block += kPrefetchBlock) {
    const int64_t block_end = std::min(block + kPrefetchBlock, end);
    prefetch_ahead<kUsed, kHasMaster>(param, grad, master, block, block_end, numel, state...);
    int64_t i = block;
    if constexpr (kInPairs<S, kUsed>) {
      for (; i + 1 < block_end; i += 2, spread_index += 2 * kIndexSpread) {
        using param_t = typename S::param_t;
        const uint32_t param_word = load_pair<true>(param, i), grad_word = load_pair<true>(grad, i);
        const uint32_t master_word = load_pair<kHasMaster>(master, i);
        const uint32_t state_words[] = {load_pair<(static_cast<int>(I) < kUsed)>(state, i)...};
        param_t param_low = low_of<param_t>(param_word), param_high = high_of<param_t>(param_word);
        master_t master_low = low_of<master_t>(master_word), master_high = high_of<master_t>(master_word);
        state_t state_low[] = {low_of<state_t>(state_words[I])...};
        state_t state_high[] = {high_of<state_t>(state_words[I])...};
        update_element<Optimizer, Flags, S, I...>(param_low, master_low, low_of<param_t>(grad_word), c, param_stream,
                                                  state_streams, spread_index, state_low[I]...);
        update_element<Optimizer, Flags, S, I...>(param_high, master_high, high_of<param_t>(grad_word), c,
                                                  param_stream, state_streams, spread_index + kIndexSpread,
                                                  state_high[I]...);
        store_pair<true>(param, i, param_low, param_high);
        store_pair<kHasMaster>(master, i, master_low, master_high);
        (store_pair<(static_cast<int>(I) < kUsed)>(state, i, state_low[I], state_high[I]), ...);
      }
    }
    for (; i < block_end; ++i, spread_index += kIndexSpread) {
      master_t no_master{};
      state_t no_state{};  // the lists the loop does not read may be null
      update_element<Optimizer, Flags, S, I...>(param[i], kHasMaster ? master[i] : no_master, grad[i], c, param_stream,
                                                state_streams, spread_index,
                                                (static_cast<int>(I) < kUsed ? state[i] : no_state)...);
    }
  }
}

// One block of n <= kMxBlock elements with 8-bit state ([note: 8-bit state]), from element b: its
// states decoded into float32 on the stack, each element updated as with float32 state
// (update_element), then each state encoded anew with the block's scale, its codes rounded as the
// storage says (stochastically with 20 bits of stream mx_state_stream(k) per value).
template <typename Optimizer, typename Flags, typename S, size_t... I>
FUSEDLR_LOOP_INLINE inline void update_mx_block(typename S::param_t* __restrict__ param,
                                                typename S::master_t* __restrict__ master,
                                                const typename S::param_t* __restrict__ grad, int64_t b, int n,
                                                int64_t numel,
                                                const typename Optimizer::template Coefficients<float>& c,
                                                const RandomStream& param_stream,
                                                const RandomStream (&code_streams)[sizeof...(I)],
                                                uint32_t spread_index, StatePointer<uint8_t, I> __restrict__... state) {
  using Block = typename S::BlockStorage;
  using master_t = typename S::master_t;
  constexpr int kUsed = Optimizer::template states_used<Flags>();
  constexpr bool kHasMaster = S::master != MasterKind::kNone;
  constexpr int kLists = static_cast<int>(sizeof...(I));
  uint8_t* const codes[] = {state...};
  float values[kLists][kMxBlock];
  for (int k = 0; k < kUsed; ++k) {
    const uint8_t scale = codes[k][numel + b / kMxBlock];
    for (int j = 0; j < n; ++j) values[k][j] = mx_decode(codes[k][b + j], scale);
  }
  const RandomStream no_streams[kLists] = {};
  for (int j = 0; j < n; ++j) {
    master_t no_master{};
    float no_state = 0;
    update_element<Optimizer, Flags, Block, I...>(param[b + j], kHasMaster ? master[b + j] : no_master, grad[b + j],
                                                  c, param_stream, no_streams,
                                                  spread_index + static_cast<uint32_t>(j) * kIndexSpread,
                                                  (static_cast<int>(I) < kUsed ? values[I][j] : no_state)...);
  }
  for (int k = 0; k < kUsed; ++k) {
    const RandomStream stream = code_streams[k];
    codes[k][numel + b / kMxBlock] = mx_encode_block<S::kStochasticState>(
        values[k], n, codes[k] + b,
        [&](int j) { return random_bits_spread(stream, spread_index + static_cast<uint32_t>(j) * kIndexSpread); });
  }
}

// The element loop of 8-bit state: block by block (a chunk starts on a block: kChunkSize is a
// multiple of kMxBlock), the pages ahead asked for as update_elements asks.
template <typename Optimizer, typename Flags, typename S, size_t... I>
FUSEDLR_LOOP_INLINE inline void update_mx_elements(typename S::param_t* __restrict__ param,
                                                   typename S::master_t* __restrict__ master,
                                                   const typename S::param_t* __restrict__ grad, int64_t begin,
                                                   int64_t end, int64_t numel,
                                                   const typename Optimizer::template Coefficients<float>& c,
                                                   const RoundingKeys<Optimizer::State::kCount>& keys,
                                                   StatePointer<uint8_t, I>... state) {
  static_assert(kChunkSize % kMxBlock == 0 && kPrefetchBlock % kMxBlock == 0, "loops start on 8-bit blocks");
  constexpr int kUsed = Optimizer::template states_used<Flags>();
  constexpr bool kHasMaster = S::master != MasterKind::kNone;
  const RandomStream param_stream = random_stream(keys.key[0], begin);
  const RandomStream code_streams[] = {random_stream(keys.key[mx_state_stream(I)], begin)...};
  uint32_t spread_index = static_cast<uint32_t>(begin) * kIndexSpread;
  for (int64_t block = begin; block < end; block += kPrefetchBlock) {
    const int64_t block_end = std::min(block + kPrefetchBlock, end);
    prefetch_ahead<kUsed, kHasMaster>(param, grad, master, block, block_end, numel, state...);
    for (int64_t b = block; b < block_end; b += kMxBlock) {
      const int n = static_cast<int>(std::min<int64_t>(kMxBlock, block_end - b));
      if (n == kMxBlock) {  // a whole block: the loops' trip counts are constants
        update_mx_block<Optimizer, Flags, S, I...>(param, master, grad, b, static_cast<int>(kMxBlock), numel, c,
                                                   param_stream, code_streams, spread_index, state...);
      } else {
        update_mx_block<Optimizer, Flags, S, I...>(param, master, grad, b, n, numel, c, param_stream, code_streams,
                                                   spread_index, state...);
      }
      spread_index += static_cast<uint32_t>(n) * kIndexSpread;
    }
  }
}

template <typename Optimizer, typename Flags, typename S, size_t... I>
FUSEDLR_LOOP_INLINE inline void update_range(const OptimizerJob<Optimizer>& job, int64_t begin, int64_t end,
                                             std::index_sequence<I...>) {
  const typename Optimizer::template Coefficients<typename S::math_t> c(job.scalars);
  if constexpr (S::kMxState) {
    update_mx_elements<Optimizer, Flags, S, I...>(
        static_cast<typename S::param_t*>(job.param),
        static_cast<typename S::master_t*>(job.state[Optimizer::State::kCount]),
        static_cast<const typename S::param_t*>(job.grad), begin, end, job.numel, c, job.keys,
        static_cast<uint8_t*>(job.state[I])...);
  } else {
    update_elements<Optimizer, Flags, S, I...>(
        static_cast<typename S::param_t*>(job.param),
        static_cast<typename S::master_t*>(job.state[Optimizer::State::kCount]),
        static_cast<const typename S::param_t*>(job.grad), begin, end, job.numel, c, job.keys,
        static_cast<typename S::state_t*>(job.state[I])...);
  }
}

template <typename Optimizer>
void update_chunk(const OptimizerJob<Optimizer>& job, int64_t begin, int64_t end) {
  dispatch_storage(job.dtype, job.storage, job.stochastic, [&](auto storage) {
    dispatch_flags(job.flags, [&](auto flags) {
      run_for_cpu_isa<decltype(storage)::kMxState>([&]() FUSEDLR_LOOP_INLINE {
        update_range<Optimizer, decltype(flags), decltype(storage)>(
            job, begin, end, std::make_index_sequence<Optimizer::State::kCount>{});
      });
    });
  });
}

// The step proper, from checked jobs: the checks that need the schedule, then the update.
template <typename Optimizer>
void run_step(const char* op, std::vector<OptimizerJob<Optimizer>>& jobs, c10::ArrayRef<double> hyper,
              c10::ArrayRef<double> programs, const at::Tensor& group_steps, const at::Tensor& plateau_state,
              const GradOptions& options, StepScratch& scratch) {
  constexpr int kSlots = kHyperSlots<Optimizer>;
  const std::vector<ScheduleValue>& schedule = scratch.schedule;
  evaluate_groups(hyper, kSlots, Optimizer::Slot::kLr, programs, group_steps, plateau_state, scratch.schedule);
  for (const OptimizerJob<Optimizer>& job : jobs) {
    const ScheduleValue& value = schedule[job.group];
    const double momentum =
        value.has_momentum ? value.momentum : hyper[job.group * kSlots + Optimizer::kMomentumSlot];
    check_needed_states<Optimizer>(op, hyper, job.group, momentum != 0, job.index,
                                   [&](int k) { return job.state[k] != nullptr || job.numel == 0; });
  }
  plan_chunks(jobs, scratch.plan);
  const StepControl control = control_step(options, scratch, jobs);
  if (control.skip) {
    bump_versions_of_skipped_step(jobs);
    return;
  }
  // Consecutive tensors of a group usually share their step count: reuse the scalars.
  int64_t last_group = -1, last_step = -1;
  typename Optimizer::Scalars last_scalars{};
  for (OptimizerJob<Optimizer>& job : jobs) {
    const int64_t step = *job.step;
    if (job.group != last_group || step != last_step) {
      last_scalars = Optimizer::scalars(hyper.data() + job.group * kSlots, schedule[job.group], step, control.adjust);
      last_group = job.group;
      last_step = step;
    }
    job.scalars = last_scalars;
    job.flags = Optimizer::flags(job.scalars);
    const double* common = hyper.data() + job.group * kSlots + kCommonSlots<Optimizer>;
    job.stochastic = common[CommonSlot::kStochasticRounding] != 0;
    if (job.stochastic) {
      job.keys = RoundingKeys<Optimizer::State::kCount>::of(
          static_cast<uint64_t>(common[CommonSlot::kRoundingSeed]), static_cast<int64_t>(job.index), step);
    }
  }
  advance_group_counters(group_steps, jobs);
  run_chunks(scratch.plan, [&](size_t, const Chunk& c) {
    if (c.begin == 0) advance_tensor_counters(jobs[c.tensor]);
    update_chunk(jobs[c.tensor], c.begin, c.end);
  });
}

template <typename Optimizer>
void cpu_step(const StepCall<Optimizer>& call) {
  const char* op = step_op_label<Optimizer>();
  const ActiveTensors active =
      check_step_inputs(op, at::kCPU, call.params, call.grads, state_lists<Optimizer>(call.states), call.steps,
                        call.tensor_group, call.hyper, kHyperSlots<Optimizer>, call.programs, call.group_steps,
                        call.plateau_state);
  check_grad_options(op, call.group_steps.device(), call.options);
  std::vector<OptimizerJob<Optimizer>> jobs(active.index.size());
  for (size_t j = 0; j < jobs.size(); ++j) {
    const size_t i = static_cast<size_t>(active.index[j]);
    static_cast<Job&>(jobs[j]) =
        job_of(i, call.params, active.grad_data[j], call.steps, call.tensor_group, active.storage[j]);
    for (int k = 0; k < kStateLists<Optimizer>; ++k) jobs[j].state[k] = data_or_null<void>(call.states[k][i]);
  }
  StepScratch scratch;
  run_step<Optimizer>(op, jobs, call.hyper, call.programs, call.group_steps, call.plateau_state, call.options,
                      scratch);
}

// ---------------------------------------------------------------------------------------------
// Schedules

void plateau_observe_cpu(const at::Tensor& metric, c10::ArrayRef<double> base_lrs, c10::ArrayRef<double> programs,
                         const at::Tensor& plateau_state) {
  const int64_t groups = static_cast<int64_t>(base_lrs.size());
  TORCH_CHECK(metric.numel() == 1 && metric.is_floating_point(),
              "fusedlr.plateau_observe_: the metric must be a one-element floating-point tensor, got ",
              metric.scalar_type(), " of shape ", metric.sizes());
  TORCH_CHECK(plateau_state.device().is_cpu() && metric.device().is_cpu(),
              "fusedlr.plateau_observe_: metric and plateau_state must be on one device");
  check_schedule_inputs("fusedlr.plateau_observe_", programs, groups, plateau_state);
  std::vector<uint8_t> reduced(groups);
  observe_metric(programs.data(), groups, base_lrs.data(), metric.item<double>(), plateau_state.data_ptr<double>(),
                 plateau_state.size(1), reduced.data());
}

at::Tensor evaluate_schedules_cpu(c10::ArrayRef<double> programs, c10::ArrayRef<double> base_lrs,
                                  const at::Tensor& steps, const at::Tensor& plateau_state) {
  const int64_t groups = static_cast<int64_t>(base_lrs.size());
  check_schedule_inputs("fusedlr.evaluate_schedules", programs, groups, steps, plateau_state);
  at::Tensor out = at::empty({groups, 3}, plateau_state.options());
  double* o = out.data_ptr<double>();
  const int64_t* step = steps.data_ptr<int64_t>();
  const double* plateau = plateau_state.data_ptr<double>();
  for (int64_t g = 0; g < groups; ++g) {
    TORCH_CHECK(step[g] >= 0, "fusedlr.evaluate_schedules: step ", step[g], " is negative");
    const ScheduleValue v =
        evaluate_schedule(programs.data(), static_cast<int>(g), step[g], base_lrs[g], plateau + g * plateau_state.size(1));
    o[3 * g] = v.lr;
    o[3 * g + 1] = v.has_momentum ? v.momentum : 0.0;
    o[3 * g + 2] = v.has_momentum ? 1.0 : 0.0;
  }
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Prepared steps (prepared_step.h)

PreparedCpuStep::~PreparedCpuStep() = default;

PreparedCpuStep::PreparedCpuStep(const char* op, int64_t hyper_slots, size_t state_lists, PreparedStepInputs inputs,
                                 std::vector<StateList> (*state_views)(const std::vector<std::vector<at::Tensor>>&))
    : op_(op),
      hyper_slots_(hyper_slots),
      hyper_(std::move(inputs.hyper)),
      programs_(std::move(inputs.programs)),
      group_steps_(std::move(inputs.group_steps)),
      plateau_state_(std::move(inputs.plateau_state)),
      max_grad_norm_(inputs.max_grad_norm),
      skip_nonfinite_(inputs.skip_nonfinite),
      grad_norm_(std::move(inputs.grad_norm)) {
  TORCH_CHECK(inputs.states.size() == state_lists, op, ": a prepared step takes ", state_lists, " state lists, got ",
              inputs.states.size());
  TORCH_CHECK(state_lists <= kMaxStateLists, op, ": more state lists than a prepared step holds");
  states_ = std::move(inputs.states);
  state_lists_ = state_views(states_);
  std::vector<at::Tensor>& params = inputs.params;
  groups_ = check_step_lists(op, at::kCPU, params.size(), params.size(), state_lists_, inputs.steps,
                             inputs.tensor_group, hyper_, hyper_slots_, programs_, group_steps_, plateau_state_);
  check_grad_options(op, at::Device(at::kCPU),
                     GradOptions{std::nullopt, std::nullopt, max_grad_norm_, skip_nonfinite_, grad_norm_});
  params_.resize(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    params_[i].param = std::move(params[i]);
    params_[i].step_tensor = std::move(inputs.steps[i]);
    params_[i].group = inputs.tensor_group[i];
  }
}

void PreparedCpuStep::set_hyper(std::vector<double> hyper) {
  TORCH_CHECK(hyper.size() == hyper_.size(), op_, ": set_hyper takes ", hyper_.size(), " values, got ", hyper.size());
  hyper_ = std::move(hyper);
}

void PreparedCpuStep::KeptStorage::keep(const at::Tensor& t) {
  storage = c10::intrusive_ptr<c10::StorageImpl>::reclaim_copy(t.storage().unsafeGetStorageImpl());
  data = storage->data();
  nbytes = storage->nbytes();
}

bool PreparedCpuStep::still_checked(size_t i) const {
  const Param& p = params_[i];
  if (!p.checked) return false;
  const at::Tensor& param = p.param;
  if (param.scalar_type() != p.dtype || param.sizes() != at::IntArrayRef(p.sizes) ||
      param.strides() != at::IntArrayRef(p.strides) || !param.device().is_cpu() || param.is_inference() ||
      param.is_neg()) {
    return false;
  }
  // The state's memory: each storage still holds the allocation the check saw, of the same size.
  for (const KeptStorage& kept : p.state_storage) {
    if (kept.moved()) return false;
  }
  return !p.step_storage.moved();
}

void PreparedCpuStep::check(size_t i) {
  Param& p = params_[i];
  p.checked = false;
  p.storage = check_param_tensors(op_, at::kCPU, at::Device(at::kCPU), p.param, state_lists_, p.step_tensor, p.group,
                                  groups_, i);
  p.dtype = p.param.scalar_type();
  p.sizes.assign(p.param.sizes().begin(), p.param.sizes().end());
  p.strides.assign(p.param.strides().begin(), p.param.strides().end());
  {
    // Storages released here, maybe on a pool thread, could be the last owners of Python objects:
    // step() frees them on the calling thread.
    const std::lock_guard<std::mutex> lock(retired_mutex_);
    for (KeptStorage& kept : p.state_storage) {
      if (kept.storage) retired_.push_back(std::move(kept.storage));
    }
    if (p.step_storage.storage) retired_.push_back(std::move(p.step_storage.storage));
  }
  p.state = {};
  p.state_storage = {};
  for (size_t k = 0; k < states_.size(); ++k) {
    const at::Tensor& state = states_[k][i];
    p.state[k] = state.numel() == 0 ? nullptr : state.mutable_data_ptr();
    if (p.state[k] != nullptr) p.state_storage[k].keep(state);
  }
  p.step = p.step_tensor.mutable_data_ptr<int64_t>();
  p.step_storage.keep(p.step_tensor);
  p.checked = true;
}

// The jobs of a step: make(i, common part) for each parameter i with a gradient, in order, and the
// gradient copies they read. Thousands of parameters are gathered by all threads (their metadata
// is mostly out of the caches: the misses of different threads overlap); a failed check raises the
// error of the first parameter that fails, as a serial loop would.
template <typename JobT, typename Make>
void PreparedCpuStep::gather(std::vector<JobT>& slots, const Make& make, const std::vector<at::Tensor>* grads,
                             std::vector<at::Tensor>& copies) {
  const char* op = op_;
  const at::Device cpu(at::kCPU);
  const size_t n = params_.size();
  TORCH_CHECK(grads == nullptr || grads->size() == n, op, ": ", grads == nullptr ? 0 : grads->size(),
              " gradients given for ", n, " parameters");
  std::vector<char>& active = active_;
  slots.resize(n);
  active.assign(n, 0);
  std::mutex mutex;
  size_t failed_at = n;
  std::exception_ptr failure;
  auto gather_range = [&](int64_t begin, int64_t end) {
    std::vector<at::Tensor> range_copies;
    for (int64_t index = begin; index < end; ++index) {
      const size_t i = static_cast<size_t>(index);
      try {
        const at::Tensor& grad = grads != nullptr ? (*grads)[i] : params_[i].param.grad();
        if (!grad.defined()) continue;
        if (!still_checked(i)) check(i);
        const Param& p = params_[i];
        const void* grad_data = checked_grad_data(op, at::kCPU, cpu, p.param, grad, i, range_copies);
        slots[i] = make(p, Job{i, p.param.mutable_data_ptr(), grad_data, p.dtype, p.param.numel(), p.group, p.step,
                               p.param.unsafeGetTensorImpl(), p.storage});
        active[i] = 1;
      } catch (...) {
        const std::lock_guard<std::mutex> lock(mutex);
        if (i < failed_at) {
          failed_at = i;
          failure = std::current_exception();
        }
        break;
      }
    }
    if (!range_copies.empty()) {
      const std::lock_guard<std::mutex> lock(mutex);
      for (at::Tensor& copy : range_copies) copies.push_back(std::move(copy));
    }
  };
  if (n >= kParallelGatherFrom) {
    at::parallel_for(0, static_cast<int64_t>(n), kParallelGatherFrom / 2, gather_range);
  } else {
    gather_range(0, static_cast<int64_t>(n));
  }
  retired_.clear();
  if (failure) std::rethrow_exception(failure);
  size_t count = 0;  // the jobs, in order, at the front
  for (size_t i = 0; i < n; ++i) {
    if (active[i]) slots[count++] = slots[i];
  }
  slots.resize(count);
}

namespace {

// The prepared step of one optimizer: the gather of the common part, the optimizer's update.
template <typename Optimizer>
class PreparedStepOf final : public PreparedCpuStep {
 public:
  static_assert(kStateLists<Optimizer> <= kMaxStateLists, "kMaxStateLists counts every optimizer's lists");

  explicit PreparedStepOf(PreparedStepInputs inputs)
      : PreparedCpuStep(step_op_label<Optimizer>(), kHyperSlots<Optimizer>, kStateLists<Optimizer>,
                        std::move(inputs), &state_lists<Optimizer, std::vector<std::vector<at::Tensor>>>) {}

  void step(const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
            const std::vector<at::Tensor>* grads) override {
    const GradOptions options{grad_scale, found_inf, max_grad_norm_, skip_nonfinite_, grad_norm_};
    check_grad_options(op_, group_steps_.device(), options);
    std::vector<at::Tensor> copies;  // gradients in another layout than their parameter's
    gather(
        jobs_,
        [](const Param& p, const Job& base) {
          OptimizerJob<Optimizer> job{};
          static_cast<Job&>(job) = base;
          for (int k = 0; k < kStateLists<Optimizer>; ++k) job.state[k] = p.state[k];
          return job;
        },
        grads, copies);
    run_step<Optimizer>(op_, jobs_, hyper_, programs_, group_steps_, plateau_state_, options, scratch_);
  }

 private:
  std::vector<OptimizerJob<Optimizer>> jobs_;  // [note: no allocation]
  StepScratch scratch_;
};

}  // namespace

std::shared_ptr<PreparedCpuStep> prepare_cpu_step(const char* optimizer, PreparedStepInputs inputs) {
  std::shared_ptr<PreparedCpuStep> prepared;
  Optimizers::for_each([&](auto tag) {
    using Optimizer = typename decltype(tag)::type;
    if (std::string(Optimizer::kName) == optimizer) prepared = std::make_shared<PreparedStepOf<Optimizer>>(std::move(inputs));
  });
  TORCH_CHECK(prepared, "fusedlr: no optimizer named ", optimizer);
  return prepared;
}

// ---------------------------------------------------------------------------------------------
// Registration: every optimizer's op, on the dense and (to refuse them clearly) sparse keys

namespace {

template <typename Optimizer>
void impl_step(torch::Library& m) {
  m.impl(step_op_name<Optimizer>().c_str(), &StepOp<Optimizer, &cpu_step<Optimizer>>::call);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedlr, CPU, m) {
  Optimizers::for_each([&](auto tag) { impl_step<typename decltype(tag)::type>(m); });
  m.impl("plateau_observe_", &plateau_observe_cpu);
  m.impl("evaluate_schedules", &evaluate_schedules_cpu);
}

// A sparse gradient routes the call to a sparse dispatch key; the same kernel then refuses it with
// a clear message (check_step_inputs) before touching anything.
TORCH_LIBRARY_IMPL(fusedlr, SparseCPU, m) {
  Optimizers::for_each([&](auto tag) { impl_step<typename decltype(tag)::type>(m); });
}

TORCH_LIBRARY_IMPL(fusedlr, SparseCsrCPU, m) {
  Optimizers::for_each([&](auto tag) { impl_step<typename decltype(tag)::type>(m); });
}

}  // namespace fusedlr
