"""The step's lists, kept from step to step: what they were built from (the step key), and the
common step's cheap test that none of it changed.

An optimizer's `_lists` (a StepLists, or None) is the cache: the step rebuilds it when the key of
what it was built from (step_key) differs, and the common step uses it as it is while the objects
the key reads are the very objects seen last (StepLists.unchanged).
"""

from __future__ import annotations

import numbers
import operator
from typing import Any

import torch
from torch import Tensor

from . import lr as _lr
from . import distributed as _dist
from .schedules import Schedule


class Same:
    """An object in a step key: equal to another Same of the very same object (not an equal one),
    and holding it, so that its id cannot pass to a new object while the key lives."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other) -> bool:
        return isinstance(other, Same) and other.obj is self.obj

    __hash__ = None


def changes_in_place(value: Any) -> bool:
    """Whether a group's value could change while it stays the same object (a tensor filled in
    place, a list): then the groups' settings are read by value at every step."""
    if isinstance(value, tuple):
        return any(changes_in_place(v) for v in value)
    return not isinstance(value, (numbers.Number, Schedule, torch.dtype, type(None)))


def step_key(opt) -> list:
    """What the cached lists and the plan's settings were built from: the optimizer's options,
    the state dict, and each group's parameter list, schedule and hyperparameter values.
    Replacing, clearing or resizing `opt.state` or a group's params list, or changing a
    setting that decides which state a parameter has (SGD's momentum on or off, amsgrad), rebuilds
    them; other hyperparameter values reach the plan without a rebuild (_prepare). Putting one
    parameter or state tensor in place of another (same count) is not seen (load_state_dict is
    the way to do that). A tensor setting is read as a float (a host sync on a GPU: set floats)."""
    key = [opt.max_grad_norm, opt.skip_nonfinite, opt.master_weights, Same(opt.state), len(opt.state)]
    for group in opt.param_groups:
        params = group["params"]
        key += (Same(params), len(params), group["schedule"], _lr.lr_scale(group), state_layout(opt, group))
    return key


def state_layout(opt, group: dict) -> tuple[bool, ...]:
    """The group's settings that decide which state its parameters have, and of which dtype."""
    return tuple(opt._has_state(key, group["params"][0], group) if group["params"] else False
                 for key in opt._STATE_KEYS if key != "master_weight") + (group.get("state_dtype"),)


def objects(opt) -> tuple[list, list[int]]:
    """The objects step_key() reads (the state dict, every value of every group: its params list
    and settings as set) and the sizes of the containers among them: the common step's
    cheaper test of step_key()."""
    state = opt.state
    objects = [state, opt.max_grad_norm, opt.skip_nonfinite, opt.master_weights]
    sizes = [len(state), getattr(state, "writes", 0)]  # entries written from outside: [note: state written past load_state_dict]
    for group in opt.param_groups:
        objects += group.values()
        sizes.append(len(group["params"]))
    return objects, sizes


class StepLists:
    """The op's per-parameter lists for every parameter that has optimizer state, the plan that
    holds them on the C++ side (csrc/python_plan.cpp, [note: step plans]), and what they were
    built from."""

    def __init__(self):
        self.params: list[Tensor] = []
        self.tensor_group: list[int] = []
        self.steps: list[Tensor] = []
        self.states: dict[str, list[Tensor]] = {}
        self.stateless: list[Tensor] = []  # parameters not yet given state (never had a gradient)
        # The parameters themselves where `params` holds their local shards ([note: DTensor
        # parameters]): the step then passes their gradients' shards; None when all are plain.
        self.owners: list[Tensor] | None = None
        # Whether the step runs over shards (DTensor parameters, or partition_group): then
        # `reduction` says how the global norm and inf flags are reduced across ranks ([note:
        # global norm]), made when a step first needs it.
        self.sharded = False
        self.reduction: _dist.NormReduction | None = None
        self.hyper: list[float] = []  # the ops' `hyper` and `programs` arguments
        self.programs: list[float] = []
        self.plan = None
        self.key: list | None = None  # step_key() of the optimizer they were built for
        self.seen: tuple[list, list[int]] | None = None  # objects() when key was last found current
        self.seen_hyper: tuple[float, ...] | None = None  # opt._hyper() then, where a setting can change in place

    def unchanged(self, opt) -> bool:
        """Whether opt's step_key() is as it was when last checked, judged from objects(): the same
        objects (by identity: a setting may be a tensor, which has no plain equality) of the same
        sizes, and, where a setting can change in place (a tensor, a list), the same values. A
        different object of an equal value sends the step to _prepare, which compares values."""
        objects_now, sizes = objects(opt)
        seen_objects, seen_sizes = self.seen
        return (sizes == seen_sizes and len(objects_now) == len(seen_objects)
                and all(map(operator.is_, objects_now, seen_objects))
                and (self.seen_hyper is None or opt._hyper() == self.seen_hyper))

    def remember(self, opt) -> None:
        """Records what unchanged() compares: opt's objects now, and its hyperparameter values
        where a setting can change in place."""
        self.seen = objects(opt)
        # the params list and its names aside, a group's values are settings (or the user's own)
        in_place = any(changes_in_place(value) for g, group in enumerate(opt.param_groups)
                       for key, value in group.items()
                       if key not in ("params", "param_names") and not (key == "lr" and _lr.is_own_lr(opt, g, value)))
        self.seen_hyper = opt._hyper() if in_place else None
