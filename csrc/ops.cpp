// The op schemas of fusedlr. Kernels live in cpu/ and cuda/; fake (meta) kernels in fusedlr/_ops.py.
//
// [note: amp]
// grad_scale and found_inf are what torch.amp.GradScaler hands a fused optimizer: the gradients are
// divided by grad_scale inside the update, and when found_inf is nonzero the step is skipped on the
// device: no parameter, state or step counter changes, the schedule does not advance.
//
// [note: norm and master weights]
// With a grad_norm tensor (one float64) a step writes there the global L2 norm of the unscaled
// gradients it applies; max_grad_norm then clips them as torch.nn.utils.clip_grad_norm_ does, and
// skip_nonfinite skips the step, as found_inf does, when the norm is not finite (update_math.h,
// [note: gradient adjustments]). Both need grad_norm. master_weights holds, for a bfloat16 or float16
// parameter, an empty tensor or its float32 master copy: the update then reads the master copy
// instead of the parameter, and writes both.
//
// The step ops skip a parameter whose gradient is None, as torch's optimizers do: its state and
// step count stay as they were. They mutate every tensor list marked (x!) in place and return nothing. Per-group
// hyperparameters and schedule programs are float lists: constants of the training run, so they
// neither force a host sync nor change under CUDA graph capture or torch.compile. What changes from
// step to step (step counters, plateau state) lives in tensors on the parameters' device.

#include <torch/library.h>

TORCH_LIBRARY(fusedlr, m) {
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

// [note: no autograd]
// An optimizer step is not differentiable. Autograd's fallback for custom ops would walk every
// tensor of the call (grad accumulators, edges, a mutex per parameter) on each step: a fallthrough
// skips it, and the kernels bump the version counters of the parameters they update, as in-place
// ops do, so a graph that saved a parameter still notices that it changed. Optimizer state and
// step counters are the optimizer's own and never enter a graph.
TORCH_LIBRARY_IMPL(fusedlr, Autograd, m) {
  m.impl("sgd_step_", torch::CppFunction::makeFallthrough());
  m.impl("adam_step_", torch::CppFunction::makeFallthrough());
  m.impl("plateau_observe_", torch::CppFunction::makeFallthrough());
}
