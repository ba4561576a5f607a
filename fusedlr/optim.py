"""fusedlr.SGD, fusedlr.Adam, fusedlr.AdamW, fusedlr.Lion: torch.optim optimizers whose learning-rate schedule
runs inside the fused step.

Each ``step()`` is one op call over every parameter of every group: the kernel reads each group's
step counter (an int64 tensor on the parameters' device), evaluates the group's schedule from it,
updates all parameters and advances the counters. There is no scheduler to step. A scheduled
group follows torch's convention (fusedlr/lr.py): its ``lr`` is the lr its next step uses, a 0-dim
float64 device tensor the step keeps current, and its base lr is ``initial_lr``.
"""

from __future__ import annotations

import math
import numbers
import sys
import warnings
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer
from torch.optim import optimizer as _torch_optimizer

from . import _checkpoint, _ops, _state, _step_cache, lr as _lr
from . import distributed as _dist
from ._step_cache import StepLists
from .distributed import is_dtensor, local_of
from .schedules import Schedule, compile_programs

__all__ = ["SGD", "Adam", "AdamW", "Lion"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _host_values_on(device: torch.device, values: Any, dtype: torch.dtype) -> Tensor:
    """A tensor of host values on `device`; on a GPU copied from pinned memory, without a sync."""
    values = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value!r} (a finite number is required)")
    return float(value)


def _check_betas(betas: Any, high_open: bool) -> tuple[float, float]:
    """A pair of betas in [0, 1) (high_open) or [0, 1]; ValueError naming the one that is not."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (a pair of numbers in [0, 1{')' if high_open else ']'} is required)")
    return (_check_range("beta parameter at index 0 (betas[0])", betas[0], 0.0, 1.0, high_open=high_open),
            _check_range("beta parameter at index 1 (betas[1])", betas[1], 0.0, 1.0, high_open=high_open))


def _check_range(name: str, value: Any, low: float, high: float = math.inf, high_open: bool = False) -> float:
    value = _as_float(name, value)
    if value < low or value > high or (high_open and value == high):
        raise ValueError(f"Invalid {name}: {value} (must be in [{low}, {high}{')' if high_open else ']'})")
    return value


def _check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (must be True or False)")
    return value


# settings of the whole optimizer (its step clips, skips and keeps masters over every group at once),
# which a param group would otherwise carry unread: each with the check the constructor gives it
_OPTIMIZER_WIDE = {
    "max_grad_norm": lambda value: _check_max_grad_norm(value),  # (defined below)
    "skip_nonfinite": lambda value: _check_flag("skip_nonfinite", value),
    "master_weights": _state.check_master_weights,
}


def _check_group_keys(opt, group: dict) -> None:
    """Raise ValueError for a param group's key that fusedlr would not read: an optimizer-wide
    setting other than the optimizer's own (a wrapper such as ZeRO's passes its constructor's
    arguments in each group), or a torch flag the fused step cannot honour (as the constructor
    refuses it)."""
    for key, check in _OPTIMIZER_WIDE.items():
        if key in group and check(group[key]) != getattr(opt, key):
            raise ValueError(f"a param group's {key}={group[key]!r}, where the {type(opt).__name__} has "
                             f"{getattr(opt, key)!r}: {key} is a setting of the whole optimizer; pass it to the "
                             "constructor")
    if "partition_group" in group and group["partition_group"] is not opt.partition_group:
        raise ValueError("a param group's partition_group is not the optimizer's: partition_group is a setting of "
                         "the whole optimizer; pass it to the constructor")
    _check_unsupported(group.get("foreach"), group.get("fused"), group.get("differentiable"))


def _check_unsupported(foreach, fused, differentiable) -> None:
    if foreach:
        raise ValueError("foreach=True: fusedlr always runs its own fused step; leave foreach unset")
    if fused is False:
        raise ValueError("fused=False: fusedlr always runs its own fused step; leave fused unset or True")
    if differentiable:
        raise ValueError("differentiable=True is not supported by the fused step")


def _check_max_grad_norm(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) or value <= 0:
        raise ValueError(f"Invalid max_grad_norm: {value!r} (a number > 0 is required, inf to only compute the norm; "
                         "None turns clipping off)")
    return float(value)


# The step's hot path reads these once per step: looked up once here.
_is_compiling = torch.compiler.is_compiling
_autograd_profiler = torch.autograd.profiler  # ._is_profiler_enabled: torch's flag for fast checks
_global_pre_hooks = _torch_optimizer._global_optimizer_pre_hooks
_global_post_hooks = _torch_optimizer._global_optimizer_post_hooks


def _is_capturing(device: torch.device | None) -> bool:
    """Whether a CUDA graph is being captured on the current stream of `device` (a CUDA device)."""
    return device is not None and device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class _FusedOptimizer(Optimizer):
    """What SGD, Adam, AdamW and Lion share: groups, device step counters, state_dict, the step path.

    Its parts of their own: the step cache (fusedlr/_step_cache.py), the state layout
    (fusedlr/_state.py) and checkpoint conversion (fusedlr/_checkpoint.py). A subclass's hooks
    (_check_group, _hyper_values, _has_state, _missing_step) are the optimizer's methods, which
    those modules call."""

    # torch.amp.GradScaler hands the step its scale and inf flag (grad_scale, found_inf attributes
    # it sets on the optimizer and deletes after the step; it reads an existing grad_scale as a
    # scale of the user's, so there is no class default) instead of unscaling and checking on the
    # host (csrc/ops.cpp, [note: amp]).
    _step_supports_amp_scaling = True
    # The optimizer of the C++ registry a subclass steps (fusedlr/_ops.py, OPTIMIZERS): its
    # descriptor gives the order of the `hyper` slots and the state keys.
    _OPTIMIZER: str
    _DESCRIPTOR: _ops.OptimizerDescriptor
    _STATE_KEYS: tuple[str, ...]  # tensor state besides "step", in the op's argument order
    # The keys the torch optimizer of the same name keeps in its groups and fusedlr's do not, with
    # the values that say what fusedlr's step is to torch (a step of its own: neither torch's
    # foreach nor its fused one, nor capturable or differentiable). Saved groups carry them, so
    # that torch.distributed.checkpoint, which loads every key of torch's state_dict, loads a
    # fusedlr checkpoint into torch's optimizer (fusedlr/_checkpoint.py, to_state_dict).
    _TORCH_GROUP_KEYS: dict[str, Any] = {}
    _REQUIRED_KEYS: tuple[str, ...]  # what loaded state must hold

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "_OPTIMIZER" in cls.__dict__:
            cls._DESCRIPTOR = _ops.OPTIMIZERS[cls._OPTIMIZER]
            cls._STATE_KEYS = cls._DESCRIPTOR.states
            cls._REQUIRED_KEYS = cls._DESCRIPTOR.required

    def __init__(self, params, defaults: dict, max_grad_norm: float | None, skip_nonfinite: bool,
                 master_weights: bool | str, partition_group=None, state_dtype: torch.dtype | None = None,
                 stochastic_rounding: bool = False, rounding_seed: int | None = None):
        if partition_group is not None and not (
                _dist.is_initialized() and isinstance(partition_group, dist.ProcessGroup)):
            raise ValueError(f"partition_group must be a torch.distributed ProcessGroup of an initialized process "
                             f"group, got {partition_group!r}")
        # the ranks that hold the other partitions of the model's plain parameters (ZeRO): the global
        # norm is summed over them ([note: global norm])
        self.partition_group = partition_group
        self.max_grad_norm: float | None = _check_max_grad_norm(max_grad_norm)
        self.skip_nonfinite: bool = _check_flag("skip_nonfinite", skip_nonfinite)
        self.master_weights: bool | str = _state.check_master_weights(master_weights)
        self._device: torch.device | None = None
        self._ranks_agree = False  # whether the ranks' settings were found alike ([note: settings across ranks])
        self._state_writes = 0  # state.writes when its entries were last all the optimizer's own
        self._step_calls = 0  # calls of step(), counted on the host (for as_lr_scheduler's cadence check)
        self._grad_norm: Tensor | None = None      # float64 scalar: the last step's gradient norm
        self._group_steps: Tensor | None = None    # int64 [groups]: completed steps of each group
        # float64 [groups, width]: each group's row of metric-driven schedule state (ReduceLROnPlateau,
        # GreedyLR; csrc/schedule_math.h), as wide as the widest row its schedules need
        self._plateau_state: Tensor | None = None
        self._row_schedules: list[Schedule | None] = []  # the schedule whose state each row holds
        self._group_lrs: Tensor | None = None      # float64 [groups]: each group's next lr (fusedlr/lr.py)
        self._lrs_version = 0                      # its version counter after the optimizer's last own write
        self._lr_views: list[Tensor | None] = []   # the "lr" put into each scheduled group, a view of it
        self._lists: StepLists | None = None  # the step cache (fusedlr/_step_cache.py)
        self._programs_key: list[Schedule | None] = []
        self._programs: list[float] = []
        self._placeholders = _state.Placeholders()
        # how each group's state is stored (fusedlr/_state.py): group settings, as torch's are
        defaults = dict(defaults, state_dtype=state_dtype, stochastic_rounding=stochastic_rounding,
                        rounding_seed=_state.DEFAULT_SEED if rounding_seed is None else rounding_seed)
        super().__init__(params, defaults)
        self.state = _state.StateTable(self.state)

    # -- groups ----------------------------------------------------------------------------------

    def _check_group(self, group: dict) -> None:
        """Raise ValueError, naming the argument, for a hyperparameter torch would refuse."""
        raise NotImplementedError

    def add_param_group(self, param_group: dict) -> None:
        schedule = param_group.get("schedule", self.defaults.get("schedule"))
        if schedule is not None and not isinstance(schedule, Schedule):
            raise ValueError(f"schedule must be a fusedlr.schedules schedule or None, got {type(schedule).__name__}")
        if isinstance(param_group, dict):
            _check_group_keys(self, param_group)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            if group["schedule"] is not None and "initial_lr" in group:
                group["lr"] = group["initial_lr"]  # a group a torch scheduler has seen: its base lr
            self._check_group(group)
            _state.check_storage_settings(group)
            _lr.lr_scale(group)  # its value checked, with a schedule or without
            _lr.base_lr(group)  # and initial_lr
            if len({id(p) for p in group["params"]}) != len(group["params"]):
                raise ValueError("a param group lists a parameter twice: each parameter takes one update per step")
            device = self._check_params(group["params"])
            # The counters live on the parameters' device; groups without parameters leave it open.
            if self._group_steps is None:
                group_steps = torch.zeros(1, dtype=torch.int64, device=device)
                plateau_state = _ops.initial_plateau_state(1, device)
            else:
                group_steps = torch.cat([self._group_steps.to(device), self._group_steps.new_zeros(1, device=device)])
                plateau_state = torch.cat([self._plateau_state.to(device),
                                           _ops.initial_plateau_state(1, device, self._plateau_state.size(1))])
        except Exception:
            self.param_groups.pop()
            raise
        if group["schedule"] is None and group.get("lr_scale", 1.0) != 1.0:
            warnings.warn(f"param group {len(self.param_groups) - 1}'s lr_scale scales a schedule and it has none: "
                          "it runs at its lr, as torch's optimizers run a group without timm's scheduler")
        self._device = device
        self._group_steps, self._plateau_state = group_steps, plateau_state
        self._row_schedules = self._row_schedules + [group["schedule"]]
        if self._grad_norm is None or self._grad_norm.device != group_steps.device:
            self._grad_norm = torch.full((), math.nan, dtype=torch.float64, device=group_steps.device)
        self._lists = None
        self._attach_lrs()

    def _check_params(self, params: list[Tensor]) -> torch.device | None:
        """The optimizer's device once `params` join it; raises for parameters it cannot update."""
        devices = {p.device for p in params}
        if self._device is not None:
            devices.add(self._device)
        if len(devices) > 1:
            raise ValueError(f"parameters on mixed devices ({', '.join(sorted(map(str, devices)))}); "
                             "a fusedlr optimizer updates parameters of one device")
        for p in params:
            if p.is_meta:
                raise ValueError("a meta parameter has no data to update; materialize it first (to_empty)")
            _dist.check_parameter(p)
            if p.is_complex():
                raise ValueError("complex parameters are not supported by fusedlr")
            if p.dtype not in _FLOAT_DTYPES:
                raise ValueError(f"parameter dtype {p.dtype} is not supported (float32, float64, bfloat16, float16)")
            if self.master_weights == _state.REMAINDER and p.dtype == torch.float16:
                raise ValueError("master_weights='remainder' completes bfloat16 parameters (a float32 master is a "
                                 "bfloat16 and 16 more bits); float16 parameters need master_weights=True")
        return devices.pop() if devices else None

    # -- the step path ---------------------------------------------------------------------------

    def _hyper(self) -> tuple[float, ...]:
        return tuple(value for group in self.param_groups for value in self._group_hyper(group))

    def _hyper_values(self, group: dict) -> dict[str, float]:
        """The group's hyperparameters by the names of the op's `hyper` slots (the descriptor's
        `slots`); "lr" is the lr the schedule scales (_lr.base_lr). float(): a tensor value changed
        in place (fill_) is a changed value."""
        raise NotImplementedError

    def _group_hyper(self, group: dict) -> tuple[float, ...]:
        """The group's slots of the ops' `hyper` argument, in the descriptor's order."""
        values = self._hyper_values(group)
        _state.check_rounding(group)  # the common slots (csrc/optimizer_traits.h, CommonSlot)
        values.update(stochastic_rounding=float(group["stochastic_rounding"]), rounding_seed=float(group["rounding_seed"]))
        slots = self._DESCRIPTOR.slots
        if len(values) != len(slots):
            raise RuntimeError(f"{type(self).__name__}: hyperparameters {sorted(values)} do not match the "
                               f"op's slots {list(slots)}")
        return tuple(values[name] for name in slots)

    # -- the lr convention (fusedlr/lr.py) -------------------------------------------------------

    def _attach_lrs(self) -> None:
        """A new group_lrs vector for the current groups, each scheduled group's "lr" a view of it."""
        groups = self.param_groups
        with torch.inference_mode(False):  # a version counter (fusedlr/lr.py), even under inference mode
            self._group_lrs = torch.zeros(len(groups), dtype=torch.float64, device=self._group_steps.device)
            self._lr_views = [None] * len(groups)
            for g, group in enumerate(groups):
                if group["schedule"] is not None:
                    group.setdefault("initial_lr", float(group["lr"]))
                    group["lr"] = self._lr_views[g] = self._group_lrs[g]
        self._refresh_lrs()

    def _refresh_lrs(self) -> None:
        """group_lrs from the schedules at the groups' step counts (after anything but a step moved them)."""
        with torch.no_grad():
            self._group_lrs.copy_(self._schedule_values()[:, 0])
        self._lrs_version = self._group_lrs._version

    def _check_lrs(self) -> None:
        """Raises if a scheduled group's lr was written since the optimizer last set it; follows
        groups that gained or lost a schedule."""
        _lr.check_scheduled_lrs(self)

    def _programs_now(self) -> list[float]:
        schedules = [g["schedule"] for g in self.param_groups]
        scales = [_lr.lr_scale(g) for g in self.param_groups]
        key = schedules + scales
        if len(key) != len(self._programs_key) or any(a is not b and not (isinstance(a, float) and a == b)
                                                      for a, b in zip(key, self._programs_key)):
            for s in schedules:
                if s is not None and not isinstance(s, Schedule):
                    raise ValueError(f"schedule must be a fusedlr.schedules schedule or None, got {type(s).__name__}")
            self._programs = compile_programs([s if s is None else s.scaled(scale)
                                               for s, scale in zip(schedules, scales)])
            self._programs_key = key
            self._fit_schedule_state()
        return self._programs

    def _fit_schedule_state(self) -> None:
        """The schedule state fitted to the groups' schedules now: widened to the rows they need
        (a GreedyLR's smoothing window), the new slots a fresh row's, and fresh rows for the groups
        whose metric-driven schedule changed its layout (another kind, another window); a new
        schedule of the same layout (another patience, say) carries on from the row."""
        state = self._plateau_state
        if state is None:
            return
        schedules = [g["schedule"] for g in self.param_groups]
        owners = self._row_schedules if len(self._row_schedules) == len(schedules) else schedules
        stale = [g for g, (now, before) in enumerate(zip(schedules, owners)) if _row_layout(now) != _row_layout(before)]
        width = max(_ops.schedule_state_width(self._programs, len(self.param_groups)), state.size(1))
        if width > state.size(1) or stale:
            fresh = _ops.initial_plateau_state(state.size(0), state.device, width)
            fresh[:, :state.size(1)] = state
            fresh[stale] = _ops.initial_plateau_state(len(stale), state.device, width)
            self._plateau_state = fresh
            self._lists = None  # a plan holds the old tensor
        self._row_schedules = schedules

    def _set_metric_state(self, rows: Sequence[dict | None]) -> None:
        """Each group's row of metric-driven schedule state from its slots by name (None: a fresh
        row), checked before it replaces the current rows (fusedlr.from_torch)."""
        programs = self._programs_now()
        state = _ops.initial_plateau_state(len(self.param_groups), self._plateau_state.device,
                                           self._plateau_state.size(1))
        for g, row in enumerate(rows):
            if row is not None:
                state[g] = torch.tensor(_ops.state_row(programs, g, row, state.size(1)), dtype=torch.float64)
        _ops.check_schedule_state(programs, len(self.param_groups), state)
        self._plateau_state = state
        self._row_schedules = [g["schedule"] for g in self.param_groups]
        self._lists = None
        self._refresh_lrs()

    def _has_state(self, key: str, param: Tensor, group: dict) -> bool:
        """Whether the parameter's state holds `key` (one of _STATE_KEYS) under the current settings:
        required state always, master weights as the option says; a subclass decides its other
        optional state. Read when state is created and by the step key (fusedlr/_state.py,
        fusedlr/_step_cache.py)."""
        if key in self._REQUIRED_KEYS:
            return True
        return key == "master_weight" and _state.has_master_weight(param, self.master_weights)

    def _build_lists(self) -> StepLists:
        # settings changed since __init__ and add_param_group checked them, checked before state changes
        _state.check_master_weights(self.master_weights)
        for group in self.param_groups:
            _state.check_storage_settings(group)
            self._check_params(group["params"])
        lists = StepLists()
        lists.states = {key: [] for key in self._STATE_KEYS}
        for g, group in enumerate(self.param_groups):
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    lists.stateless.append(p)
                    continue
                _state.ensure_state(self._STATE_KEYS, self._has_state, p, group, state, self.master_weights)
                lists.params.append(p)
                lists.tensor_group.append(g)
                lists.steps.append(state["step"])
                for key in self._STATE_KEYS:
                    value = state.get(_state.state_key(key, self.master_weights))
                    lists.states[key].append(self._placeholders.of(p) if value is None else local_of(value))
        if any(is_dtensor(p) for p in lists.params):
            lists.owners = lists.params
            lists.params = [local_of(p) for p in lists.owners]
        lists.sharded = lists.owners is not None or self.partition_group is not None
        lists.hyper = list(self._hyper())
        lists.programs = self._programs_now()
        lists.plan = self._make_plan(lists)
        if not lists.sharded:
            lists.plan.configure(lists.hyper, lists.programs, self._group_steps, self._plateau_state,
                                 self.max_grad_norm, self.skip_nonfinite, self._norm_out(), self._group_lrs)
        else:  # the norm is reduced across ranks first, then handed to the step ([note: global norm])
            lists.plan.configure(lists.hyper, lists.programs, self._group_steps, self._plateau_state, None, False,
                                 None, self._group_lrs)
        return lists

    def _prepare(self) -> tuple[StepLists, list[Tensor]]:
        """The lists of this step, creating state for parameters with their first gradient.
        Returns them and the parameters whose state was created here (undone if the step fails)."""
        self._check_lrs()
        key = _step_cache.step_key(self)
        lists = self._lists
        if lists is not None and key != lists.key:
            lists = self._lists = None
        if lists is not None:
            hyper = list(self._hyper())
            if hyper != lists.hyper:  # new values, same lists: no rebuild
                lists.plan.set_hyper(hyper)
                lists.hyper = hyper
        fresh: list[Tensor] = []
        if lists is None or (lists.stateless and any(p.grad is not None for p in lists.stateless)):
            first_grads = self._first_gradients()
            for p, _ in first_grads:
                if p.grad.layout != torch.strided:
                    raise RuntimeError(f"fusedlr optimizers take dense gradients only, got a {p.grad.layout} gradient")
                if p.grad.is_complex():
                    raise RuntimeError("fusedlr optimizers do not support complex gradients")
            try:
                with torch.no_grad():
                    new_states = _state.new_states(self._STATE_KEYS, self._has_state, first_grads, self.master_weights)
                    for (p, _), state in zip(first_grads, new_states):
                        self.state.put(p, state)
                        fresh.append(p)
                    lists = self._lists = self._build_lists()
            except Exception:
                for p in fresh:
                    del self.state[p]
                self._lists = None
                raise
            lists.key = _step_cache.step_key(self)
        lists.remember(self)
        return lists, fresh

    def step(self, closure: Callable[[], Any] | None = None):
        """One fused update of every parameter that has a gradient, at each group's scheduled lr."""
        # torch wraps every optimizer's step in a profiler range and its step hooks, which costs
        # more than a fused step of a small model: pay for it only when it does something.
        if _is_compiling():
            return self._hooked_step(closure)  # no host count in a graph (a changing int recompiles)
        self._step_calls += 1  # on the host, for as_lr_scheduler's cadence check
        if (self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks
                or _global_pre_hooks or _global_post_hooks or _autograd_profiler._is_profiler_enabled):
            return self._hooked_step(closure)
        lists = self._lists
        if (closure is None and lists is not None and lists.unchanged(self)
                and self._group_lrs._version == self._lrs_version  # no one wrote a scheduled lr (fusedlr/lr.py)
                and not (lists.stateless and any(p.grad is not None for p in lists.stateless))):
            # the common step: nothing to build (_prepare), nothing to undo
            grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
            if lists.sharded:
                self._sharded_step(lists, grad_scale, found_inf)
            else:
                lists.plan.step(grad_scale, found_inf)
            return None
        return self._step(closure)

    step.hooked = True  # torch's Optimizer.__init__ must not wrap it again

    def _step(self, closure: Callable[[], Any] | None = None):
        if self._group_steps is not None and len(self.param_groups) != self._group_steps.numel():
            raise RuntimeError(f"the optimizer has {len(self.param_groups)} param groups and step counters for "
                               f"{self._group_steps.numel()}: a group joins by opt.add_param_group(...), which gives "
                               "it its step counter and schedule state (param_groups was changed in place)")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.state and self._initializes_state():
            self._create_state()
            return loss
        self._take_written_state()
        lists, fresh = self._prepare()
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        try:
            if lists.sharded:
                self._sharded_step(lists, grad_scale, found_inf)
            elif torch.compiler.is_compiling():
                self._run_op(lists, [p.grad for p in lists.params], lists.hyper, lists.programs, grad_scale,
                             found_inf, self.max_grad_norm, self.skip_nonfinite, self._norm_out())
                self._group_lrs.copy_(self._schedule_values()[:, 0])
            else:
                lists.plan.step(grad_scale, found_inf)
        except Exception:
            for p in fresh:
                del self.state[p]
            if fresh:
                self._lists = None
            raise
        return loss

    _hooked_step = Optimizer.profile_hook_step(_step)

    def _initializes_state(self) -> bool:
        """Whether this step is torch.distributed.checkpoint's state-initializing one: called by
        its _init_optim_state before any state exists, every group's lr set to 0 and every
        gradient zero. torch's optimizers change nothing in it but their state; fusedlr creates
        its state and steps nothing (its schedules would advance, and an absolute one would still
        decay the weights). A user's own first step with lr 0 and zero gradients is a step."""
        caller = _dist.state_initializer_code()
        frame = sys._getframe(1)
        for _ in range(8):
            if frame is None or frame.f_code is caller:
                break
            frame = frame.f_back
        else:
            return False
        return frame is not None and all(
            isinstance(g["lr"], (numbers.Real, Tensor)) and float(g["lr"]) == 0 for g in self.param_groups)

    def _first_gradients(self) -> list[tuple[Tensor, dict]]:
        """The parameters with a gradient and no state yet, each with its group."""
        return [(p, group) for group in self.param_groups for p in group["params"]
                if p.grad is not None and not self.state.get(p)]

    def _create_state(self) -> None:
        """The state of every parameter with a gradient, and nothing else: the lists are built, and
        the lrs checked, at the next step (after the caller has put its own lrs back)."""
        fresh = self._first_gradients()
        with torch.no_grad():
            for (p, _), state in zip(fresh, _state.new_states(self._STATE_KEYS, self._has_state, fresh, self.master_weights)):
                self.state.put(p, state)
        self._lists = None

    def _sharded_step(self, lists: StepLists, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """A step over local shards ([note: DTensor parameters]), its norm and inf flags reduced
        across ranks ([note: global norm]): one all-reduce, then the step with the clipping factor
        folded into the gradient scale and the skip decision in found_inf."""
        if not self._ranks_agree and not _is_compiling() and not _is_capturing(self._device):
            if lists.reduction is None:
                lists.reduction = _dist.NormReduction(lists.owners or lists.params, self.partition_group)
            lists.reduction.check_settings(self.max_grad_norm, self.skip_nonfinite, found_inf is not None,
                                           self._device)
            self._ranks_agree = True
        grads = None if lists.owners is None else _dist.local_grads(lists.owners)
        wants_norm = self._wants_norm()
        if not wants_norm and found_inf is None:
            self._step_shards(lists, grads, grad_scale, found_inf)
            return
        if lists.reduction is None:
            lists.reduction = _dist.NormReduction(lists.owners or lists.params, self.partition_group)
        reduced = torch.zeros(2, dtype=torch.float64, device=self._device)  # sum of squares, infs found
        if wants_norm:
            local_grads = [p.grad for p in lists.params] if grads is None else grads
            counted = [g for g, c in zip(local_grads, lists.reduction.counted) if c and g is not None]
            copies = [g for g, c in zip(local_grads, lists.reduction.counted) if not c and g is not None]
            if counted:
                reduced[0] = _ops.sum_of_squares(counted)
            if copies:  # counted elsewhere, but a NaN or inf of this rank's copy must reach every rank
                reduced[0] += 0.0 * _ops.sum_of_squares(copies)
        if found_inf is not None:
            reduced[1] = found_inf.double().reshape(())
        lists.reduction.global_sum(reduced)
        skip = reduced[1] != 0
        scale = None
        if wants_norm:
            unscale = 1.0 if grad_scale is None else grad_scale.double().reshape(())
            norm = reduced[0].sqrt() / unscale
            self._grad_norm.copy_(norm)
            if self.skip_nonfinite:
                skip = skip | ~torch.isfinite(norm)
            if self.max_grad_norm is not None:
                clip = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
                scale = (unscale / clip).reshape(1)  # the kernels read both in double
        if scale is None and grad_scale is not None:
            scale = grad_scale
        self._step_shards(lists, grads, scale, skip.double().reshape(1))

    def _step_shards(self, lists: StepLists, grads: list[Tensor | None] | None, grad_scale: Tensor | None,
                     found_inf: Tensor | None) -> None:
        if torch.compiler.is_compiling():
            grads = [p.grad for p in lists.params] if grads is None else grads
            self._run_op(lists, grads, lists.hyper, lists.programs, grad_scale, found_inf, None, False, None)
            self._group_lrs.copy_(self._schedule_values()[:, 0])
        else:
            lists.plan.step(grad_scale, found_inf, grads)

    def _make_plan(self, lists: StepLists):
        return self._DESCRIPTOR.plan(lists.params, [lists.states[key] for key in self._STATE_KEYS], lists.steps,
                                     lists.tensor_group)

    def _run_op(self, lists: StepLists, grads: list[Tensor | None], hyper: tuple[float, ...], programs: list[float],
                grad_scale: Tensor | None, found_inf: Tensor | None, max_grad_norm: float | None,
                skip_nonfinite: bool, grad_norm: Tensor | None):
        _ops.step_(self._OPTIMIZER, lists.params, grads, [lists.states[key] for key in self._STATE_KEYS],
                   lists.steps, lists.tensor_group, hyper, programs, self._group_steps, self._plateau_state,
                   grad_scale, found_inf, max_grad_norm, skip_nonfinite, grad_norm)

    # -- gradient norm ---------------------------------------------------------------------------

    def _wants_norm(self) -> bool:
        return self.max_grad_norm is not None or self.skip_nonfinite

    def _norm_out(self) -> Tensor | None:
        return self._grad_norm if self._wants_norm() else None

    def last_grad_norm(self) -> Tensor:
        """float64 scalar device tensor: the global L2 norm of the (unscaled) gradients of the last
        step, before clipping, as torch.nn.utils.clip_grad_norm_ returns it; NaN before the first step.
        Computed when the optimizer clips (max_grad_norm) or skips non-finite steps (skip_nonfinite).
        A copy: later steps do not change it. Converting it to a float is a host sync."""
        if not self._wants_norm():
            raise ValueError("last_grad_norm(): the optimizer computes no norm; construct it with max_grad_norm= "
                             "or skip_nonfinite=True")
        return self._grad_norm.clone()

    # -- schedules -------------------------------------------------------------------------------

    def observe(self, metric: Tensor | float) -> None:
        """Feed a metric to the groups whose schedule is driven by one, ReduceLROnPlateau or GreedyLR
        (torch's scheduler.step(metric)).

        A tensor metric stays on the device: no host sync. Groups with other schedules ignore it.
        """
        if not any(g["schedule"] is not None and g["schedule"].observes_metric for g in self.param_groups):
            raise ValueError("observe(): no param group has a ReduceLROnPlateau or GreedyLR schedule")
        if isinstance(metric, Tensor):
            if metric.numel() != 1 or not metric.is_floating_point():
                raise ValueError(f"observe(): the metric must be a one-element floating-point tensor or a number, "
                                 f"got {metric.dtype} of shape {tuple(metric.shape)}")
            metric = metric.detach().to(self._device)
        else:
            if isinstance(metric, bool) or not isinstance(metric, numbers.Real):
                raise ValueError(f"observe(): the metric must be a number or a one-element tensor, got {metric!r}")
            metric = _host_values_on(self._device, float(metric), torch.float64)
        self._take_written_state()
        programs = self._programs_now()  # first: it may widen the state
        _ops.plateau_observe_(metric, [_lr.base_lr(g) for g in self.param_groups], programs, self._plateau_state)
        self._refresh_lrs()

    def _schedule_values(self) -> Tensor:
        self._take_written_state()
        programs = self._programs_now()  # first: it may widen the state
        return _ops.evaluate_schedules(programs, [_lr.base_lr(g) for g in self.param_groups], self._group_steps,
                                       self._plateau_state)

    def last_lr(self) -> Tensor:
        """float64 [groups] device tensor: the lr each group's next step will use (torch's
        scheduler.get_last_lr()). Converting it to a float is a host sync, the caller's choice."""
        return self._schedule_values()[:, 0]

    def last_momentum(self) -> Tensor:
        """float64 [groups] device tensor: the momentum (SGD) or beta1 (Adam) of each group's next step."""
        values = self._schedule_values()
        static = _host_values_on(values.device, [self._static_momentum(g) for g in self.param_groups], torch.float64)
        return torch.where(values[:, 2] != 0, values[:, 1], static)

    def _static_momentum(self, group: dict) -> float:
        return self._hyper_values(group)[self._DESCRIPTOR.momentum_slot]

    def as_lr_scheduler(self) -> _lr.OnDeviceScheduler:
        """A torch LRScheduler for the slots where a framework wants one (HF Trainer's
        ``optimizers=(opt, opt.as_lr_scheduler())``, Lightning's ``configure_optimizers``): its
        ``step()`` changes nothing, since the schedule runs in the optimizer's step, and
        ``get_last_lr()`` reports the lrs as torch's scheduler would (fusedlr/lr.py). With a
        metric-driven schedule (ReduceLROnPlateau, GreedyLR) in a group it is a torch
        ReduceLROnPlateau, so that the frameworks hand it their metric at each evaluation."""
        if any(g["schedule"] is not None and g["schedule"].observes_metric for g in self.param_groups):
            return _lr.OnDeviceMetricScheduler(self)
        return _lr.OnDeviceScheduler(self)

    def schedule_steps(self) -> Tensor:
        """int64 [groups] device tensor: the optimizer steps each group has completed."""
        self._take_written_state()
        return self._group_steps

    def set_schedule_steps(self, steps: int | Sequence[int]) -> None:
        """Set the completed-step count of every group (an int) or of each group (a sequence): for a
        checkpoint that does not carry it, such as torch's SGD state_dict."""
        values = ([steps] * len(self.param_groups) if not isinstance(steps, (Sequence, torch.Tensor))
                  else list(steps))
        self._take_written_state()  # a count set now wins over a wrapper's loaded one
        if len(values) != len(self.param_groups) or any(
                isinstance(v, bool) or not isinstance(v, numbers.Integral)
                or not 0 <= v < _checkpoint.STEP_LIMIT for v in values):
            raise ValueError(f"steps must be an integer in [0, 2**63) or one per group ({len(self.param_groups)}), "
                             f"got {steps!r}")
        self._group_steps.copy_(torch.tensor([int(v) for v in values], dtype=torch.int64))
        self._refresh_lrs()

    # -- state_dict ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """torch's layout (per-parameter "step", "exp_avg", ...; "step" as int64), schedules as plain
        data, and each group's schedule state in the group ("schedule_step", "plateau_state"). As a
        torch scheduler leaves it,
        each scheduled group's "lr" is the lr of its next step (a float: a host sync), "initial_lr"
        its base lr, and the keys its torch twin scheduler keeps in the group are there (OneCycleLR's
        max_lr, min_lr, the cycled momentum or beta1 of the next step), so that torch's optimizer and
        twin scheduler continue from a fusedlr checkpoint (fusedlr.schedules.torch_scheduler with
        last_epoch). A group without a schedule is saved as torch saves it."""
        self._take_written_state()
        return _checkpoint.to_state_dict(self, super().state_dict())

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a fusedlr or torch.optim state_dict of the same parameter layout.

        Everything is checked before anything changes: a state_dict of another layout raises and
        leaves the optimizer as it was. From a torch checkpoint (no "schedule_step" in its groups) each group keeps
        its schedule, takes torch's "initial_lr" as its lr when there is one, and resumes its schedule
        at the largest step count of its parameters.
        """
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._apply_loaded(_checkpoint.from_state_dict(self, state_dict))  # checked: raises before anything changes
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _apply_loaded(self, loaded: _checkpoint.Loaded) -> None:
        new_state = _state.packed_copy(self._STATE_KEYS, loaded.state, loaded.param_groups, self.master_weights)
        self.state.clear()
        self.state.update(new_state)
        self.param_groups = loaded.param_groups
        self._group_steps, self._plateau_state = loaded.group_steps.clone(), loaded.plateau_state.clone()
        self._row_schedules = [g["schedule"] for g in self.param_groups]
        self._attach_lrs()
        self._lists = None
        self._programs_key = []

    def _take_written_state(self) -> None:
        """[note: state written past load_state_dict]
        A wrapper may load a checkpoint by writing each parameter's state into `opt.state` and its
        groups' values into `opt.param_groups` directly, this optimizer's load_state_dict unread:
        torch's ZeroRedundancyOptimizer does (its groups' "lr" is then a tensor of the checkpoint,
        its schedule state in no group). `opt.state` counts the entries written into it from
        outside (_state.StateTable); the next step, or a read of the schedule, first loads what is
        there as load_state_dict would load a torch checkpoint: checked in full, each group's base
        lr its "initial_lr", its schedule resumed at the largest step count of its parameters'
        state (as torch's schedulers resume from the same counts), its metric-driven schedule state
        (ReduceLROnPlateau's, GreedyLR's, which such a checkpoint does not hold) as it was. If the
        written state is wrong the call raises, and raises again at every step until it is mended
        or loaded over."""
        writes = getattr(self.state, "writes", 0)
        if writes == self._state_writes:
            return
        self._state_writes = writes  # first: reading the schedule below comes back here
        try:
            saved = _checkpoint.to_state_dict(self, super().state_dict())
            saved["state"] = {index: state for index, state in saved["state"].items() if state}
            for group in saved["param_groups"]:
                steps = [saved["state"][index].get("step") for index in group["params"] if index in saved["state"]]
                steps = [int(step) for step in steps if isinstance(step, (Tensor, numbers.Real))]
                if steps:
                    group["schedule_step"] = max(steps)
            self._apply_loaded(_checkpoint.from_state_dict(self, saved))
        except Exception:
            self._state_writes = None  # still to take
            raise

    def _missing_step(self, saved: dict) -> int | None:
        """The step count of loaded state that has none (torch's SGD keeps none), or None: required
        (fusedlr/_checkpoint.py)."""
        return None

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        for key in ("_group_steps", "_plateau_state", "_row_schedules", "_group_lrs", "_lrs_version", "_lr_views", "_device",
                    "_grad_norm", "max_grad_norm", "skip_nonfinite", "master_weights", "partition_group",
                    "_step_calls"):
            state[key] = getattr(self, key)
        return state

    def __setstate__(self, state: dict) -> None:
        state.setdefault("partition_group", None)  # pickled by a version without it
        state.setdefault("_row_schedules", [])
        state.setdefault("_step_calls", 0)
        super().__setstate__(state)
        if not isinstance(self.state, _state.StateTable):  # pickled by a version before it
            self.state = _state.StateTable(self.state)
        self._state_writes = self.state.writes
        self._ranks_agree = False  # a copy checks again at its first sharded step
        # a copy's group lrs must be views of its own vector again, with its version counter
        views = getattr(self, "_lr_views", [])
        for g, group in enumerate(self.param_groups):
            if g < len(views) and views[g] is not None and group.get("lr") is views[g]:
                group["lr"] = views[g] = self._group_lrs[g]
        if hasattr(self, "_group_lrs"):
            self._lrs_version = self._group_lrs._version
        self._lists = None
        self._programs_key = []
        self._programs = []
        self._placeholders = _state.Placeholders()


def _row_layout(schedule: Schedule | None) -> tuple | None:
    """What a schedule's row of state holds ([note: schedule state]): None for one that keeps none."""
    if schedule is None or not schedule.observes_metric:
        return None
    return (type(schedule).__name__, getattr(schedule, "smooth", False) and getattr(schedule, "window_size", 0))


_SCHEDULE_DOC = """
    schedule (fusedlr.schedules.Schedule, optional): the learning-rate schedule, evaluated in the
        step from the device step counter; also accepted per param group. None: constant lr.
    max_grad_norm (float, optional): clip the gradients as torch.nn.utils.clip_grad_norm_(params,
        max_grad_norm) before the step would: the global L2 norm over every gradient of the step
        is computed on the device and the gradients are scaled by min(1, max_grad_norm / (norm +
        1e-6)) inside the update. inf computes the norm without clipping. last_grad_norm() reads
        it. Under a GradScaler the norm is that of the unscaled gradients. Default: None (off).
    skip_nonfinite (bool): skip a step whose gradient norm is inf or NaN on the device, as
        GradScaler skips an overflowed step: parameters, state, step counters and schedule stay as
        they were. Default: False.
    master_weights (bool or "remainder"): True keeps a float32 master copy of every bfloat16 /
        float16 parameter (state "master_weight"); the update runs on it and writes the rounded
        parameter in the same pass (bfloat16: to nearest, ties away from zero). "remainder" keeps
        the same float32 master of a bfloat16 parameter in 2 bytes instead of 4: the parameter is
        its top half and the int16 state "master_remainder" its low half, bit for bit the run of
        True (float16 parameters need True). Other dtypes need none. Default: False.
    state_dtype (torch.dtype, optional): torch.bfloat16 stores the optimizer state (exp_avg,
        exp_avg_sq, max_exp_avg_sq, momentum_buffer) in bfloat16, computed in float32 and rounded
        when stored; torch.float8_e4m3fn in 8 bits: an e4m3 code per value and a power-of-two
        scale per block of 32 elements (OCP's MX format, 1.03 bytes per value), held as a 1-D
        uint8 tensor per state and shown decoded (float32, shaped like the parameter) in
        state_dict(); None keeps it in float32 (float64 for float64 parameters). Per param group.
    stochastic_rounding (bool): round stochastically (unbiased) where a value is stored in fewer
        bits than it is computed in: bfloat16 / float16 parameters without master weights, and
        bfloat16 or 8-bit state. Per param group. Default: False (to nearest).
    rounding_seed (int, optional): the seed of the stochastic rounding, in [0, 2**53); with the
        step count and each element's index it decides every rounding, so runs, thread counts,
        devices and resumes agree. Per param group. Default: 0, on every rank alike.
    partition_group (torch.distributed.ProcessGroup, optional): for plain parameters partitioned
        across ranks (ZeroRedundancyOptimizer): the group whose ranks hold the other partitions.
        max_grad_norm and skip_nonfinite then act on the norm of the whole model, summed over it,
        and an inf found by GradScaler on any of its ranks skips the step on all. DTensor
        parameters (FSDP2, tensor parallel) need none: they reduce over their mesh."""


class SGD(_FusedOptimizer):
    r"""Stochastic gradient descent (torch.optim.SGD) with the schedule fused into the step.

    .. math::
        g \leftarrow \pm\nabla + \lambda\theta, \quad
        b \leftarrow \mu b + (1 - \tau) g \;(b = g \text{ at first}), \quad
        g \leftarrow g + \mu b \text{ (nesterov) or } b, \quad
        \theta \leftarrow \theta - \gamma_t g

    with :math:`\gamma_t` the scheduled lr and :math:`\mu` the momentum (cycled by OneCycleLR and
    CyclicLR when they cycle it). Arguments as torch.optim.SGD, plus:
    """ + _SCHEDULE_DOC

    _OPTIMIZER = "sgd"
    _TORCH_GROUP_KEYS = {"foreach": None, "differentiable": False, "fused": None}

    def _missing_step(self, saved: dict) -> int:
        # torch's SGD state is only the momentum buffer; a buffer means at least one step was taken.
        return 1 if saved.get("momentum_buffer") is not None else 0

    def __init__(self, params: Iterable, lr: float | Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None,
                 schedule: Schedule | None = None, max_grad_norm: float | None = None, skip_nonfinite: bool = False,
                 master_weights: bool | str = False, partition_group=None, state_dtype: torch.dtype | None = None,
                 stochastic_rounding: bool = False, rounding_seed: int | None = None):
        _check_unsupported(foreach, fused, differentiable)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, schedule=schedule)
        self._check_group(defaults)
        super().__init__(params, defaults, max_grad_norm, skip_nonfinite, master_weights, partition_group,
                         state_dtype, stochastic_rounding, rounding_seed)

    def _check_group(self, group: dict) -> None:
        group["lr"] = _check_range("learning rate (lr)", group["lr"], 0.0)
        _check_range("momentum", group["momentum"], 0.0)
        _check_range("dampening", group["dampening"], -math.inf)
        _check_range("weight_decay", group["weight_decay"], 0.0)
        _check_flag("nesterov", group["nesterov"])
        _check_flag("maximize", group["maximize"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("nesterov momentum requires a momentum and zero dampening")

    @staticmethod
    def _uses_momentum(group: dict) -> bool:
        schedule = group["schedule"]
        return group["momentum"] != 0 or (schedule is not None and schedule.cycles_momentum)

    def _hyper_values(self, group: dict) -> dict[str, float]:
        return dict(lr=_lr.base_lr(group), momentum=float(group["momentum"]), dampening=float(group["dampening"]),
                    weight_decay=float(group["weight_decay"]), nesterov=float(group["nesterov"]),
                    maximize=float(group["maximize"]))

    def _has_state(self, key: str, param: Tensor, group: dict) -> bool:
        if key == "momentum_buffer":
            return self._uses_momentum(group)
        return super()._has_state(key, param, group)



class Adam(_FusedOptimizer):
    r"""Adam (torch.optim.Adam) with the schedule fused into the step.

    .. math::
        g \leftarrow \pm\nabla + \lambda\theta, \quad
        m \leftarrow \beta_1 m + (1 - \beta_1) g, \quad
        v \leftarrow \beta_2 v + (1 - \beta_2) g^2, \quad
        \theta \leftarrow \theta - \frac{\gamma_t}{1 - \beta_1^k}
            \frac{m}{\sqrt{\hat v} / \sqrt{1 - \beta_2^k} + \epsilon}

    with :math:`\gamma_t` the scheduled lr, k the parameter's step count, :math:`\hat v = v` or
    its running maximum (amsgrad), and :math:`\beta_1` cycled by OneCycleLR and CyclicLR when they
    cycle momentum. With ``decoupled_weight_decay=True`` (AdamW) the decay is
    :math:`\theta \leftarrow \theta (1 - \gamma_t \lambda)` instead of the L2 term. Arguments as
    torch.optim.Adam, plus:
    """ + _SCHEDULE_DOC

    _OPTIMIZER = "adam"
    _TORCH_GROUP_KEYS = {"foreach": None, "capturable": False, "differentiable": False, "fused": None}

    def __init__(self, params: Iterable, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, amsgrad: bool = False, *,
                 foreach: bool | None = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None, decoupled_weight_decay: bool = False,
                 schedule: Schedule | None = None, max_grad_norm: float | None = None, skip_nonfinite: bool = False,
                 master_weights: bool | str = False, partition_group=None, state_dtype: torch.dtype | None = None,
                 stochastic_rounding: bool = False, rounding_seed: int | None = None):
        _check_unsupported(foreach, fused, differentiable)
        _check_flag("capturable", capturable)  # the fused step is always capturable: counters live on the device
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, decoupled_weight_decay=decoupled_weight_decay, schedule=schedule)
        self._check_group(defaults)
        super().__init__(params, defaults, max_grad_norm, skip_nonfinite, master_weights, partition_group,
                         state_dtype, stochastic_rounding, rounding_seed)

    def _check_group(self, group: dict) -> None:
        group["lr"] = _check_range("learning rate (lr)", group["lr"], 0.0)
        group["betas"] = _check_betas(group["betas"], high_open=True)
        _check_range("epsilon value (eps)", group["eps"], 0.0)
        _check_range("weight_decay", group["weight_decay"], 0.0)
        _check_flag("amsgrad", group["amsgrad"])
        _check_flag("maximize", group["maximize"])
        _check_flag("decoupled_weight_decay", group["decoupled_weight_decay"])

    def _hyper_values(self, group: dict) -> dict[str, float]:
        beta1, beta2 = group["betas"]
        return dict(lr=_lr.base_lr(group), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                    weight_decay=float(group["weight_decay"]), amsgrad=float(group["amsgrad"]),
                    maximize=float(group["maximize"]),
                    decoupled_weight_decay=float(group["decoupled_weight_decay"]))

    def _has_state(self, key: str, param: Tensor, group: dict) -> bool:
        if key == "max_exp_avg_sq":
            return bool(group["amsgrad"])
        return super()._has_state(key, param, group)



class AdamW(Adam):
    r"""AdamW (torch.optim.AdamW): Adam with decoupled weight decay
    :math:`\theta \leftarrow \theta (1 - \gamma_t \lambda)`, the schedule fused into the step.
    Arguments as torch.optim.AdamW (weight_decay defaults to 1e-2), plus:
    """ + _SCHEDULE_DOC

    def __init__(self, params: Iterable, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, foreach: bool | None = None, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None, schedule: Schedule | None = None,
                 max_grad_norm: float | None = None, skip_nonfinite: bool = False, master_weights: bool | str = False,
                 partition_group=None, state_dtype: torch.dtype | None = None, stochastic_rounding: bool = False,
                 rounding_seed: int | None = None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         foreach=foreach, maximize=maximize, capturable=capturable, differentiable=differentiable,
                         fused=fused, decoupled_weight_decay=True, schedule=schedule, max_grad_norm=max_grad_norm,
                         skip_nonfinite=skip_nonfinite, master_weights=master_weights, partition_group=partition_group,
                         state_dtype=state_dtype, stochastic_rounding=stochastic_rounding, rounding_seed=rounding_seed)


class Lion(_FusedOptimizer):
    r"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms") with the schedule
    fused into the step.

    .. math::
        g \leftarrow \pm\nabla, \quad
        c \leftarrow \beta_1 m + (1 - \beta_1) g, \quad
        \theta \leftarrow \theta (1 - \gamma_t \lambda) - \gamma_t \operatorname{sign}(c), \quad
        m \leftarrow \beta_2 m + (1 - \beta_2) g

    with :math:`\gamma_t` the scheduled lr, :math:`\lambda` the (decoupled) weight decay and
    :math:`\beta_1` cycled by OneCycleLR and CyclicLR when they cycle momentum. State: "exp_avg"
    (m) and "step". Lion's step has the same size in every coordinate, so its lr is usually 3-10x
    smaller than AdamW's and its weight decay as much larger. Arguments:

    lr (float): the base learning rate. Default: 1e-4.
    betas (tuple[float, float]): :math:`(\beta_1, \beta_2)`, each in [0, 1]. Default: (0.9, 0.99).
    weight_decay (float): decoupled weight decay :math:`\lambda`. Default: 0.
    maximize (bool): maximize the objective instead. Default: False.
    """ + _SCHEDULE_DOC

    _OPTIMIZER = "lion"

    def __init__(self, params: Iterable, lr: float | Tensor = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, maximize: bool = False, foreach: bool | None = None,
                 differentiable: bool = False, fused: bool | None = None, schedule: Schedule | None = None,
                 max_grad_norm: float | None = None, skip_nonfinite: bool = False, master_weights: bool | str = False,
                 partition_group=None, state_dtype: torch.dtype | None = None, stochastic_rounding: bool = False,
                 rounding_seed: int | None = None):
        _check_unsupported(foreach, fused, differentiable)
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize, schedule=schedule)
        self._check_group(defaults)
        super().__init__(params, defaults, max_grad_norm, skip_nonfinite, master_weights, partition_group,
                         state_dtype, stochastic_rounding, rounding_seed)

    def _check_group(self, group: dict) -> None:
        group["lr"] = _check_range("learning rate (lr)", group["lr"], 0.0)
        group["betas"] = _check_betas(group["betas"], high_open=False)
        _check_range("weight_decay", group["weight_decay"], 0.0)
        _check_flag("maximize", group["maximize"])

    def _hyper_values(self, group: dict) -> dict[str, float]:
        beta1, beta2 = group["betas"]
        return dict(lr=_lr.base_lr(group), beta1=float(beta1), beta2=float(beta2),
                    weight_decay=float(group["weight_decay"]), maximize=float(group["maximize"]))
