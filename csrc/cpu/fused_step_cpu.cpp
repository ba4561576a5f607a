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

// Runs fn(tensor, begin, end) over all elements of tensors whose sizes are `numels`.
template <typename Fn>
void for_each_chunk(const std::vector<int64_t>& numels, const Fn& fn) {
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (size_t i = 0; i < numels.size(); ++i) {
    for (int64_t begin = 0; begin < numels[i]; begin += kChunkSize) {
      chunks.push_back({static_cast<int64_t>(i), begin, std::min(begin + kChunkSize, numels[i])});
    }
    total += numels[i];
  }
  const int64_t threads =
      total < kSerialBelow ? 1 : std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(chunks.size()));
  if (threads <= 1) {
    for (const Chunk& c : chunks) fn(c.tensor, c.begin, c.end);
    return;
  }
  // first[t]: the first chunk of thread t; each thread gets about total / threads elements.
  std::vector<size_t> first(threads + 1, chunks.size());
  first[0] = 0;
  int64_t done = 0;
  size_t next = 0;
  for (int64_t t = 1; t < threads; ++t) {
    const int64_t target = total * t / threads;
    while (next < chunks.size() && done + (chunks[next].end - chunks[next].begin) / 2 < target) {
      done += chunks[next].end - chunks[next].begin;
      ++next;
    }
    first[t] = next;
  }
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (size_t c = first[t]; c < first[t + 1]; ++c) fn(chunks[c].tensor, chunks[c].begin, chunks[c].end);
    }
  });
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

// The AMP inputs (ops.cpp, [note: amp]) on the CPU: the scale the gradients carry, and whether
// the step is to be skipped.
double grad_scale_of(const std::optional<at::Tensor>& grad_scale) {
  return grad_scale.has_value() && grad_scale->defined() ? grad_scale->item<double>() : 1.0;
}

bool found_inf_in(const std::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && found_inf->defined() && found_inf->item<double>() != 0;
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

// ---------------------------------------------------------------------------------------------
// SGD

struct SgdTensor {
  void* param;
  const void* grad;
  void* momentum_buffer;  // null: no buffer, or momentum 0 this step
  at::ScalarType dtype;
  bool weight_decay;
  SgdScalars scalars;
};

template <typename param_t, typename math_t, bool kMomentum, bool kWeightDecay>
FUSEDLR_CPU_CLONES void sgd_range(const SgdTensor& job, int64_t begin, int64_t end) {
  param_t* __restrict__ param = static_cast<param_t*>(job.param);
  const param_t* __restrict__ grad = static_cast<const param_t*>(job.grad);
  math_t* __restrict__ buffer = static_cast<math_t*>(job.momentum_buffer);
  const SgdCoefficients<math_t> c(job.scalars);
  for (int64_t i = begin; i < end; ++i) {
    math_t p = static_cast<math_t>(param[i]);
    math_t b = kMomentum ? buffer[i] : math_t(0);
    sgd_update<math_t, kMomentum, kWeightDecay>(p, static_cast<math_t>(grad[i]), b, c);
    param[i] = static_cast<param_t>(p);
    if (kMomentum) buffer[i] = b;
  }
}

void sgd_chunk(const SgdTensor& job, int64_t begin, int64_t end) {
  dispatch_param_dtype(job.dtype, [&](auto types) {
    using Types = decltype(types);
    dispatch_bool(job.momentum_buffer != nullptr, [&](auto momentum) {
      dispatch_bool(job.weight_decay, [&](auto weight_decay) {
        sgd_range<typename Types::param_t, typename Types::math_t, momentum(), weight_decay()>(job, begin, end);
      });
    });
  });
}

void sgd_step_cpu(at::TensorList params, const OptionalTensorList& grads, at::TensorList momentum_buffers, at::TensorList steps,
                  at::IntArrayRef tensor_group, c10::ArrayRef<double> hyper, c10::ArrayRef<double> programs,
                  const at::Tensor& group_steps, const at::Tensor& plateau_state,
                  const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const ActiveTensors active =
      check_step_inputs("fusedlr.sgd_step_", at::kCPU, params, grads, {{"momentum_buffer", momentum_buffers, true}},
                        steps, tensor_group, hyper, sgd_slot::kCount, programs, group_steps, plateau_state);
  check_amp_inputs("fusedlr.sgd_step_", group_steps.device(), grad_scale, found_inf);
  const double scale = grad_scale_of(grad_scale);
  const auto schedule = evaluate_groups(hyper, sgd_slot::kCount, sgd_slot::kLr, programs, group_steps, plateau_state);
  const size_t n = active.index.size();
  std::vector<SgdTensor> jobs(n);
  std::vector<int64_t> numels(n);
  for (size_t j = 0; j < n; ++j) {
    const int64_t i = active.index[j];
    const int64_t g = tensor_group[i];
    const SgdScalars s =
        sgd_scalars(hyper.data() + g * sgd_slot::kCount, schedule[g], *steps[i].const_data_ptr<int64_t>(), scale);
    TORCH_CHECK(s.momentum == 0 || momentum_buffers[i].numel() == params[i].numel(), "fusedlr.sgd_step_: parameter ",
                i, " is updated with momentum ", s.momentum, " but has no momentum_buffer");
    jobs[j] = {params[i].mutable_data_ptr(), active.grad_data[j],
               s.momentum != 0 ? data_or_null<void>(momentum_buffers[i]) : nullptr, params[i].scalar_type(),
               s.weight_decay != 0, s};
    numels[j] = params[i].numel();
  }
  if (found_inf_in(found_inf)) return;
  advance_counters(group_steps, steps, active);
  bump_versions(active, params);
  for_each_chunk(numels, [&](int64_t i, int64_t begin, int64_t end) { sgd_chunk(jobs[i], begin, end); });
}

// ---------------------------------------------------------------------------------------------
// Adam and AdamW

struct AdamTensor {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  at::ScalarType dtype;
  AdamScalars scalars;
};

template <typename param_t, typename math_t, bool kAmsgrad, bool kWeightDecay>
FUSEDLR_CPU_CLONES void adam_range(const AdamTensor& job, int64_t begin, int64_t end) {
  param_t* __restrict__ param = static_cast<param_t*>(job.param);
  const param_t* __restrict__ grad = static_cast<const param_t*>(job.grad);
  math_t* __restrict__ exp_avg = static_cast<math_t*>(job.exp_avg);
  math_t* __restrict__ exp_avg_sq = static_cast<math_t*>(job.exp_avg_sq);
  math_t* __restrict__ max_exp_avg_sq = static_cast<math_t*>(job.max_exp_avg_sq);
  const AdamCoefficients<math_t> c(job.scalars);
  for (int64_t i = begin; i < end; ++i) {
    math_t p = static_cast<math_t>(param[i]);
    math_t m = exp_avg[i];
    math_t v = exp_avg_sq[i];
    math_t v_max = kAmsgrad ? max_exp_avg_sq[i] : math_t(0);
    adam_update<math_t, kAmsgrad, kWeightDecay>(p, static_cast<math_t>(grad[i]), m, v, v_max, c);
    param[i] = static_cast<param_t>(p);
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    if (kAmsgrad) max_exp_avg_sq[i] = v_max;
  }
}

void adam_chunk(const AdamTensor& job, int64_t begin, int64_t end) {
  dispatch_param_dtype(job.dtype, [&](auto types) {
    using Types = decltype(types);
    dispatch_bool(job.scalars.amsgrad, [&](auto amsgrad) {
      dispatch_bool(job.scalars.weight_decay != 0, [&](auto weight_decay) {
        adam_range<typename Types::param_t, typename Types::math_t, amsgrad(), weight_decay()>(job, begin, end);
      });
    });
  });
}

void adam_step_cpu(at::TensorList params, const OptionalTensorList& grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList max_exp_avg_sqs, at::TensorList steps, at::IntArrayRef tensor_group,
                   c10::ArrayRef<double> hyper, c10::ArrayRef<double> programs, const at::Tensor& group_steps,
                   const at::Tensor& plateau_state, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf) {
  const ActiveTensors active = check_step_inputs(
      "fusedlr.adam_step_", at::kCPU, params, grads,
      {{"exp_avg", exp_avgs, false}, {"exp_avg_sq", exp_avg_sqs, false}, {"max_exp_avg_sq", max_exp_avg_sqs, true}},
      steps, tensor_group, hyper, adam_slot::kCount, programs, group_steps, plateau_state);
  for (const int64_t i : active.index) {
    const bool amsgrad = hyper[tensor_group[i] * adam_slot::kCount + adam_slot::kAmsgrad] != 0;
    TORCH_CHECK(!amsgrad || max_exp_avg_sqs[i].numel() == params[i].numel(),
                "fusedlr.adam_step_: parameter ", i, " is in an amsgrad group but has no max_exp_avg_sq");
  }
  check_amp_inputs("fusedlr.adam_step_", group_steps.device(), grad_scale, found_inf);
  const double scale = grad_scale_of(grad_scale);
  const auto schedule = evaluate_groups(hyper, adam_slot::kCount, adam_slot::kLr, programs, group_steps, plateau_state);
  const size_t n = active.index.size();
  std::vector<AdamTensor> jobs(n);
  std::vector<int64_t> numels(n);
  // Consecutive tensors of a group usually share their step count: reuse the powers.
  int64_t last_group = -1, last_step = -1;
  AdamScalars last_scalars{};
  for (size_t j = 0; j < n; ++j) {
    const int64_t i = active.index[j];
    const int64_t g = tensor_group[i];
    const int64_t step = *steps[i].const_data_ptr<int64_t>() + 1;
    if (g != last_group || step != last_step) {
      last_scalars = adam_scalars(hyper.data() + g * adam_slot::kCount, schedule[g], step, scale);
      last_group = g;
      last_step = step;
    }
    jobs[j] = {params[i].mutable_data_ptr(),      active.grad_data[j],
               exp_avgs[i].mutable_data_ptr(),    exp_avg_sqs[i].mutable_data_ptr(),
               data_or_null<void>(max_exp_avg_sqs[i]), params[i].scalar_type(),
               last_scalars};
    numels[j] = params[i].numel();
  }
  if (found_inf_in(found_inf)) return;
  advance_counters(group_steps, steps, active);
  bump_versions(active, params);
  for_each_chunk(numels, [&](int64_t i, int64_t begin, int64_t end) { adam_chunk(jobs[i], begin, end); });
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
