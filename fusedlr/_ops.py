"""Typed wrappers of the fusedlr ops and their fake kernels (for torch.compile and meta tensors).

The dispatcher picks the CPU or CUDA kernel from the tensors' device. Schemas: csrc/ops.cpp.
Per-group hyperparameters are laid out as csrc/update_math.h's sgd_slot / adam_slot say
(fusedlr/optim.py, `_group_hyper`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loads the library that registers the ops)

_ops = torch.ops.fusedlr

PLATEAU_SLOTS = 4  # plateau_slot::kCount: lr, best, num_bad, cooldown_counter


def sum_of_squares(tensors: Sequence[Tensor]) -> Tensor:
    """The sum of the squares of all elements of `tensors` (one device), a 0-dim float64 tensor:
    on the CPU in one parallel pass (csrc/cpu/sum_of_squares.cpp), its result independent of the
    thread count."""
    return _ops.sum_of_squares(list(tensors))


def initial_plateau_state(groups: int, device: torch.device) -> Tensor:
    """ReduceLROnPlateau state before any metric: lr and best unset (NaN), counters at 0."""
    state = torch.zeros(groups, PLATEAU_SLOTS, dtype=torch.float64, device=device)
    state[:, :2] = math.nan
    return state


def sgd_step_(params: Sequence[Tensor], grads: Sequence[Tensor | None], momentum_buffers: Sequence[Tensor],
              master_weights: Sequence[Tensor], steps: Sequence[Tensor], tensor_group: Sequence[int],
              hyper: Sequence[float], programs: Sequence[float], group_steps: Tensor, plateau_state: Tensor,
              grad_scale: Tensor | None = None, found_inf: Tensor | None = None, max_grad_norm: float | None = None,
              skip_nonfinite: bool = False, grad_norm: Tensor | None = None) -> None:
    _ops.sgd_step_(params, grads, momentum_buffers, master_weights, steps, tensor_group, hyper, programs,
                   group_steps, plateau_state, grad_scale, found_inf, max_grad_norm, skip_nonfinite, grad_norm)


def adam_step_(params: Sequence[Tensor], grads: Sequence[Tensor | None], exp_avgs: Sequence[Tensor],
               exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Sequence[Tensor], master_weights: Sequence[Tensor],
               steps: Sequence[Tensor], tensor_group: Sequence[int], hyper: Sequence[float],
               programs: Sequence[float], group_steps: Tensor, plateau_state: Tensor,
               grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
               max_grad_norm: float | None = None, skip_nonfinite: bool = False,
               grad_norm: Tensor | None = None) -> None:
    _ops.adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_weights, steps, tensor_group,
                    hyper, programs, group_steps, plateau_state, grad_scale, found_inf, max_grad_norm,
                    skip_nonfinite, grad_norm)


def plateau_observe_(metric: Tensor, base_lrs: Sequence[float], programs: Sequence[float],
                     plateau_state: Tensor) -> None:
    _ops.plateau_observe_(metric, base_lrs, programs, plateau_state)


def evaluate_schedules(programs: Sequence[float], base_lrs: Sequence[float], steps: Tensor,
                       plateau_state: Tensor) -> Tensor:
    """[groups, 3] float64: each group's (lr, momentum, cycled) at its step; where the schedule does not
    set the momentum, cycled is 0 and so is momentum."""
    return _ops.evaluate_schedules(programs, base_lrs, steps, plateau_state)


def _check_one_device(op: str, group_steps: Tensor, *tensors) -> None:
    """The fake (and meta) kernels' share of the real ones' checks: every tensor on one device. A
    step over meta tensors changes nothing, as any meta op; a meta tensor among real ones raises."""
    for t in tensors:
        if isinstance(t, (list, tuple)):
            _check_one_device(op, group_steps, *t)
        elif isinstance(t, Tensor) and t.device != group_steps.device:
            raise RuntimeError(f"{op}: a tensor is on {t.device} but the optimizer's step counters are on "
                               f"{group_steps.device}; all tensors of one optimizer must be on one device")


@torch.library.register_fake("fusedlr::sgd_step_")
def _sgd_step_fake(params, grads, momentum_buffers, master_weights, steps, tensor_group, hyper, programs,
                   group_steps, plateau_state, grad_scale=None, found_inf=None, max_grad_norm=None,
                   skip_nonfinite=False, grad_norm=None):
    _check_one_device("fusedlr.sgd_step_", group_steps, params, grads, momentum_buffers, master_weights, steps,
                      plateau_state, grad_scale, found_inf, grad_norm)


@torch.library.register_fake("fusedlr::adam_step_")
def _adam_step_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_weights, steps, tensor_group,
                    hyper, programs, group_steps, plateau_state, grad_scale=None, found_inf=None,
                    max_grad_norm=None, skip_nonfinite=False, grad_norm=None):
    _check_one_device("fusedlr.adam_step_", group_steps, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                      master_weights, steps, plateau_state, grad_scale, found_inf, grad_norm)


@torch.library.register_fake("fusedlr::plateau_observe_")
def _plateau_observe_fake(metric, base_lrs, programs, plateau_state):
    return None


@torch.library.register_fake("fusedlr::evaluate_schedules")
def _evaluate_schedules_fake(programs, base_lrs, steps, plateau_state):
    return plateau_state.new_empty((len(base_lrs), 3))
