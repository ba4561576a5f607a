#pragma once
// The op schemas of fusedlr (ops.cpp, the notes there): define_ops(m) declares them in a library.
// The emulated CUDA kernels of the test suite (csrc/emulation/emulated_ops.cpp) declare the same
// ops in a library of their own.

#include <torch/library.h>

namespace fusedlr {

inline void define_ops(torch::Library& m) {
  m.def(
      "sgd_step_(Tensor(a!)[] params, Tensor?[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] master_weights, "
      "Tensor(d!)[] steps, int[] tensor_group, float[] hyper, float[] programs, Tensor(e!) group_steps, "
      "Tensor plateau_state, Tensor? grad_scale=None, Tensor? found_inf=None, float? max_grad_norm=None, "
      "bool skip_nonfinite=False, Tensor(f!)? grad_norm=None) -> ()");
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor?[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] master_weights, Tensor(f!)[] steps, int[] tensor_group, "
      "float[] hyper, float[] programs, Tensor(g!) group_steps, Tensor plateau_state, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, float? max_grad_norm=None, bool skip_nonfinite=False, "
      "Tensor(h!)? grad_norm=None) -> ()");
  m.def("plateau_observe_(Tensor metric, float[] base_lrs, float[] programs, Tensor(a!) plateau_state) -> ()");
  // [groups, 3] float64: lr, momentum, 1 where the schedule sets the momentum (else momentum is 0).
  m.def("evaluate_schedules(float[] programs, float[] base_lrs, Tensor steps, Tensor plateau_state) -> Tensor");
}

}  // namespace fusedlr
