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
#include <type_traits>
#include <vector>

#include "../schedule_math.h"
#include "../step_inputs.h"
#include "../update_math.h"

namespace fusedlr {
namespace {

// The element loops are compiled for AVX-512, AVX2 and baseline x86-64, picked at load time by the
// CPU. With -ffp-contract=off (setup.py) every version rounds the same: results do not depend on
// the machine.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FUSEDLR_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FUSEDLR_CPU_CLONES
#endif

constexpr int64_t kChunkSize = int64_t{1} << 16;
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

ChunkPlan plan_chunks(const std::vector<int64_t>& numels) {
  ChunkPlan plan;
  int64_t total = 0;
  for (size_t i = 0; i < numels.size(); ++i) {
    for (int64_t begin = 0; begin < numels[i]; begin += kChunkSize) {
      plan.chunks.push_back({static_cast<int64_t>(i), begin, std::min(begin + kChunkSize, numels[i])});
    }
    total += numels[i];
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
  return plan;
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

template <typename param_t, typename math_t>
FUSEDLR_CPU_CLONES double sum_of_squares_in_double(const param_t* __restrict__ grad, int64_t begin, int64_t end) {
  double lanes[kLanes] = {};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const double x = static_cast<double>(static_cast<math_t>(grad[i + k]));
      lanes[k] += x * x;
    }
  }
  double total = 0;
  for (; i < end; ++i) {
    const double x = static_cast<double>(static_cast<math_t>(grad[i]));
    total += x * x;
  }
  for (int k = 0; k < kLanes; ++k) total += lanes[k];
  return total;
}

template <typename param_t>
FUSEDLR_CPU_CLONES double sum_of_squares_blocked(const param_t* __restrict__ grad, int64_t begin, int64_t end) {
  double lanes[kLanes] = {};
  int64_t i = begin;
  for (; i + kRows * kLanes <= end; i += kRows * kLanes) {
    float block[kLanes] = {};
    for (int r = 0; r < kRows; ++r) {
      for (int k = 0; k < kLanes; ++k) {
        const float x = static_cast<float>(grad[i + r * kLanes + k]);
        block[k] += x * x;
      }
    }
    for (int k = 0; k < kLanes; ++k) lanes[k] += block[k];
  }
  double total = 0;
  for (; i < end; ++i) {
    const double x = static_cast<double>(static_cast<float>(grad[i]));
    total += x * x;
  }
  for (int k = 0; k < kLanes; ++k) total += lanes[k];
  return total;
}

template <typename param_t, typename math_t>
double sum_of_squares(const param_t* grad, int64_t begin, int64_t end) {
  if constexpr (std::is_same_v<math_t, double>) {
    return sum_of_squares_in_double<param_t, math_t>(grad, begin, end);
  } else {
    const double blocked = sum_of_squares_blocked(grad, begin, end);
    if (blocked >= 1e-30 && blocked <= 1e30) return blocked;
    return sum_of_squares_in_double<param_t, math_t>(grad, begin, end);
  }
}

// What a step does to its gradients, and whether it is skipped (update_math.h, [note: gradient
// adjustments]). With options.grad_norm the global norm is computed, by chunks in a fixed order
// (the same norm whatever the number of threads), and written there.
struct StepControl {
  GradAdjust adjust;
  bool skip;
};

StepControl control_step(const GradOptions& options, const ChunkPlan& plan, const ActiveTensors& active,
                         at::TensorList params) {
  StepControl control;
  const bool found_inf = GradOptions::given(options.found_inf) && options.found_inf->item<double>() != 0;
  if (GradOptions::given(options.grad_scale)) control.adjust.scale = options.grad_scale->item<double>();
  double norm = 0;
  if (options.wants_norm()) {
    std::vector<double> partial(plan.chunks.size());
    run_chunks(plan, [&](size_t c, const Chunk& chunk) {
      const void* grad = active.grad_data[chunk.tensor];
      dispatch_param_dtype(params[active.index[chunk.tensor]].scalar_type(), [&](auto types) {
        using Types = decltype(types);
        partial[c] = sum_of_squares<typename Types::param_t, typename Types::math_t>(
            static_cast<const typename Types::param_t*>(grad), chunk.begin, chunk.end);
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

// The schedule of every group at its current step.
std::vector<ScheduleValue> evaluate_groups(c10::ArrayRef<double> hyper, int64_t hyper_slots, int64_t lr_slot,
                                           c10::ArrayRef<double> programs, const at::Tensor& group_steps,
                                           const at::Tensor& plateau_state) {
  const int64_t groups = group_steps.numel();
  const int64_t* step = group_steps.data_ptr<int64_t>();
  const double* plateau = plateau_state.data_ptr<double>();
  std::vector<ScheduleValue> values(groups);
  for (int64_t g = 0; g < groups; ++g) {
    TORCH_CHECK(step[g] >= 0, "fusedlr: the step counter of group ", g, " is negative (", step[g], ")");
    values[g] = evaluate_schedule(programs.data(), static_cast<int>(g), step[g], hyper[g * hyper_slots + lr_slot],
                                  plateau + g * plateau_slot::kCount);
  }
  return values;
}

// Once every check has passed: each group and each updated tensor has completed one more step.
void advance_counters(const at::Tensor& group_steps, at::TensorList steps, const ActiveTensors& active) {
  int64_t* group_step = group_steps.data_ptr<int64_t>();
  for (int64_t g = 0; g < group_steps.numel(); ++g) group_step[g] += 1;
  for (const int64_t i : active.index) *steps[i].mutable_data_ptr<int64_t>() += 1;
}

template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.numel() == 0 ? nullptr : static_cast<T*>(t.mutable_data_ptr());
}

// The element loops read the parameter from its float32 master copy where it has one, and write both
// (ops.cpp, [note: norm and master weights]).
template <typename param_t, typename math_t, bool kMaster>
struct ParamAccess {
  param_t* __restrict__ param;
  math_t* __restrict__ master;

  math_t load(int64_t i) const { return kMaster ? master[i] : static_cast<math_t>(param[i]); }
  void store(int64_t i, math_t value) const {
    param[i] = static_cast<param_t>(value);
    if (kMaster) master[i] = value;
  }
};

// Calls fn(TypePair, std::bool_constant<master>): master weights exist for low-precision types only.
template <typename Fn>
void dispatch_param(at::ScalarType dtype, bool master, Fn&& fn) {
  dispatch_param_dtype(dtype, [&](auto types) {
    using Types = decltype(types);
    if constexpr (std::is_same_v<typename Types::param_t, typename Types::math_t>) {
      fn(types, std::false_type{});
    } else {
      dispatch_bool(master, [&](auto with_master) { fn(types, with_master); });
    }
  });
}

// ---------------------------------------------------------------------------------------------
// SGD

struct SgdTensor {
  void* param;
  const void* grad;
  void* momentum_buffer;  // null: no buffer, or momentum 0 this step
  void* master;           // null: no master copy
  at::ScalarType dtype;
  bool weight_decay;
  SgdScalars scalars;
};

template <typename param_t, typename math_t, bool kMaster, bool kMomentum, bool kWeightDecay>
FUSEDLR_CPU_CLONES void sgd_range(const SgdTensor& job, int64_t begin, int64_t end) {
  const ParamAccess<param_t, math_t, kMaster> param{static_cast<param_t*>(job.param), static_cast<math_t*>(job.master)};
  const param_t* __restrict__ grad = static_cast<const param_t*>(job.grad);
  math_t* __restrict__ buffer = static_cast<math_t*>(job.momentum_buffer);
  const SgdCoefficients<math_t> c(job.scalars);
  for (int64_t i = begin; i < end; ++i) {
    math_t p = param.load(i);
    math_t b = kMomentum ? buffer[i] : math_t(0);
    sgd_update<math_t, kMomentum, kWeightDecay>(p, static_cast<math_t>(grad[i]), b, c);
    param.store(i, p);
    if (kMomentum) buffer[i] = b;
  }
}

void sgd_chunk(const SgdTensor& job, int64_t begin, int64_t end) {
  dispatch_param(job.dtype, job.master != nullptr, [&](auto types, auto master) {
    using Types = decltype(types);
    dispatch_bool(job.momentum_buffer != nullptr, [&](auto momentum) {
      dispatch_bool(job.weight_decay, [&](auto weight_decay) {
        sgd_range<typename Types::param_t, typename Types::math_t, master(), momentum(), weight_decay()>(job, begin,
                                                                                                        end);
      });
    });
  });
}

void sgd_step_cpu(at::TensorList params, const OptionalTensorList& grads, at::TensorList momentum_buffers,
                  at::TensorList master_weights, at::TensorList steps, at::IntArrayRef tensor_group,
                  c10::ArrayRef<double> hyper, c10::ArrayRef<double> programs, const at::Tensor& group_steps,
                  const at::Tensor& plateau_state, const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf, std::optional<double> max_grad_norm, bool skip_nonfinite,
                  const std::optional<at::Tensor>& grad_norm) {
  const char* op = "fusedlr.sgd_step_";
  const ActiveTensors active = check_step_inputs(
      op, at::kCPU, params, grads,
      {{"momentum_buffer", momentum_buffers, true}, {"master_weight", master_weights, true, true}}, steps,
      tensor_group, hyper, sgd_slot::kCount, programs, group_steps, plateau_state);
  const GradOptions options{grad_scale, found_inf, max_grad_norm, skip_nonfinite, grad_norm};
  check_grad_options(op, group_steps.device(), options);
  const auto schedule = evaluate_groups(hyper, sgd_slot::kCount, sgd_slot::kLr, programs, group_steps, plateau_state);
  const size_t n = active.index.size();
  auto scalars_of = [&](int64_t i, GradAdjust adjust) {
    const int64_t g = tensor_group[i];
    return sgd_scalars(hyper.data() + g * sgd_slot::kCount, schedule[g], *steps[i].const_data_ptr<int64_t>(), adjust);
  };
  std::vector<int64_t> numels(n);
  for (size_t j = 0; j < n; ++j) {
    const int64_t i = active.index[j];
    const double momentum = scalars_of(i, {}).momentum;
    TORCH_CHECK(momentum == 0 || momentum_buffers[i].numel() == params[i].numel(), op, ": parameter ", i,
                " is updated with momentum ", momentum, " but has no momentum_buffer");
    numels[j] = params[i].numel();
  }
  const ChunkPlan plan = plan_chunks(numels);
  const StepControl control = control_step(options, plan, active, params);
  if (control.skip) return;
  std::vector<SgdTensor> jobs(n);
  for (size_t j = 0; j < n; ++j) {
    const int64_t i = active.index[j];
    const SgdScalars s = scalars_of(i, control.adjust);
    jobs[j] = {params[i].mutable_data_ptr(), active.grad_data[j],
               s.momentum != 0 ? data_or_null<void>(momentum_buffers[i]) : nullptr,
               data_or_null<void>(master_weights[i]), params[i].scalar_type(), s.weight_decay != 0, s};
  }
  advance_counters(group_steps, steps, active);
  bump_versions(active, params);
  run_chunks(plan, [&](size_t, const Chunk& c) { sgd_chunk(jobs[c.tensor], c.begin, c.end); });
}

// ---------------------------------------------------------------------------------------------
// Adam and AdamW

struct AdamTensor {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  void* master;  // null: no master copy
  at::ScalarType dtype;
  AdamScalars scalars;
};

template <typename param_t, typename math_t, bool kMaster, bool kAmsgrad, bool kWeightDecay>
FUSEDLR_CPU_CLONES void adam_range(const AdamTensor& job, int64_t begin, int64_t end) {
  const ParamAccess<param_t, math_t, kMaster> param{static_cast<param_t*>(job.param), static_cast<math_t*>(job.master)};
  const param_t* __restrict__ grad = static_cast<const param_t*>(job.grad);
  math_t* __restrict__ exp_avg = static_cast<math_t*>(job.exp_avg);
  math_t* __restrict__ exp_avg_sq = static_cast<math_t*>(job.exp_avg_sq);
  math_t* __restrict__ max_exp_avg_sq = static_cast<math_t*>(job.max_exp_avg_sq);
  const AdamCoefficients<math_t> c(job.scalars);
  for (int64_t i = begin; i < end; ++i) {
    math_t p = param.load(i);
    math_t m = exp_avg[i];
    math_t v = exp_avg_sq[i];
    math_t v_max = kAmsgrad ? max_exp_avg_sq[i] : math_t(0);
    adam_update<math_t, kAmsgrad, kWeightDecay>(p, static_cast<math_t>(grad[i]), m, v, v_max, c);
    param.store(i, p);
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    if (kAmsgrad) max_exp_avg_sq[i] = v_max;
  }
}

void adam_chunk(const AdamTensor& job, int64_t begin, int64_t end) {
  dispatch_param(job.dtype, job.master != nullptr, [&](auto types, auto master) {
    using Types = decltype(types);
    dispatch_bool(job.scalars.amsgrad, [&](auto amsgrad) {
      dispatch_bool(job.scalars.weight_decay != 0, [&](auto weight_decay) {
        adam_range<typename Types::param_t, typename Types::math_t, master(), amsgrad(), weight_decay()>(job, begin,
                                                                                                        end);
      });
    });
  });
}

void adam_step_cpu(at::TensorList params, const OptionalTensorList& grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList master_weights,
                   at::TensorList steps, at::IntArrayRef tensor_group, c10::ArrayRef<double> hyper,
                   c10::ArrayRef<double> programs, const at::Tensor& group_steps, const at::Tensor& plateau_state,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                   std::optional<double> max_grad_norm, bool skip_nonfinite,
                   const std::optional<at::Tensor>& grad_norm) {
  const char* op = "fusedlr.adam_step_";
  const ActiveTensors active = check_step_inputs(
      op, at::kCPU, params, grads,
      {{"exp_avg", exp_avgs, false},
       {"exp_avg_sq", exp_avg_sqs, false},
       {"max_exp_avg_sq", max_exp_avg_sqs, true},
       {"master_weight", master_weights, true, true}},
      steps, tensor_group, hyper, adam_slot::kCount, programs, group_steps, plateau_state);
  for (const int64_t i : active.index) {
    const bool amsgrad = hyper[tensor_group[i] * adam_slot::kCount + adam_slot::kAmsgrad] != 0;
    TORCH_CHECK(!amsgrad || max_exp_avg_sqs[i].numel() == params[i].numel(), op, ": parameter ", i,
                " is in an amsgrad group but has no max_exp_avg_sq");
  }
  const GradOptions options{grad_scale, found_inf, max_grad_norm, skip_nonfinite, grad_norm};
  check_grad_options(op, group_steps.device(), options);
  const auto schedule = evaluate_groups(hyper, adam_slot::kCount, adam_slot::kLr, programs, group_steps, plateau_state);
  const size_t n = active.index.size();
  std::vector<int64_t> numels(n);
  for (size_t j = 0; j < n; ++j) numels[j] = params[active.index[j]].numel();
  const ChunkPlan plan = plan_chunks(numels);
  const StepControl control = control_step(options, plan, active, params);
  if (control.skip) return;
  std::vector<AdamTensor> jobs(n);
  // Consecutive tensors of a group usually share their step count: reuse the powers.
  int64_t last_group = -1, last_step = -1;
  AdamScalars last_scalars{};
  for (size_t j = 0; j < n; ++j) {
    const int64_t i = active.index[j];
    const int64_t g = tensor_group[i];
    const int64_t step = *steps[i].const_data_ptr<int64_t>() + 1;
    if (g != last_group || step != last_step) {
      last_scalars = adam_scalars(hyper.data() + g * adam_slot::kCount, schedule[g], step, control.adjust);
      last_group = g;
      last_step = step;
    }
    jobs[j] = {params[i].mutable_data_ptr(),      active.grad_data[j],
               exp_avgs[i].mutable_data_ptr(),    exp_avg_sqs[i].mutable_data_ptr(),
               data_or_null<void>(max_exp_avg_sqs[i]), data_or_null<void>(master_weights[i]),
               params[i].scalar_type(),           last_scalars};
  }
  advance_counters(group_steps, steps, active);
  bump_versions(active, params);
  run_chunks(plan, [&](size_t, const Chunk& c) { adam_chunk(jobs[c.tensor], c.begin, c.end); });
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
  const double value = metric.item<double>();
  double* state = plateau_state.data_ptr<double>();
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t node = as_int(programs[g]);
    if (static_cast<ScheduleKind>(static_cast<int>(programs[node])) != ScheduleKind::kReduceLROnPlateau) continue;
    plateau_observe(programs.data() + node + kNodeHeader, value, base_lrs[g], state + g * plateau_slot::kCount);
  }
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
        evaluate_schedule(programs.data(), static_cast<int>(g), step[g], base_lrs[g], plateau + g * plateau_slot::kCount);
    o[3 * g] = v.lr;
    o[3 * g + 1] = v.has_momentum ? v.momentum : 0.0;
    o[3 * g + 2] = v.has_momentum ? 1.0 : 0.0;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedlr, CPU, m) {
  m.impl("sgd_step_", &sgd_step_cpu);
  m.impl("adam_step_", &adam_step_cpu);
  m.impl("plateau_observe_", &plateau_observe_cpu);
  m.impl("evaluate_schedules", &evaluate_schedules_cpu);
}

}  // namespace fusedlr

// A sparse gradient routes the call to a sparse dispatch key; the same kernel then refuses it with
// a clear message (check_step_inputs) before touching anything.
TORCH_LIBRARY_IMPL(fusedlr, SparseCPU, m) {
  m.impl("sgd_step_", &fusedlr::sgd_step_cpu);
  m.impl("adam_step_", &fusedlr::adam_step_cpu);
}

TORCH_LIBRARY_IMPL(fusedlr, SparseCsrCPU, m) {
  m.impl("sgd_step_", &fusedlr::sgd_step_cpu);
  m.impl("adam_step_", &fusedlr::adam_step_cpu);
}
