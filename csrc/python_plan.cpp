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
#include "schedule_math.h"
#include "update_math.h"

#include <optional>
#include <vector>

namespace fusedlr {
namespace {

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
                                  plateau + g * plateau_slot::kCount)
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

// The CPU fast path of a plan (cpu/prepared_step.h, [note: prepared steps]), for tensors on the CPU.
std::shared_ptr<PreparedCpuStep> prepare_on_cpu(PreparedCpuStep::Optimizer optimizer,
                                                const std::vector<at::Tensor>& params,
                                                std::vector<std::vector<at::Tensor>> states,
                                                const std::vector<at::Tensor>& steps,
                                                const std::vector<int64_t>& tensor_group, const StepSettings& s) {
  if (!s.group_steps.defined() || !s.group_steps.is_cpu()) return nullptr;
  return std::make_shared<PreparedCpuStep>(optimizer, params, std::move(states), steps, tensor_group, s.hyper,
                                           s.programs, s.group_steps, s.plateau_state, s.max_grad_norm,
                                           s.skip_nonfinite, s.grad_norm);
}

struct SgdPlan {
  std::vector<at::Tensor> params, momentum_buffers, master_weights, steps;
  std::vector<int64_t> tensor_group;
  StepSettings settings;
  std::shared_ptr<PreparedCpuStep> prepared;

  void prepare() {
    prepared = prepare_on_cpu(PreparedCpuStep::Optimizer::kSgd, params, {momentum_buffers, master_weights}, steps,
                              tensor_group, settings);
  }

  // grad_scale, found_inf: what torch.amp.GradScaler sets on the optimizer (ops.cpp, [note: amp]).
  void run(const OptionalTensor& grad_scale, const OptionalTensor& found_inf, const GivenGrads& given) const {
    const std::optional<std::vector<at::Tensor>> grads = unpack_grads(given);
    const std::vector<at::Tensor>* grads_in = grads.has_value() ? &*grads : nullptr;
    if (prepared) return prepared->step(grad_scale, found_inf, grads_in);
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("fusedlr::sgd_step_", "")
            .typed<void(at::TensorList, const c10::List<OptionalTensor>&, at::TensorList, at::TensorList,
                        at::TensorList, at::IntArrayRef, c10::ArrayRef<double>, c10::ArrayRef<double>,
                        const at::Tensor&, const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
                        std::optional<double>, bool, const OptionalTensor&)>();
    const StepSettings& s = settings;
    op.call(params, grads_of(params, grads_in), momentum_buffers, master_weights, steps, tensor_group, s.hyper,
            s.programs, s.group_steps, s.plateau_state, grad_scale, found_inf, s.max_grad_norm, s.skip_nonfinite,
            s.grad_norm);
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

  void write_next_lrs() const { settings.write_next_lrs(sgd_slot::kCount, sgd_slot::kLr); }
};

struct AdamPlan {
  std::vector<at::Tensor> params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_weights, steps;
  std::vector<int64_t> tensor_group;
  StepSettings settings;
  std::shared_ptr<PreparedCpuStep> prepared;

  void prepare() {
    prepared = prepare_on_cpu(PreparedCpuStep::Optimizer::kAdam, params,
                              {exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_weights}, steps, tensor_group, settings);
  }

  void run(const OptionalTensor& grad_scale, const OptionalTensor& found_inf, const GivenGrads& given) const {
    const std::optional<std::vector<at::Tensor>> grads = unpack_grads(given);
    const std::vector<at::Tensor>* grads_in = grads.has_value() ? &*grads : nullptr;
    if (prepared) return prepared->step(grad_scale, found_inf, grads_in);
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("fusedlr::adam_step_", "")
            .typed<void(at::TensorList, const c10::List<OptionalTensor>&, at::TensorList, at::TensorList,
                        at::TensorList, at::TensorList, at::TensorList, at::IntArrayRef, c10::ArrayRef<double>,
                        c10::ArrayRef<double>, const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                        const OptionalTensor&, std::optional<double>, bool, const OptionalTensor&)>();
    const StepSettings& s = settings;
    op.call(params, grads_of(params, grads_in), exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_weights, steps,
            tensor_group, s.hyper, s.programs, s.group_steps, s.plateau_state, grad_scale, found_inf,
            s.max_grad_norm, s.skip_nonfinite, s.grad_norm);
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

  void write_next_lrs() const { settings.write_next_lrs(adam_slot::kCount, adam_slot::kLr); }
};

// plan.configure(hyper, programs, group_steps, plateau_state, max_grad_norm, skip_nonfinite, grad_norm,
// group_lrs), plan.set_hyper(hyper) and plan.step(grad_scale, found_inf)
template <typename Plan>
void define_methods(pybind11::class_<Plan>& plan) {
  plan.def(
      "configure",
      [](Plan& self, std::vector<double> hyper, std::vector<double> programs, at::Tensor group_steps,
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
  plan.def("set_hyper", &Plan::set_hyper, pybind11::arg("hyper"),
           "New hyperparameter values (as many as before), without preparing the lists again.");
  plan.def("step", &Plan::step, pybind11::arg("grad_scale"), pybind11::arg("found_inf"),
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
  m.def("packed_state_buffer", &packed_state_buffer, pybind11::arg("numel"), pybind11::arg("dtype"),
        "A zero CPU tensor for packed optimizer state, on huge pages where the kernel gives them on request.");
  pybind11::class_<SgdPlan> sgd_plan(m, "SgdPlan");
  sgd_plan
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                          std::vector<at::Tensor>, std::vector<int64_t>>(),
           pybind11::arg("params"), pybind11::arg("momentum_buffers"), pybind11::arg("master_weights"),
           pybind11::arg("steps"), pybind11::arg("tensor_group"));
  define_methods(sgd_plan);
  pybind11::class_<AdamPlan> adam_plan(m, "AdamPlan");
  adam_plan
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                          std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                          std::vector<int64_t>>(),
           pybind11::arg("params"), pybind11::arg("exp_avgs"), pybind11::arg("exp_avg_sqs"),
           pybind11::arg("max_exp_avg_sqs"), pybind11::arg("master_weights"), pybind11::arg("steps"),
           pybind11::arg("tensor_group"));
  define_methods(adam_plan);
}
