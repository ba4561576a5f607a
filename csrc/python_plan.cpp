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

#include <torch/extension.h>

#include "cpu/cpu_isa.h"
#include "cpu/prepared_step.h"
#include "cpu/state_memory.h"

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

  void set(std::vector<double> hyper_, std::vector<double> programs_, at::Tensor group_steps_,
           at::Tensor plateau_state_, std::optional<double> max_grad_norm_, bool skip_nonfinite_,
           OptionalTensor grad_norm_) {
    hyper = std::move(hyper_);
    programs = std::move(programs_);
    group_steps = std::move(group_steps_);
    plateau_state = std::move(plateau_state_);
    max_grad_norm = max_grad_norm_;
    skip_nonfinite = skip_nonfinite_;
    grad_norm = std::move(grad_norm_);
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
  void step(const OptionalTensor& grad_scale, const OptionalTensor& found_inf, const GivenGrads& given) const {
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
    op.call(params, grads_of(params, grads_in), momentum_buffers, master_weights, steps, tensor_group, s.hyper, s.programs,
            s.group_steps, s.plateau_state, grad_scale, found_inf, s.max_grad_norm, s.skip_nonfinite, s.grad_norm);
  }
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

  void step(const OptionalTensor& grad_scale, const OptionalTensor& found_inf, const GivenGrads& given) const {
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
    op.call(params, grads_of(params, grads_in), exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_weights, steps, tensor_group,
            s.hyper, s.programs, s.group_steps, s.plateau_state, grad_scale, found_inf, s.max_grad_norm,
            s.skip_nonfinite, s.grad_norm);
  }
};

// plan.configure(hyper, programs, group_steps, plateau_state, max_grad_norm, skip_nonfinite, grad_norm)
template <typename Plan>
void define_configure(pybind11::class_<Plan>& plan) {
  plan.def(
      "configure",
      [](Plan& self, std::vector<double> hyper, std::vector<double> programs, at::Tensor group_steps,
         at::Tensor plateau_state, std::optional<double> max_grad_norm, bool skip_nonfinite,
         OptionalTensor grad_norm) {
        self.settings.set(std::move(hyper), std::move(programs), std::move(group_steps), std::move(plateau_state),
                          max_grad_norm, skip_nonfinite, std::move(grad_norm));
        self.prepare();
      },
      pybind11::arg("hyper"), pybind11::arg("programs"), pybind11::arg("group_steps"), pybind11::arg("plateau_state"),
      pybind11::arg("max_grad_norm"), pybind11::arg("skip_nonfinite"), pybind11::arg("grad_norm"));
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
  m.def("packed_state_buffer", &packed_state_buffer, pybind11::arg("numel"), pybind11::arg("dtype"),
        "A zero CPU tensor for packed optimizer state, on huge pages where the kernel gives them on request.");
  pybind11::class_<SgdPlan> sgd_plan(m, "SgdPlan");
  sgd_plan
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                          std::vector<at::Tensor>, std::vector<int64_t>>(),
           pybind11::arg("params"), pybind11::arg("momentum_buffers"), pybind11::arg("master_weights"),
           pybind11::arg("steps"), pybind11::arg("tensor_group"))
      .def("step", &SgdPlan::step, pybind11::arg("grad_scale"), pybind11::arg("found_inf"),
           pybind11::arg("grads") = pybind11::none());
  define_configure(sgd_plan);
  pybind11::class_<AdamPlan> adam_plan(m, "AdamPlan");
  adam_plan
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                          std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                          std::vector<int64_t>>(),
           pybind11::arg("params"), pybind11::arg("exp_avgs"), pybind11::arg("exp_avg_sqs"),
           pybind11::arg("max_exp_avg_sqs"), pybind11::arg("master_weights"), pybind11::arg("steps"),
           pybind11::arg("tensor_group"))
      .def("step", &AdamPlan::step, pybind11::arg("grad_scale"), pybind11::arg("found_inf"),
           pybind11::arg("grads") = pybind11::none());
  define_configure(adam_plan);
}
