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

#include "../optimizers.h"
#include "../step_inputs.h"

namespace fusedlr {

// What a prepared step is built from: the lists and settings of a plan (python_plan.cpp).
struct PreparedStepInputs {
  std::vector<at::Tensor> params;
  std::vector<std::vector<at::Tensor>> states;  // [state list][parameter], in the op's order
  std::vector<at::Tensor> steps;
  std::vector<int64_t> tensor_group;
  std::vector<double> hyper, programs;
  at::Tensor group_steps, plateau_state;
  std::optional<double> max_grad_norm;
  bool skip_nonfinite = false;
  std::optional<at::Tensor> grad_norm;
};

// The prepared step of the optimizer named `optimizer` (its kName). Raises as the op would for any
// input it refuses.
class PreparedCpuStep;
std::shared_ptr<PreparedCpuStep> prepare_cpu_step(const char* optimizer, PreparedStepInputs inputs);

// The part of a prepared step that is the same for every optimizer: the lists, their checks and the
// gather of a step's jobs. The update is the op's (fused_step_cpu.cpp, PreparedStepOf).
class PreparedCpuStep {
 public:
  virtual ~PreparedCpuStep();

  // One step with the parameters' current gradients, as the op with the same arguments; with
  // `grads` (one per parameter, undefined for none), with those instead of the parameters' .grad.
  virtual void step(const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                    const std::vector<at::Tensor>* grads = nullptr) = 0;

  // New values of the hyperparameters, as many as before: the settings changed, the lists did not.
  void set_hyper(std::vector<double> hyper);

  // The most state lists of any optimizer, the master weights included.
  static constexpr size_t kMaxStateLists = Optimizers::kMaxStates + 1;

 protected:
  // state_views: the checks' views of the state lists (step_op.h, state_lists).
  PreparedCpuStep(const char* op, int64_t hyper_slots, size_t state_lists, PreparedStepInputs inputs,
                  std::vector<StateList> (*state_views)(const std::vector<std::vector<at::Tensor>>&));

  // An allocation a parameter's tensor had when it was last checked, kept alive by the plan.
  struct KeptStorage {
    c10::intrusive_ptr<c10::StorageImpl> storage;  // null: none kept
    const void* data = nullptr;
    size_t nbytes = 0;

    void keep(const at::Tensor& t);
    bool moved() const { return storage && (storage->data() != data || storage->nbytes() != nbytes); }
  };

  // A parameter, its step counter, and what its last full check saw.
  struct Param {
    at::Tensor param, step_tensor;
    int64_t group = 0;
    bool checked = false;
    at::ScalarType dtype = at::kFloat;
    c10::SmallVector<int64_t, 5> sizes, strides;
    std::array<void*, kMaxStateLists> state{};  // null: absent
    std::array<KeptStorage, kMaxStateLists> state_storage;
    int64_t* step = nullptr;
    KeptStorage step_storage;
    TensorStorage storage;  // how its tensors are stored, as the check found them
  };

  static constexpr size_t kParallelGatherFrom = 512;  // parameters

  // The jobs of a step, make(i, common part) for each parameter i with a gradient (fused_step_cpu.cpp).
  template <typename JobT, typename Make>
  void gather(std::vector<JobT>& jobs, const Make& make, const std::vector<at::Tensor>* grads,
              std::vector<at::Tensor>& copies);
  bool still_checked(size_t i) const;  // parameter i's tensors are as its last check saw them
  void check(size_t i);                // the op's checks of parameter i's tensors; raises

  const char* op_;
  int64_t hyper_slots_;
  std::vector<Param> params_;
  std::vector<std::vector<at::Tensor>> states_;  // [state list][parameter]
  std::vector<StateList> state_lists_;           // views of states_ for the checks
  int64_t groups_ = 0;
  std::mutex retired_mutex_;
  std::vector<c10::intrusive_ptr<c10::StorageImpl>> retired_;  // released by step(), after a gather
  std::vector<char> active_;  // gather: which parameters have a job ([note: no allocation])
  std::vector<double> hyper_, programs_;
  at::Tensor group_steps_, plateau_state_;
  std::optional<double> max_grad_norm_;
  bool skip_nonfinite_;
  std::optional<at::Tensor> grad_norm_;
};

}  // namespace fusedlr
