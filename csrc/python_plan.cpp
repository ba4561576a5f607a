// The module fusedlr._C and the eager fast path of a step.
//
// [note: step plans]
// Called through torch.ops, a step converts every tensor of every list from Python to an IValue and
// back on every call: for a model of many small tensors that costs more than the update. A plan
// holds what stays the same from step to step on the C++ side: the lists (parameters, optimizer
// state, step counters) and the settings (hyperparameters, schedule programs, the group counters'
// tensors, clipping). A step reads the parameters' gradients itself and calls the same op through
// the dispatcher, unboxed, with only the GradScaler's tensors passed in from Python; on the CPU it
// runs the prepared step instead (cpu/prepared_step.h). Under torch.compile the optimizer calls
// torch.ops (fusedlr/optim.py).
//
// [note: next lrs]
// A scheduled group's "lr" is a 0-dim float64 view into the optimizer's group_lrs vector: the lr
// the group's next step uses (torch's convention, fusedlr/lr.py). After each step the plan writes
// there each group's schedule at its new step count, on the device and without a host sync: on
// the CPU directly, on another device with the evaluate_schedules op. The write does not bump the
// vector's version counter, so that the optimizer can tell its own writes from anyone else's.

#include <torch/extension.h>

#include "cpu/cpu_isa.h"
#include "cpu/prepared_step.h"
#include "cpu/state_memory.h"
#include "optimizers.h"
#include "schedule_math.h"
#include "step_op.h"
#include "storage_math.h"

#include <algorithm>
#include <iterator>
#include <optional>
#include <string>
#include <vector>

namespace fusedlr {
namespace {

// [note: remainders] for checkpoints and mode changes (fusedlr/_state.py): a float32 master as its
// bfloat16 parameter and int16 remainder, and back, by the kernels' own functions (storage_math.h).
std::pair<at::Tensor, at::Tensor> split_master_cpu(const at::Tensor& master) {
  TORCH_CHECK(master.scalar_type() == at::kFloat && master.device().is_cpu(),
              "fusedlr.split_master: a float32 CPU tensor is required, got ", master.scalar_type(), " on ",
              master.device());
  const at::Tensor m = master.contiguous();
  at::Tensor param = at::empty(m.sizes(), m.options().dtype(at::kBFloat16));
  at::Tensor remainder = at::empty(m.sizes(), m.options().dtype(at::kShort));
  const float* in = m.const_data_ptr<float>();
  auto* p = param.mutable_data_ptr<at::BFloat16>();
  auto* r = remainder.mutable_data_ptr<int16_t>();
  for (int64_t i = 0; i < m.numel(); ++i) {
    const MasterHalves halves = split_master(in[i]);
    p[i] = at::BFloat16(halves.param, at::BFloat16::from_bits());
    r[i] = halves.remainder;
  }
  return {param, remainder};
}

at::Tensor join_master_cpu(const at::Tensor& param, const at::Tensor& remainder) {
  TORCH_CHECK(param.scalar_type() == at::kBFloat16 && remainder.scalar_type() == at::kShort &&
                  param.device().is_cpu() && remainder.device().is_cpu() && param.sizes() == remainder.sizes(),
              "fusedlr.join_master: a bfloat16 and an int16 CPU tensor of one shape are required, got ",
              param.scalar_type(), " ", param.sizes(), " and ", remainder.scalar_type(), " ", remainder.sizes());
  const at::Tensor p = param.contiguous(), r = remainder.contiguous();
  at::Tensor master = at::empty(p.sizes(), p.options().dtype(at::kFloat));
  const auto* pp = p.const_data_ptr<at::BFloat16>();
  const auto* rr = r.const_data_ptr<int16_t>();
  float* out = master.mutable_data_ptr<float>();
  for (int64_t i = 0; i < p.numel(); ++i) out[i] = join_master(pp[i].x, rr[i]);
  return master;
}

// [note: 8-bit state] for checkpoints (storage_math.h): a float32 tensor's values in memory order
// as e4m3 codes and block scales, and back, by the kernels' own functions.
// With `bits` (an int32 tensor of one value per element), each value rounds stochastically with
// its element's bits (mx_encode_stochastic), else to nearest.
at::Tensor mx_encode_cpu(const at::Tensor& values, const std::optional<at::Tensor>& bits) {
  TORCH_CHECK(values.scalar_type() == at::kFloat && values.device().is_cpu(),
              "fusedlr.mx_encode: a float32 CPU tensor is required, got ", values.scalar_type(), " on ",
              values.device());
  TORCH_CHECK(!bits.has_value() || (bits->scalar_type() == at::kInt && bits->device().is_cpu() &&
                                    bits->numel() == values.numel()),
              "fusedlr.mx_encode: bits must be an int32 CPU tensor of one value per element");
  const at::Tensor v = values.contiguous();
  const at::Tensor random = bits.has_value() ? bits->contiguous() : at::Tensor();
  const int32_t* r = bits.has_value() ? random.const_data_ptr<int32_t>() : nullptr;
  const int64_t n = v.numel();
  at::Tensor out = at::empty({mx_bytes(n)}, v.options().dtype(at::kByte));
  const float* in = v.const_data_ptr<float>();
  uint8_t* codes = out.mutable_data_ptr<uint8_t>();
  uint8_t* scales = codes + n;
  for (int64_t block = 0; block < mx_blocks(n); ++block) {
    const int64_t begin = block * kMxBlock, end = std::min(begin + kMxBlock, n);
    uint32_t largest = 0;
    for (int64_t i = begin; i < end; ++i) largest = std::max(largest, finite_magnitude_bits(in[i]));
    const uint8_t scale = mx_scale_byte(largest);
    scales[block] = scale;
    for (int64_t i = begin; i < end; ++i) {
      codes[i] = r != nullptr ? mx_encode_stochastic(in[i], scale, static_cast<uint32_t>(r[i])) : mx_encode(in[i], scale);
    }
  }
  return out;
}

// The random bits of stochastic rounding ([note: stochastic rounding]) of elements [0, numel) of
// tensor `tensor` at step `step`, stream `stream`, as int32: what the kernels draw, for tests.
at::Tensor rounding_bits_cpu(int64_t seed, int64_t tensor, int64_t step, int64_t stream, int64_t numel) {
  TORCH_CHECK(seed >= 0 && numel >= 0 && stream >= 0, "fusedlr.rounding_bits: seed, stream and numel must be >= 0");
  at::Tensor out = at::empty({numel}, at::TensorOptions().dtype(at::kInt));
  int32_t* bits = out.mutable_data_ptr<int32_t>();
  const uint64_t key = rounding_key(static_cast<uint64_t>(seed), tensor, step, static_cast<int>(stream));
  for (int64_t e = 0; e < numel; ++e) bits[e] = static_cast<int32_t>(random_bits(key, e));
  return out;
}

at::Tensor mx_decode_cpu(const at::Tensor& bytes, int64_t numel) {
  TORCH_CHECK(numel >= 0 && bytes.scalar_type() == at::kByte && bytes.device().is_cpu() && bytes.dim() == 1 &&
                  bytes.numel() == mx_bytes(numel),
              "fusedlr.mx_decode: a 1-D uint8 CPU tensor of ", numel, " codes and their ", mx_blocks(numel),
              " block scales is required, got ", bytes.scalar_type(), " ", bytes.sizes(), " on ", bytes.device());
  const at::Tensor b = bytes.contiguous();
  at::Tensor out = at::empty({numel}, b.options().dtype(at::kFloat));
  const uint8_t* codes = b.const_data_ptr<uint8_t>();
  const uint8_t* scales = codes + numel;
  float* values = out.mutable_data_ptr<float>();
  for (int64_t i = 0; i < numel; ++i) values[i] = mx_decode(codes[i], scales[i / kMxBlock]);
  return out;
}

// [note: DTensor gradients] The local shards of a step's gradients, one per parameter (None for
// none), read in one loop on this side: for a step of many small DTensor parameters (FSDP2) the
// per-parameter cost of reading them is the cost of DTensor parameters, and the same loop in
// Python (its attribute reads, type and spec checks) costs about three times this one. A DTensor
// parameter's gradient whose spec is the parameter's own (FSDP2 makes both from one spec) gives its
// _local_tensor; any other goes to `fallback(param)` (fusedlr/distributed.py, local_grad: the one
// rule for other placements, which redistributes or raises; tensor parallel's gradients, whose
// specs are new each backward, go there too). Any other parameter gives its .grad as it is, read
// from the tensor as the plain path reads it (a subclass's Python .grad property is not consulted).
pybind11::list local_grads(const pybind11::sequence& params, const pybind11::handle& dtensor_type,
                           const pybind11::function& fallback) {
  // interned once and kept for the life of the process (a failed interning raises, and is tried
  // again on the next call)
  static PyObject* spec_name = nullptr;
  static PyObject* local_name = nullptr;
  if (spec_name == nullptr && (spec_name = PyUnicode_InternFromString("_spec")) == nullptr) {
    throw pybind11::error_already_set();
  }
  if (local_name == nullptr && (local_name = PyUnicode_InternFromString("_local_tensor")) == nullptr) {
    throw pybind11::error_already_set();
  }
  const size_t n = pybind11::len(params);
  pybind11::list out(n);
  for (size_t i = 0; i < n; ++i) {
    const pybind11::object param = params[i];
    TORCH_CHECK(THPVariable_Check(param.ptr()), "fusedlr.local_grads: parameter ", i, " is not a tensor");
    const at::Tensor& grad_tensor = THPVariable_Unpack(param.ptr()).grad();
    if (!grad_tensor.defined()) {
      out[i] = pybind11::none();
      continue;
    }
    PyObject* const wrapped = THPVariable_Wrap(grad_tensor);
    if (wrapped == nullptr) throw pybind11::error_already_set();
    pybind11::object grad = pybind11::reinterpret_steal<pybind11::object>(wrapped);
    if (pybind11::isinstance(param, dtensor_type)) {
      const bool own_spec = pybind11::getattr(grad, spec_name, pybind11::none()).is(param.attr(spec_name));
      grad = own_spec ? grad.attr(local_name) : fallback(param);
    }
    out[i] = std::move(grad);
  }
  return out;
}

// The gradients of a step: `given` (one per parameter, undefined for none) where the optimizer
// passes them (the local shards of DTensor gradients, fusedlr/distributed.py), else each
// parameter's .grad; None where there is none.
c10::List<std::optional<at::Tensor>> grads_of(const std::vector<at::Tensor>& params,
                                              const std::vector<at::Tensor>* given) {
  TORCH_CHECK(given == nullptr || given->size() == params.size(), "fusedlr: ", given == nullptr ? 0 : given->size(),
              " gradients given for ", params.size(), " parameters");
  c10::List<std::optional<at::Tensor>> grads;
  grads.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& grad = given != nullptr ? (*given)[i] : params[i].grad();
    grads.push_back(grad.defined() ? std::optional<at::Tensor>(grad) : std::nullopt);
  }
  return grads;
}

// A plan step's `grads` argument: None, or a list with None for a parameter without a gradient.
using GivenGrads = std::optional<std::vector<std::optional<at::Tensor>>>;

std::optional<std::vector<at::Tensor>> unpack_grads(const GivenGrads& grads) {
  if (!grads.has_value()) return std::nullopt;
  std::vector<at::Tensor> out;
  out.reserve(grads->size());
  for (const auto& grad : *grads) out.push_back(grad.has_value() ? *grad : at::Tensor());
  return out;
}

using OptionalTensor = std::optional<at::Tensor>;

// The arguments of a step that stay the same until the optimizer's settings change; the optimizer
// sets them when it builds the plan and whenever they change.
struct StepSettings {
  std::vector<double> hyper, programs;
  at::Tensor group_steps, plateau_state;
  std::optional<double> max_grad_norm;
  bool skip_nonfinite = false;
  OptionalTensor grad_norm;
  OptionalTensor group_lrs;  // float64 [groups]: each group's next lr ([note: next lrs])

  void set(std::vector<double> hyper_, std::vector<double> programs_, at::Tensor group_steps_,
           at::Tensor plateau_state_, std::optional<double> max_grad_norm_, bool skip_nonfinite_,
           OptionalTensor grad_norm_, OptionalTensor group_lrs_) {
    hyper = std::move(hyper_);
    programs = std::move(programs_);
    group_steps = std::move(group_steps_);
    plateau_state = std::move(plateau_state_);
    max_grad_norm = max_grad_norm_;
    skip_nonfinite = skip_nonfinite_;
    grad_norm = std::move(grad_norm_);
    group_lrs = std::move(group_lrs_);
    if (group_lrs.has_value()) {
      const at::Tensor& lrs = *group_lrs;
      TORCH_CHECK(lrs.scalar_type() == at::kDouble && lrs.dim() == 1 && lrs.numel() == group_steps.numel() &&
                      lrs.is_contiguous() && lrs.device() == group_steps.device(),
                  "fusedlr: group_lrs must be a contiguous float64 vector of one lr per group on ",
                  group_steps.device(), ", got ", lrs.scalar_type(), " of shape ", lrs.sizes(), " on ", lrs.device());
    }
  }

  // [note: next lrs]; slots: hyperparameters per group, the lr (the group's base lr) at lr_slot.
  void write_next_lrs(int64_t slots, int64_t lr_slot) const {
    if (!group_lrs.has_value()) return;
    const at::Tensor& lrs = *group_lrs;
    const int64_t groups = lrs.numel();
    if (lrs.is_cpu()) {
      double* lr = lrs.data_ptr<double>();
      const int64_t* step = group_steps.const_data_ptr<int64_t>();
      const double* plateau = plateau_state.const_data_ptr<double>();
      for (int64_t g = 0; g < groups; ++g) {
        lr[g] = evaluate_schedule(programs.data(), static_cast<int>(g), step[g], hyper[g * slots + lr_slot],
                                  plateau + g * plateau_state.size(1))
                    .lr;
      }
      return;
    }
    static const auto evaluate = c10::Dispatcher::singleton()
                                     .findSchemaOrThrow("fusedlr::evaluate_schedules", "")
                                     .typed<at::Tensor(c10::ArrayRef<double>, c10::ArrayRef<double>,
                                                       const at::Tensor&, const at::Tensor&)>();
    std::vector<double> base_lrs(groups);
    for (int64_t g = 0; g < groups; ++g) base_lrs[g] = hyper[g * slots + lr_slot];
    const at::Tensor values = evaluate.call(programs, base_lrs, group_steps, plateau_state);
    const at::AutoDispatchBelowADInplaceOrView no_version_bump;
    at::Tensor(lrs).copy_(values.select(1, 0));
  }
};

// The plan of one optimizer: its op's lists, its settings, and on the CPU its prepared step.
template <typename Optimizer>
struct Plan {
  static constexpr int kLists = kStateLists<Optimizer>;
  std::vector<at::Tensor> params;
  std::vector<std::vector<at::Tensor>> states;  // [state list][parameter], in the op's order
  std::vector<at::Tensor> steps;
  std::vector<int64_t> tensor_group;
  StepSettings settings;
  std::shared_ptr<PreparedCpuStep> prepared;  // the CPU fast path (cpu/prepared_step.h, [note: prepared steps])

  Plan(std::vector<at::Tensor> params_, std::vector<std::vector<at::Tensor>> states_, std::vector<at::Tensor> steps_,
       std::vector<int64_t> tensor_group_)
      : params(std::move(params_)),
        states(std::move(states_)),
        steps(std::move(steps_)),
        tensor_group(std::move(tensor_group_)) {
    TORCH_CHECK(states.size() == static_cast<size_t>(kLists), step_op_label<Optimizer>(), ": a plan takes ", kLists,
                " state lists, got ", states.size());
  }

  void prepare() {
    prepared = nullptr;
    const StepSettings& s = settings;
    if (!s.group_steps.defined() || !s.group_steps.is_cpu()) return;
    prepared = prepare_cpu_step(Optimizer::kName, {params, states, steps, tensor_group, s.hyper, s.programs,
                                                   s.group_steps, s.plateau_state, s.max_grad_norm, s.skip_nonfinite,
                                                   s.grad_norm});
  }

  // grad_scale, found_inf: what torch.amp.GradScaler sets on the optimizer (ops.cpp, [note: amp]).
  void run(const OptionalTensor& grad_scale, const OptionalTensor& found_inf, const GivenGrads& given) const {
    const std::optional<std::vector<at::Tensor>> grads = unpack_grads(given);
    const std::vector<at::Tensor>* grads_in = grads.has_value() ? &*grads : nullptr;
    if (prepared) return prepared->step(grad_scale, found_inf, grads_in);
    call_op(grads_of(params, grads_in), grad_scale, found_inf, std::make_index_sequence<kLists>{});
  }

  template <size_t... I>
  void call_op(const c10::List<OptionalTensor>& grads, const OptionalTensor& grad_scale,
               const OptionalTensor& found_inf, std::index_sequence<I...>) const {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow(("fusedlr::" + step_op_name<Optimizer>()).c_str(), "")
                               .template typed<typename StepSignature<Optimizer>::type>();
    const StepSettings& s = settings;
    op.call(params, grads, at::TensorList(states[I])..., steps, tensor_group, s.hyper, s.programs, s.group_steps,
            s.plateau_state, grad_scale, found_inf, s.max_grad_norm, s.skip_nonfinite, s.grad_norm);
  }

  // grads: None, or one per parameter (None for none) to use instead of their .grad
  void step(const OptionalTensor& grad_scale, const OptionalTensor& found_inf, const GivenGrads& grads) const {
    run(grad_scale, found_inf, grads);
    write_next_lrs();
  }

  void set_hyper(std::vector<double> hyper) {
    if (prepared) prepared->set_hyper(hyper);
    settings.hyper = std::move(hyper);
    write_next_lrs();
  }

  void write_next_lrs() const { settings.write_next_lrs(kHyperSlots<Optimizer>, Optimizer::Slot::kLr); }
};

// plan.configure(hyper, programs, group_steps, plateau_state, max_grad_norm, skip_nonfinite, grad_norm,
// group_lrs), plan.set_hyper(hyper) and plan.step(grad_scale, found_inf)
template <typename PlanT>
void define_methods(pybind11::class_<PlanT>& plan) {
  plan.def(
      "configure",
      [](PlanT& self, std::vector<double> hyper, std::vector<double> programs, at::Tensor group_steps,
         at::Tensor plateau_state, std::optional<double> max_grad_norm, bool skip_nonfinite,
         OptionalTensor grad_norm, OptionalTensor group_lrs) {
        self.settings.set(std::move(hyper), std::move(programs), std::move(group_steps), std::move(plateau_state),
                          max_grad_norm, skip_nonfinite, std::move(grad_norm), std::move(group_lrs));
        self.prepare();
        self.write_next_lrs();
      },
      pybind11::arg("hyper"), pybind11::arg("programs"), pybind11::arg("group_steps"), pybind11::arg("plateau_state"),
      pybind11::arg("max_grad_norm"), pybind11::arg("skip_nonfinite"), pybind11::arg("grad_norm"),
      pybind11::arg("group_lrs"));
  plan.def("set_hyper", &PlanT::set_hyper, pybind11::arg("hyper"),
           "New hyperparameter values (as many as before), without preparing the lists again.");
  plan.def("step", &PlanT::step, pybind11::arg("grad_scale"), pybind11::arg("found_inf"),
           pybind11::arg("grads") = pybind11::none());
}

}  // namespace
}  // namespace fusedlr

PYBIND11_MODULE(_C, m) {
  using namespace fusedlr;
#ifdef FUSEDLR_WITH_CUDA
  m.attr("cuda_built") = true;
#else
  m.attr("cuda_built") = false;
#endif
  m.def("cpu_isa", [] { return std::string(cpu_isa_name(cpu_isa())); },
        "The instruction set the CPU loops run (cpu/cpu_isa.h, [note: instruction sets]).");
  m.def("cpu_isas_supported", &cpu_isas_supported, "The instruction sets this CPU can run the loops in.");
  m.def(
      "schedule_kinds",
      [] {
        pybind11::dict kinds;
        for (int id = 0; id < kScheduleKindCount; ++id) {
          const ScheduleKindInfo& k = kScheduleKinds[id];
          kinds[k.name] = pybind11::dict(pybind11::arg("id") = id, pybind11::arg("fixed_args") = k.fixed_args,
                                         pybind11::arg("count_arg") = k.count_arg,
                                         pybind11::arg("args_per_item") = k.args_per_item,
                                         pybind11::arg("momentum_flag_arg") = k.momentum_flag_arg);
        }
        return kinds;
      },
      "The schedule node kinds of csrc/schedule_math.h ([note: schedule kinds]) by name: id and arg layout.");
  m.def(
      "schedule_state_slots",
      [] {
        pybind11::dict slots;
        slots["ReduceLROnPlateau"] = std::vector<std::string>(std::begin(kPlateauSlotNames), std::end(kPlateauSlotNames));
        slots["GreedyLR"] = std::vector<std::string>(std::begin(kGreedySlotNames), std::end(kGreedySlotNames));
        return slots;
      },
      "The slots of each metric-driven schedule's row of state by name ([note: schedule state]); GreedyLR's "
      "window_values is the first of its window.");
  m.attr("max_greedy_window") = kMaxGreedyWindow;
  m.def(
      "schedule_state_widths",
      [](std::vector<double> programs, int64_t groups) {
        check_programs("fusedlr.schedule_state_widths", programs, groups);
        std::vector<int64_t> widths(groups);
        for (int64_t g = 0; g < groups; ++g) widths[g] = group_state_width(programs, g);
        return widths;
      },
      pybind11::arg("programs"), pybind11::arg("groups"),
      "The row of schedule state each group's schedule needs ([note: schedule state]).");
  m.def(
      "schedule_kind_name",
      [](std::vector<double> programs, int64_t group) {
        TORCH_CHECK(group >= 0, "fusedlr.schedule_kind_name: group ", group, " is negative");
        check_programs("fusedlr.schedule_kind_name", programs, group + 1);
        return std::string(kScheduleKinds[static_cast<int>(programs[as_int(programs[group])])].name);
      },
      pybind11::arg("programs"), pybind11::arg("group"), "The kind of group `group`'s root schedule node.");
  m.def(
      "schedule_state_problem",
      [](std::vector<double> programs, int64_t groups, const at::Tensor& state) {
        return schedule_state_problem(programs, groups, state.contiguous());
      },
      pybind11::arg("programs"), pybind11::arg("groups"), pybind11::arg("state"),
      "What is wrong with a row of schedule state (a loaded one), or an empty string.");
  m.def("split_master", &split_master_cpu, pybind11::arg("master"),
        "A float32 CPU tensor as its bfloat16 rounding (to nearest, ties away) and the int16 remainder.");
  m.def("join_master", &join_master_cpu, pybind11::arg("param"), pybind11::arg("remainder"),
        "The float32 master of a bfloat16 CPU tensor and its int16 remainder.");
  m.def("mx_encode", &mx_encode_cpu, pybind11::arg("values"), pybind11::arg("bits") = pybind11::none(),
        "A float32 CPU tensor's values as e4m3 codes and a power-of-two scale per block of 32 ([note: 8-bit state]), "
        "rounded to nearest, or stochastically with `bits` (int32, one per element).");
  m.def("mx_decode", &mx_decode_cpu, pybind11::arg("bytes"), pybind11::arg("numel"),
        "The float32 values of `numel` e4m3 codes and their block scales (a 1-D uint8 CPU tensor).");
  m.def("rounding_bits", &rounding_bits_cpu, pybind11::arg("seed"), pybind11::arg("tensor"), pybind11::arg("step"),
        pybind11::arg("stream"), pybind11::arg("numel"),
        "The 32 random bits (int32) of elements [0, numel) that stochastic rounding draws for one tensor, step "
        "and stream ([note: stochastic rounding]).");
  m.def("local_grads", &local_grads, pybind11::arg("params"), pybind11::arg("dtensor_type"),
        pybind11::arg("fallback"), "The local shards of the parameters' gradients ([note: DTensor gradients]).");
  m.def("packed_state_buffer", &packed_state_buffer, pybind11::arg("numel"), pybind11::arg("dtype"),
        "A zero CPU tensor for packed optimizer state, on huge pages where the kernel gives them on request.");
  // Each optimizer's plan class and its descriptor (optimizer_traits.h): the names of its
  // hyperparameter slots in `hyper` order, its state lists in the op's order, and the slot a
  // schedule that cycles the momentum replaces (fusedlr/_ops.py).
  pybind11::dict optimizers;
  Optimizers::for_each([&](auto tag) {
    using Optimizer = typename decltype(tag)::type;
    using OptimizerPlan = Plan<Optimizer>;
    pybind11::class_<OptimizerPlan> plan(m, Optimizer::kPlanName);
    plan.def(pybind11::init<std::vector<at::Tensor>, std::vector<std::vector<at::Tensor>>, std::vector<at::Tensor>,
                            std::vector<int64_t>>(),
             pybind11::arg("params"), pybind11::arg("states"), pybind11::arg("steps"), pybind11::arg("tensor_group"));
    define_methods(plan);
    pybind11::list slots, states;
    for (const char* slot : Optimizer::kSlotNames) slots.append(slot);
    for (const char* slot : kCommonSlotNames) slots.append(slot);
    for (int k = 0; k < kStateLists<Optimizer>; ++k) {
      const StateSpec& spec = state_spec<Optimizer>(k);
      states.append(pybind11::make_tuple(spec.key, spec.optional));
    }
    pybind11::dict descriptor;
    descriptor["op"] = step_op_name<Optimizer>();
    descriptor["plan"] = plan;
    descriptor["slots"] = pybind11::tuple(slots);
    descriptor["states"] = pybind11::tuple(states);
    descriptor["momentum_slot"] = Optimizer::kSlotNames[Optimizer::kMomentumSlot];
    optimizers[Optimizer::kName] = descriptor;
  });
  m.attr("optimizers") = optimizers;
}
