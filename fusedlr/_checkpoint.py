"""An optimizer's state_dict in torch's layout and back: the schedules as plain data and each
group's schedule state in the group on the way out; on the way in, a fusedlr or torch.optim
state_dict checked in full before the optimizer changes anything.

These functions read the optimizer and call its hooks (`_check_group`, `_missing_step`); the
optimizer applies what they return.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _C, _ops, lr as _lr
from . import _state
from .schedules import Schedule, compile_programs, from_spec


def to_state_dict(opt, state_dict: dict) -> dict:
    """torch's state_dict of `opt` (Optimizer.state_dict) with its schedules as plain data, each
    scheduled group's lr and twin scheduler keys as a torch scheduler leaves them, and each group's
    schedule state ("schedule_step", "plateau_state")."""
    decode_state(opt, state_dict)
    values = opt._schedule_values().tolist() if opt.param_groups else []
    group_steps = opt._group_steps.tolist()
    plateau_state = opt._plateau_state.tolist()
    widths = _C.schedule_state_widths(opt._programs_now(), len(opt.param_groups))
    for g, (group, saved, (next_lr, next_momentum, cycled)) in enumerate(
            zip(opt.param_groups, state_dict["param_groups"], values)):
        schedule = saved.get("schedule")
        saved["schedule"] = schedule.spec() if isinstance(schedule, Schedule) else schedule
        # a process group (a group's copy of the optimizer's, as ZeRO's wrapper passes it) is no data:
        # it cannot be pickled, and the loading optimizer has its own
        saved.pop("partition_group", None)
        for key, value in opt._TORCH_GROUP_KEYS.items():
            saved.setdefault(key, value)
        if schedule is not None:
            saved["initial_lr"] = float(group["initial_lr"])
            saved["lr"] = next_lr
            saved.update(_lr.twin_keys(schedule, saved, next_momentum if cycled else None))
        # in the group, where torch.distributed.checkpoint keeps what a group holds
        saved["schedule_step"] = group_steps[g]
        saved["plateau_state"] = plateau_state[g][:widths[g]]  # the row its schedule uses
    return state_dict


def decode_state(opt, state_dict: dict) -> None:
    """8-bit state ([note: 8-bit state]) in `state_dict` replaced by its float32 values, shaped like
    its parameter (DTensors for DTensor parameters), which torch's optimizers and DCP take and which
    load back bit for bit. The saved entries are new dicts: torch's state_dict shares the
    optimizer's own."""
    saved_ids = [index for saved in state_dict["param_groups"] for index in saved["params"]]
    param_of = dict(zip(saved_ids, [p for group in opt.param_groups for p in group["params"]]))
    for index, entry in state_dict["state"].items():
        if index in param_of and any(isinstance(v, Tensor) and v.dtype == torch.uint8 for v in entry.values()):
            state_dict["state"][index] = {key: _state.state_value(v, param_of[index]) if isinstance(v, Tensor) else v
                                          for key, v in entry.items()}


class Loaded(NamedTuple):
    """A state_dict checked against the optimizer, ready to take its place."""
    state: dict[Tensor, dict]  # each parameter's saved state: "step" an int, its tensors as saved
    param_groups: list[dict]
    group_steps: Tensor  # on the optimizer's device
    plateau_state: Tensor


STEP_LIMIT = 2 ** 63  # step counts are int64 (set_schedule_steps checks against it too)


def from_state_dict(opt, state_dict: dict) -> Loaded:
    """A fusedlr or torch.optim state_dict of `opt`'s parameter layout, checked (ValueError for
    another layout); `opt` is left as it was."""
    if (not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict)
            or not isinstance(state_dict.get("param_groups"), (list, tuple))
            or not all(isinstance(saved, dict) and "params" in saved for saved in state_dict["param_groups"])):
        raise TypeError(f"load_state_dict takes an optimizer's state_dict: a dict of 'state' (a dict) and "
                        f"'param_groups' (a list of dicts with 'params'), got {type(state_dict).__name__}")
    groups = opt.param_groups
    saved_groups = state_dict["param_groups"]
    if len(groups) != len(saved_groups):
        raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, the optimizer {len(groups)}")
    for g, (group, saved) in enumerate(zip(groups, saved_groups)):
        if len(group["params"]) != len(saved["params"]):
            raise ValueError(f"loaded state dict's group {g} has {len(saved['params'])} parameters, "
                             f"the optimizer's {len(group['params'])}")
    id_map = {saved_id: p for group, saved in zip(groups, saved_groups)
              for saved_id, p in zip(saved["params"], group["params"])}

    loaded: dict[Tensor, dict] = {}
    for saved_id, saved_state in state_dict["state"].items():
        param = id_map.get(saved_id)
        if param is None:
            raise ValueError(f"loaded state dict has state for parameter {saved_id!r}, which no group holds")
        loaded[param] = param_state(opt, param, saved_state, saved_id)

    new_groups = []
    for g, (group, saved) in enumerate(zip(groups, saved_groups)):
        new_group = {k: v for k, v in saved.items() if k not in ("params", "schedule_step", "plateau_state")}
        new_group["params"] = group["params"]
        if "param_names" in group and "param_names" not in saved:
            new_group["param_names"] = group["param_names"]
        schedule = saved.get("schedule", group["schedule"])
        if schedule is not None and not isinstance(schedule, (dict, Schedule)):
            raise ValueError(f"loaded group {g} has a schedule of type {type(schedule).__name__}: a fusedlr "
                             "schedule, its saved spec (a dict) or None is required")
        new_group["schedule"] = from_spec(schedule) if isinstance(schedule, dict) else schedule
        for key, value in group.items():
            # the optimizer's own lr view, and its base lr: the checkpoint's lr or initial_lr instead
            if not (key == "lr" and isinstance(value, Tensor)) and key != "initial_lr":
                new_group.setdefault(key, value)
        if new_group["schedule"] is not None:  # the base lr: a torch scheduler's initial_lr, or fusedlr's own
            new_group["lr"] = new_group.setdefault("initial_lr", new_group["lr"])
        opt._check_group(new_group)
        _state.check_storage_settings(new_group)
        if new_group["schedule"] is not None:
            new_group["initial_lr"] = new_group["lr"]
        new_groups.append(new_group)

    # each new group's row of schedule state is as wide as its schedule needs (GreedyLR's window)
    programs = compile_programs([group["schedule"] for group in new_groups])
    widths = _C.schedule_state_widths(programs, len(new_groups))
    width = max(widths, default=_ops.PLATEAU_SLOTS)
    schedule_state = state_dict.get("schedule_state")  # where earlier versions kept it
    if saved_groups and all("schedule_step" in saved for saved in saved_groups):
        schedule_state = saved_schedule_state(saved_groups)
    if schedule_state is not None:
        group_steps, rows = schedule_state["group_steps"], schedule_state["plateau_state"]
        if isinstance(rows, Tensor):  # earlier versions: one [groups, 4] tensor
            rows = list(rows.double()) if rows.dim() == 2 else None
        if group_steps.shape != opt._group_steps.shape or rows is None or len(rows) != len(groups):
            raise ValueError("loaded schedule_state does not match the optimizer's number of groups")
        if group_steps.is_floating_point() or group_steps.is_complex() or bool((group_steps < 0).any()):
            raise ValueError(f"loaded schedule_state has invalid group_steps {group_steps.tolist()}")
        plateau_state = _ops.initial_plateau_state(len(groups), torch.device("cpu"), width)
        for g, row in enumerate(rows):
            if len(row) != widths[g]:
                raise ValueError(f"loaded group {g} has a plateau_state of {len(row)} numbers; its schedule "
                                 f"({type(new_groups[g]['schedule']).__name__}) keeps {widths[g]}")
            plateau_state[g, :len(row)] = torch.as_tensor(row, dtype=torch.float64)
        _ops.check_schedule_state(programs, len(groups), plateau_state)
        group_steps = group_steps.to(device=opt._device, dtype=torch.int64)
        plateau_state = plateau_state.to(device=opt._device)
    else:
        group_steps = torch.tensor(
            [max((loaded[p]["step"] for p in group["params"] if p in loaded), default=0)
             for group in groups], dtype=torch.int64, device=opt._device)
        plateau_state = _ops.initial_plateau_state(len(groups), opt._device, width)
    return Loaded(loaded, new_groups, group_steps, plateau_state)


def saved_schedule_state(saved_groups: list[dict]) -> dict[str, Any]:
    """The schedule state that state_dict() keeps in each group, checked to be numbers: the step
    counts as a tensor, each group's row of plateau_state as a list (its width its schedule's)."""
    steps, plateau = [], []
    for g, saved in enumerate(saved_groups):
        step, state = saved["schedule_step"], saved.get("plateau_state")
        step = step.item() if isinstance(step, Tensor) and step.numel() == 1 else step
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or not 0 <= step < STEP_LIMIT:
            raise ValueError(f"loaded group {g} has an invalid schedule_step {saved['schedule_step']!r} "
                             "(an integer in [0, 2**63) is required)")
        state = state.tolist() if isinstance(state, Tensor) else state
        if (not isinstance(state, (list, tuple)) or len(state) < _ops.PLATEAU_SLOTS
                or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in state)):
            shown = state if not isinstance(state, (list, tuple)) or len(state) <= 16 else f"{list(state[:16])}..."
            raise ValueError(f"loaded group {g} has an invalid plateau_state {shown!r} "
                             f"(at least {_ops.PLATEAU_SLOTS} numbers are required)")
        steps.append(int(step))
        plateau.append([float(v) for v in state])
    return {"group_steps": torch.tensor(steps, dtype=torch.int64), "plateau_state": plateau}


def param_state(opt, param: Tensor, saved: dict, saved_id) -> dict:
    """The saved state of one parameter, checked: its step count as an int, its tensors as saved."""
    state: dict[str, Any] = {}
    for key in opt._REQUIRED_KEYS:
        if not isinstance(saved.get(key), Tensor):
            raise ValueError(f"loaded state of parameter {saved_id!r} has no {key!r}")
    step = saved.get("step", opt._missing_step(saved))
    if step is None:
        raise ValueError(f"loaded state of parameter {saved_id!r} has no 'step'")
    step = step.item() if isinstance(step, Tensor) and step.numel() == 1 else step
    if (isinstance(step, bool) or not isinstance(step, numbers.Real) or not math.isfinite(step)
            or not 0 <= step < STEP_LIMIT or step != int(step)):
        raise ValueError(f"loaded state of parameter {saved_id!r} has an invalid step {step!r}")
    state["step"] = int(step)
    for key, value in saved.items():
        if key == "step" or value is None:
            continue
        if key not in opt._STATE_KEYS and key not in _state.MASTER_KEYS:
            raise ValueError(f"loaded state of parameter {saved_id!r} has an unknown entry {key!r}")
        if key in _state.MASTER_KEYS and not _state.has_master_weight(param, opt.master_weights):
            raise ValueError(f"loaded state of parameter {saved_id!r} has a master weight, but the optimizer "
                             f"keeps none for this {param.dtype} parameter (master_weights="
                             f"{opt.master_weights!r}; only bfloat16 and float16 parameters have one)")
        if key == "master_remainder" and (param.dtype != torch.bfloat16 or not isinstance(value, Tensor)
                                          or value.dtype != torch.int16):
            raise ValueError(f"loaded master_remainder of parameter {saved_id!r} must be an int16 tensor of a "
                             f"bfloat16 parameter")
        if not isinstance(value, Tensor) or value.shape != param.shape:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"loaded {key} of parameter {saved_id!r} has shape {shape}, the parameter "
                             f"{tuple(param.shape)}: a state_dict from a different parameter layout")
        state[key] = value
    return state
