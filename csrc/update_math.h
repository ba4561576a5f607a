#pragma once
// Update math that every optimizer shares: what a step does to its gradients, and the helpers of
// the element updates. Each optimizer's own update is in csrc/optimizers/ (optimizer_traits.h).
//
// [note: rounding order]
// The element updates follow the order of operations of torch's single-tensor (for-loop) SGD and
// Adam, and the per-tensor scalars (bias corrections, step size) are computed in double from the
// double lr, as torch computes them from Python floats. So a float64 run agrees with torch.optim to
// a few ulps per step, and a float32 run to float32 rounding.

#include <cmath>
#include <cstdint>

#include "macros.h"
#include "schedule_math.h"
#include "storage_math.h"

namespace fusedlr {

// Square root in the math type: the float overload (unqualified sqrt on a float is the double one).
FUSEDLR_HD float sqrt_of(float x) { return sqrtf(x); }
FUSEDLR_HD double sqrt_of(double x) { return sqrt(x); }

// torch's lerp: exact at both ends, whichever side of 1/2 the weight is. `small_weight` is
// |weight| < 1/2, decided once per tensor. Both forms are computed and one is kept by a mask
// (storage_math.h, select_by_mask): a branch, even a loop-invariant one, stops the element loops
// from vectorizing once they are too large for the compiler to split them in two.
template <typename T>
FUSEDLR_HD T lerp(T start, T end, T weight, bool small_weight) {
  const T difference = end - start;
  return select_by_mask(small_weight ? ~0u : 0u, start + weight * difference, end - difference * (T(1) - weight));
}

// ---------------------------------------------------------------------------------------------
// What a step does to every gradient before the update

// [note: gradient adjustments]
// As torch's GradScaler + clip_grad_norm_ + step: the gradient is divided by the AMP loss scale
// (ops.cpp, [note: amp]), then multiplied by the clipping factor, then negated when maximizing.
// The global L2 norm is taken over the unscaled gradients of every parameter the step updates, its
// sum of squares accumulated in double (torch's clip_grad_norm_ accumulates in the gradients'
// dtype). A step whose norm is not finite is skipped when the optimizer asks for that.
struct GradAdjust {
  double scale = 1;  // the AMP loss scale the gradients carry
  double clip = 1;   // the clipping factor
};

// The global L2 norm of the unscaled gradients, from the sum of squares of the scaled ones.
FUSEDLR_HD double grad_norm_of(double sum_of_squares, double grad_scale) { return sqrt(sum_of_squares) / grad_scale; }

// clip_grad_norm_'s factor max_norm / (norm + 1e-6), at most 1. A NaN norm gives NaN, as in torch;
// an infinite max_norm never clips a finite norm.
FUSEDLR_HD double clip_factor(double norm, double max_norm) {
  const double factor = max_norm / (norm + 1e-6);
  return factor > 1.0 ? 1.0 : factor;
}

// The factor every gradient of a group is multiplied by before clipping: -1 when maximizing, over
// the AMP loss scale.
FUSEDLR_HD double grad_sign_of(bool maximize, const GradAdjust& adjust) { return (maximize ? -1.0 : 1.0) / adjust.scale; }

// Whether a step is skipped: GradScaler found an inf or NaN, or the optimizer skips non-finite
// norms and this one is not finite (x - x is 0 for finite x only).
FUSEDLR_HD bool step_skipped(bool found_inf, bool skip_nonfinite, double norm) {
  return found_inf || (skip_nonfinite && !(norm - norm == 0));
}

}  // namespace fusedlr
