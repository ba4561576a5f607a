#pragma once
// The op schemas of fusedlr (ops.cpp, the notes there): define_ops(m) declares them in a library,
// a step op for each optimizer of the registry (optimizers.h).
// The emulated CUDA kernels of the test suite (csrc/emulation/emulated_ops.cpp) declare the same
// ops in a library of their own.

#include <torch/library.h>

#include "optimizers.h"
#include "step_op.h"

namespace fusedlr {

inline void define_ops(torch::Library& m) {
  Optimizers::for_each([&](auto tag) { m.def(step_schema<typename decltype(tag)::type>().c_str()); });
  m.def("plateau_observe_(Tensor metric, float[] base_lrs, float[] programs, Tensor(a!) plateau_state) -> ()");
  // [groups, 3] float64: lr, momentum, 1 where the schedule sets the momentum (else momentum is 0).
  m.def("evaluate_schedules(float[] programs, float[] base_lrs, Tensor steps, Tensor plateau_state) -> Tensor");
}

}  // namespace fusedlr
