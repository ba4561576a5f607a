// The module fusedlr._C and the eager fast path of a step.
//
// [note: step plans]
// Called through torch.ops, a step converts every tensor of every list from Python to an IValue and
// back on every call: for a model of many small tensors that costs more than the update. A plan
// holds the lists that stay the same from step to step (parameters, optimizer state, step
// counters) on the C++ side; a step reads the parameters' gradients itself and calls the same op
// through the dispatcher, unboxed. Under torch.compile the optimizer calls torch.ops instead
// (fusedlr/optim.py).

#include <torch/extension.h>

#include <optional>
#include <vector>

namespace fusedlr {
namespace {

// Each parameter's .grad, None where it has none.
c10::List<std::optional<at::Tensor>> grads_of(const std::vector<at::Tensor>& params) {
  c10::List<std::optional<at::Tensor>> grads;
  grads.reserve(params.size());
  for (const at::Tensor& p : params) {
    const at::Tensor& grad = p.grad();
    grads.push_back(grad.defined() ? std::optional<at::Tensor>(grad) : std::nullopt);
  }
  return grads;
}

using OptionalTensor = std::optional<at::Tensor>;

struct SgdPlan {
  std::vector<at::Tensor> params, momentum_buffers, master_weights, steps;
  std::vector<int64_t> tensor_group;

  void step(const std::vector<double>& hyper, const std::vector<double>& programs, const at::Tensor& group_steps,
            const at::Tensor& plateau_state, const OptionalTensor& grad_scale, const OptionalTensor& found_inf,
            std::optional<double> max_grad_norm, bool skip_nonfinite, const OptionalTensor& grad_norm) const {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("fusedlr::sgd_step_", "")
            .typed<void(at::TensorList, const c10::List<OptionalTensor>&, at::TensorList, at::TensorList,
                        at::TensorList, at::IntArrayRef, c10::ArrayRef<double>, c10::ArrayRef<double>,
                        const at::Tensor&, const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
                        std::optional<double>, bool, const OptionalTensor&)>();
    op.call(params, grads_of(params), momentum_buffers, master_weights, steps, tensor_group, hyper, programs,
            group_steps, plateau_state, grad_scale, found_inf, max_grad_norm, skip_nonfinite, grad_norm);
  }
};

struct AdamPlan {
  std::vector<at::Tensor> params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_weights, steps;
  std::vector<int64_t> tensor_group;

  void step(const std::vector<double>& hyper, const std::vector<double>& programs, const at::Tensor& group_steps,
            const at::Tensor& plateau_state, const OptionalTensor& grad_scale, const OptionalTensor& found_inf,
            std::optional<double> max_grad_norm, bool skip_nonfinite, const OptionalTensor& grad_norm) const {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("fusedlr::adam_step_", "")
            .typed<void(at::TensorList, const c10::List<OptionalTensor>&, at::TensorList, at::TensorList,
                        at::TensorList, at::TensorList, at::TensorList, at::IntArrayRef, c10::ArrayRef<double>,
                        c10::ArrayRef<double>, const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                        const OptionalTensor&, std::optional<double>, bool, const OptionalTensor&)>();
    op.call(params, grads_of(params), exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_weights, steps, tensor_group,
            hyper, programs, group_steps, plateau_state, grad_scale, found_inf, max_grad_norm, skip_nonfinite,
            grad_norm);
  }
};

}  // namespace
}  // namespace fusedlr

PYBIND11_MODULE(_C, m) {
  using namespace fusedlr;
#ifdef FUSEDLR_WITH_CUDA
  m.attr("cuda_built") = true;
#else
  m.attr("cuda_built") = false;
#endif
  pybind11::class_<SgdPlan>(m, "SgdPlan")
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                          std::vector<at::Tensor>, std::vector<int64_t>>(),
           pybind11::arg("params"), pybind11::arg("momentum_buffers"), pybind11::arg("master_weights"),
           pybind11::arg("steps"), pybind11::arg("tensor_group"))
      .def("step", &SgdPlan::step);
  pybind11::class_<AdamPlan>(m, "AdamPlan")
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                          std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                          std::vector<int64_t>>(),
           pybind11::arg("params"), pybind11::arg("exp_avgs"), pybind11::arg("exp_avg_sqs"),
           pybind11::arg("max_exp_avg_sqs"), pybind11::arg("master_weights"), pybind11::arg("steps"),
           pybind11::arg("tensor_group"))
      .def("step", &AdamPlan::step);
}
