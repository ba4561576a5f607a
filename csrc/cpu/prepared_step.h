#pragma once
// [note: prepared steps]
// A step op checks every tensor it is given, every call: for a model of thousands of small tensors,
// reading each optimizer state tensor's metadata (cold in the cache after a forward and backward
// pass) costs more than the update. A step plan on the CPU (python_plan.cpp) instead checks the
// optimizer's own tensors (state, step counters, schedule programs) once, when it is built, and
// keeps their data pointers and storages; each step then reads and checks only what may change
// between steps: each parameter (still of the dtype, shape and strides its state was made for) and
// its gradient. The update itself is the op's: the same jobs, the same run (fused_step_cpu.cpp).
// The state belongs to the optimizer: a state tensor given new storage in place (.data =, set_)
// after the plan was built is not seen; the optimizer rebuilds its plan whenever it replaces state.

#include <ATen/ATen.h>
#include <c10/util/SmallVector.h>

#include <array>
#include <optional>
#include <vector>

namespace fusedlr {

class PreparedCpuStep {
 public:
  enum class Optimizer { kSgd, kAdam };

  // states: the state lists in the op's order (SGD: momentum_buffers, master_weights; Adam:
  // exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_weights). Raises as the op would for any input
  // it refuses.
  PreparedCpuStep(Optimizer optimizer, std::vector<at::Tensor> params, std::vector<std::vector<at::Tensor>> states,
                  std::vector<at::Tensor> steps, std::vector<int64_t> tensor_group, std::vector<double> hyper,
                  std::vector<double> programs, at::Tensor group_steps, at::Tensor plateau_state,
                  std::optional<double> max_grad_norm, bool skip_nonfinite, std::optional<at::Tensor> grad_norm);

  // One step with the parameters' current gradients, as the op with the same arguments.
  void step(const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) const;

 private:
  struct Param {
    at::Tensor param;
    at::ScalarType dtype;
    c10::SmallVector<int64_t, 5> sizes, strides;
    int64_t group;
    std::array<void*, 4> state{};  // null: absent
    int64_t* step;
  };

  Optimizer optimizer_;
  std::vector<Param> params_;
  std::vector<c10::Storage> storages_;  // the state's memory stays alive while the plan uses it
  std::vector<double> hyper_, programs_;
  at::Tensor group_steps_, plateau_state_;
  std::optional<double> max_grad_norm_;
  bool skip_nonfinite_;
  std::optional<at::Tensor> grad_norm_;
};

}  // namespace fusedlr
