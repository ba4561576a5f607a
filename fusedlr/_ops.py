"""Typed wrappers of the fusedlr ops and their fake kernels (for torch.compile and meta tensors).

The dispatcher picks the CPU or CUDA kernel from the tensors' device. Schemas: csrc/ops.cpp. Each
optimizer of the C++ registry (csrc/optimizer_traits.h, [note: optimizer traits]) has a step op,
described in OPTIMIZERS: the names of its hyperparameter slots in the order of the `hyper`
argument, and its state lists in the op's order.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loads the library that registers the ops)

_ops = torch.ops.fusedlr

PLATEAU_SLOTS = len(_C.schedule_state_slots()["ReduceLROnPlateau"])  # the narrowest row of schedule state


def sum_of_squares(tensors: Sequence[Tensor]) -> Tensor:
    """The sum of the squares of all elements of `tensors` (one device), a 0-dim float64 tensor:
    on the CPU in one parallel pass (csrc/cpu/sum_of_squares.cpp), its result independent of the
    thread count."""
    return _ops.sum_of_squares(list(tensors))


def initial_plateau_state(groups: int, device: torch.device, width: int = PLATEAU_SLOTS) -> Tensor:
    """Metric-driven schedule state (ReduceLROnPlateau, GreedyLR) before any metric, a row of
    `width` per group: lr and best unset (NaN), counters, window and the rest at 0."""
    state = torch.zeros(groups, width, dtype=torch.float64, device=device)
    state[:, :2] = math.nan
    return state


def schedule_state_width(programs: Sequence[float], groups: int) -> int:
    """The row width of schedule state that the groups' schedules in `programs` need."""
    return max(_C.schedule_state_widths(list(programs), groups), default=PLATEAU_SLOTS)


def state_row(programs: Sequence[float], group: int, slots: dict, width: int) -> list[float]:
    """Group `group`'s row of schedule state from its slots by name (csrc/schedule_math.h's layout
    of its root schedule's kind; "values" the smoothing window's), a fresh row's where not given."""
    kind = _C.schedule_kind_name(list(programs), group)
    names = _C.schedule_state_slots().get(kind)
    if names is None:
        raise ValueError(f"group {group}'s schedule ({kind}) keeps no metric-driven state")
    row = initial_plateau_state(1, torch.device("cpu"), width)[0].tolist()
    for key, value in slots.items():
        if key == "values" and "window_values" in names:
            at = names.index("window_values")
            if at + len(value) > width:
                raise ValueError(f"group {group}: {len(value)} window values do not fit a row of {width}")
            row[at:at + len(value)] = [float(v) for v in value]
        elif key in names:
            row[names.index(key)] = float(value)
        else:
            raise ValueError(f"group {group}: {kind} state has no slot {key!r} (it has {', '.join(names)})")
    return row


def check_schedule_state(programs: Sequence[float], groups: int, state: Tensor) -> None:
    """Raises ValueError naming the group and slot where a row of `state` is not one its schedule
    could reach (a negative counter, a window index out of range): a loaded checkpoint's, say."""
    problem = _C.schedule_state_problem(list(programs), groups, state.detach().to("cpu", torch.float64))
    if problem:
        raise ValueError(problem)


@dataclasses.dataclass(frozen=True)
class OptimizerDescriptor:
    """What fusedlr._C says of an optimizer of the registry."""
    name: str
    op: str                      # its step op in torch.ops.fusedlr
    plan: type                   # its step plan class (csrc/python_plan.cpp, [note: step plans])
    slots: tuple[str, ...]       # its hyperparameters per group, in the order of `hyper`
    states: tuple[str, ...]      # its state keys, in the order of the op's state lists
    required: tuple[str, ...]    # the state every parameter with state has
    momentum_slot: str           # the slot a schedule that cycles the momentum replaces


OPTIMIZERS: dict[str, OptimizerDescriptor] = {
    name: OptimizerDescriptor(name, d["op"], d["plan"], tuple(d["slots"]), tuple(key for key, _ in d["states"]),
                              tuple(key for key, optional in d["states"] if not optional), d["momentum_slot"])
    for name, d in _C.optimizers.items()}


def step_(optimizer: str, params: Sequence[Tensor], grads: Sequence[Tensor | None],
          states: Sequence[Sequence[Tensor]], steps: Sequence[Tensor], tensor_group: Sequence[int],
          hyper: Sequence[float], programs: Sequence[float], group_steps: Tensor, plateau_state: Tensor,
          grad_scale: Tensor | None = None, found_inf: Tensor | None = None, max_grad_norm: float | None = None,
          skip_nonfinite: bool = False, grad_norm: Tensor | None = None) -> None:
    """One step of `optimizer` (a key of OPTIMIZERS); `states` holds its state lists in order."""
    op = getattr(_ops, OPTIMIZERS[optimizer].op)
    op(params, grads, *states, steps, tensor_group, hyper, programs, group_steps, plateau_state, grad_scale,
       found_inf, max_grad_norm, skip_nonfinite, grad_norm)


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


def _register_step_fake(op_name: str) -> None:
    names = [argument.name for argument in getattr(_ops, op_name).default._schema.arguments]

    def fake(*args, **kwargs):
        bound = dict(zip(names, args), **kwargs)
        _check_one_device(f"fusedlr.{op_name}", bound["group_steps"],
                          *(value for name, value in bound.items() if name != "group_steps"))

    torch.library.register_fake(f"fusedlr::{op_name}")(fake)


for _descriptor in OPTIMIZERS.values():
    _register_step_fake(_descriptor.op)


@torch.library.register_fake("fusedlr::plateau_observe_")
def _plateau_observe_fake(metric, base_lrs, programs, plateau_state):
    return None


@torch.library.register_fake("fusedlr::evaluate_schedules")
def _evaluate_schedules_fake(programs, base_lrs, steps, plateau_state):
    return plateau_state.new_empty((len(base_lrs), 3))
