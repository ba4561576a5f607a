#pragma once
// [note: prepared steps]
// A step op takes every tensor as an argument, every call: the dispatcher reads each one's keys,
// the lists are boxed, and each tensor is checked in full. For a model of thousands of small
// tensors, whose metadata a forward and backward pass has pushed out of the caches, that costs
// more than the update. A step plan on the CPU (python_plan.cpp) holds the lists instead, and
// checks a parameter's tensors in full, as the op does, the first time the parameter has a
// gradient. Later steps compare the parameter's dtype, shape and strides with what the check saw,
// and whether each state storage (held by the plan, so never freed under it) still holds the same
// allocation (share_memory_ and resize_ move it); on any difference the parameter is checked in full
// again. The state tensors' own metadata is not read again: a state tensor given another storage
// (.data =, set_) or reshaped in place (t_, as_strided_, a smaller resize_) is not seen, as one
// replaced in opt.state is not (fusedlr/optim.py rebuilds the plan when it replaces state). The update
// is the op's (fused_step_cpu.cpp).

#include <ATen/ATen.h>
#include <c10/util/SmallVector.h>

#include <array>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "../step_inputs.h"

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
  ~PreparedCpuStep();

  // One step with the parameters' current gradients, as the op with the same arguments; with
  // `grads` (one per parameter, undefined for none), with those instead of the parameters' .grad.
  void step(const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
            const std::vector<at::Tensor>* grads = nullptr);

  // New values of the hyperparameters, as many as before: the settings changed, the lists did not.
  void set_hyper(std::vector<double> hyper);

 private:
  // A parameter, its step counter, and what its last full check saw.
  struct Param {
    at::Tensor param, step_tensor;
    int64_t group = 0;
    bool checked = false;
    at::ScalarType dtype = at::kFloat;
    c10::SmallVector<int64_t, 5> sizes, strides;
    std::array<void*, 4> state{};  // null: absent
    int64_t* step = nullptr;
    // the storages of the state tensors and of the step counter, and their allocations
    std::array<c10::intrusive_ptr<c10::StorageImpl>, 5> storage;
    std::array<const void*, 5> storage_data{};
    std::array<size_t, 5> storage_nbytes{};
  };

  static constexpr size_t kParallelGatherFrom = 512;  // parameters

  struct Scratch;  // the memory a step reuses (fused_step_cpu.cpp, [note: no allocation])

  template <typename JobT, typename Make>
  std::vector<JobT>& gather(const Make& make, const std::vector<at::Tensor>* grads, std::vector<at::Tensor>& copies);
  bool still_checked(size_t i) const;  // parameter i's tensors are as its last check saw them
  void check(size_t i);                // the op's checks of parameter i's tensors; raises

  Optimizer optimizer_;
  std::vector<Param> params_;
  std::vector<std::vector<at::Tensor>> states_;  // [state list][parameter]
  std::vector<StateList> state_lists_;           // views of states_ for the checks
  int64_t groups_ = 0;
  std::mutex retired_mutex_;
  std::vector<c10::intrusive_ptr<c10::StorageImpl>> retired_;  // released by step(), after a gather
  std::vector<double> hyper_, programs_;
  at::Tensor group_steps_, plateau_state_;
  std::optional<double> max_grad_norm_;
  bool skip_nonfinite_;
  std::optional<at::Tensor> grad_norm_;
  std::unique_ptr<Scratch> scratch_;
};

}  // namespace fusedlr
