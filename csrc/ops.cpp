// The fusedlr ops, their schemas in op_schemas.h. Kernels live in cpu/ and cuda/; fake (meta) kernels
// in fusedlr/_ops.py.
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

#include "op_schemas.h"
#include "optimizers.h"
#include "step_op.h"

TORCH_LIBRARY(fusedlr, m) { fusedlr::define_ops(m); }

// [note: no autograd]
// An optimizer step is not differentiable. Autograd's fallback for custom ops would walk every
// tensor of the call (grad accumulators, edges, a mutex per parameter) on each step: a fallthrough
// skips it, and the kernels bump the version counters of the parameters they update, as in-place
// ops do, so a graph that saved a parameter still notices that it changed. Optimizer state and
// step counters are the optimizer's own and never enter a graph.
TORCH_LIBRARY_IMPL(fusedlr, Autograd, m) {
  fusedlr::Optimizers::for_each([&](auto tag) {
    m.impl(fusedlr::step_op_name<typename decltype(tag)::type>().c_str(), torch::CppFunction::makeFallthrough());
  });
  m.impl("plateau_observe_", torch::CppFunction::makeFallthrough());
}
