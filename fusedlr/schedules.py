"""Learning-rate schedules evaluated inside the optimizer step.

A schedule is a small immutable value: its arguments, checked when it is built. Passed to a fusedlr
optimizer (``schedule=``, per param group too) it is compiled into a program of doubles that the
CPU and CUDA kernels evaluate from the device step counter, so no Python runs per step. The same
C++ formula evaluates it on the host: ``sched(t)`` is the lr of update ``t`` for a group whose lr
is ``base_lr``, and ``sched.momentum(t)`` the momentum (SGD) or beta1 (Adam) a cycling schedule sets.

Each schedule carries the name and the constructor arguments of its ``torch.optim.lr_scheduler``
twin, minus the optimizer. Relative schedules scale the group's ``lr``; OneCycleLR and CyclicLR set
absolute values, as in torch. Time ``t`` counts completed optimizer steps; a schedule that torch
users step once per epoch takes ``steps_per_epoch`` and sees ``t // steps_per_epoch``.

    >>> from fusedlr import schedules as S
    >>> warmup_cosine = S.SequentialLR(
    ...     [S.LinearLR(start_factor=0.01, total_iters=500), S.CosineAnnealingLR(T_max=9_500, eta_min=3e-5)],
    ...     milestones=[500])
    >>> warmup_cosine(0, base_lr=3e-4), warmup_cosine(500, base_lr=3e-4)
    (3e-06, 0.0003)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from . import _C, _ops

__all__ = [
    "Schedule",
    "ConstantLR",
    "LinearLR",
    "StepLR",
    "MultiStepLR",
    "ExponentialLR",
    "ExponentialDecay",
    "CosineAnnealingLR",
    "CosineAnnealingWarmRestarts",
    "PolynomialLR",
    "InverseSqrt",
    "WarmupStableDecay",
    "OneCycleLR",
    "CyclicLR",
    "ReduceLROnPlateau",
    "GreedyLR",
    "SequentialLR",
    "Warmup",
    "Decay",
    "Cycles",
    "Product",
    "StepDecay",
    "CosineAnnealing",
    "from_spec",
    "from_hf",
    "from_timm",
    "from_torchtitan",
    "torch_scheduler",
]

# The node kinds of csrc/schedule_math.h ([note: schedule kinds]): id and arg layout by name.
_KINDS: dict[str, dict] = _C.schedule_kinds()
_MAX_DEPTH = 16  # kMaxScheduleDepth


# ---------------------------------------------------------------------------------------------
# Argument checks: each raises ValueError naming the argument.


_MAX_INT = 2 ** 53  # programs hold doubles: larger integers would not survive the trip


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not minimum <= value <= _MAX_INT:
        raise ValueError(f"{name} must be an integer in [{minimum}, 2**53], got {value!r}")


def _check_float(name: str, value: Any, low: float = -math.inf, high: float = math.inf,
                 low_open: bool = False, high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low) or value > high or (high_open and value == high):
        bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {bounds}, got {value!r}")


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _schedule_tuple(name: str, value: Any) -> tuple:
    """A sequence argument (schedulers, milestones) as a tuple; ValueError naming it otherwise."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a sequence, got {value!r}")
    return tuple(value)


def _check_schedules(schedulers: tuple) -> None:
    if not schedulers:
        raise ValueError("schedulers must hold at least one schedule")
    for i, s in enumerate(schedulers):
        if not isinstance(s, Schedule):
            raise ValueError(f"schedulers[{i}] must be a fusedlr schedule, got {type(s).__name__}")


def _plain(value: Any) -> Any:
    """Python int / float for any integral / real number (a numpy scalar would not torch.load safely)."""
    if isinstance(value, bool) or value is None or isinstance(value, (str, Schedule)) or callable(value):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v) for v in value)
    return value


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """Base class. Subclasses are frozen dataclasses whose fields are the schedule's arguments."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # numpy scalars and the like become Python numbers
            object.__setattr__(self, f.name, _plain(getattr(self, f.name)))
        if "steps_per_epoch" in {f.name for f in dataclasses.fields(self)} and not isinstance(self, OneCycleLR):
            _check_int("steps_per_epoch", self.steps_per_epoch, 1)
        self._validate()

    def _validate(self) -> None:
        pass

    # -- the program the kernels run ----------------------------------------------------------

    def _node(self, children: Sequence[float] = ()) -> tuple[str, list[float]]:
        """The node's kind (its name in the kind table) and its args, as csrc/schedule_math.h lays them
        out; a composite schedule's args hold its children's offsets, given in `children`."""
        raise NotImplementedError

    def _children(self) -> tuple[Schedule, ...]:
        """The schedules a composite node hands on to, in the order of their offsets in its args."""
        return ()

    def _time_divisor(self) -> int:
        return getattr(self, "steps_per_epoch", 1)

    def _depth(self) -> int:
        """The nodes the evaluation walks through at most, this one included."""
        return 1 + max((c._depth() for c in self._children()), default=0)

    def _encode(self, program: list[float]) -> int:
        """Appends this schedule's nodes to `program`; returns the index of its root node."""
        children = self._children()
        name, args = self._node([0.0] * len(children))
        info = _KINDS[name]
        count = 0 if info["count_arg"] < 0 else int(args[info["count_arg"]])
        if len(args) != info["fixed_args"] + info["args_per_item"] * count:  # Python and C++ disagree
            raise RuntimeError(f"{name}: {len(args)} node args where the kind table says otherwise")
        at = len(program)
        program.extend([float(info["id"]), float(self._time_divisor()), *map(float, args)])
        if children:
            _, args = self._node([float(c._encode(program)) for c in children])
            program[at + 2:at + 2 + len(args)] = map(float, args)
        return at

    _ABSOLUTE_LRS: ClassVar[tuple[str, ...]] = ()  # the arguments that are lrs, not factors of the base lr

    # Whether the schedule is driven by ``opt.observe(metric)`` (ReduceLROnPlateau, GreedyLR): its
    # state is its group's row of the optimizer's schedule state, so it is only ever a group's root.
    observes_metric: ClassVar[bool] = False

    def scaled(self, factor: float) -> Schedule:
        """The schedule whose lr, for a base lr ``factor * base_lr``, is ``factor`` times this one's
        for ``base_lr``: its absolute lrs (eta_min, max_lr, ...) scaled. A param group's ``lr_scale``
        (timm's layer decay) scales its schedule so."""
        if factor == 1.0 or not self._ABSOLUTE_LRS:
            return self
        return dataclasses.replace(self, **{name: getattr(self, name) * factor for name in self._ABSOLUTE_LRS
                                            if getattr(self, name) is not None})

    @property
    def cycles_momentum(self) -> bool:
        """Whether the schedule also sets SGD's momentum or Adam's beta1."""
        children = self._children()
        name, args = self._node([0.0] * len(children))
        flag = _KINDS[name]["momentum_flag_arg"]
        return (flag >= 0 and args[flag] != 0) or any(c.cycles_momentum for c in children)

    @property
    def absolute(self) -> bool:
        """Whether the schedule sets the lr itself rather than scaling the group's lr."""
        return False

    # -- host evaluation, same C++ formula as the kernels --------------------------------------

    def values(self, steps: Sequence[int] | torch.Tensor, base_lr: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(lr, momentum) at each of `steps`, float64; momentum is NaN where the schedule does not set it."""
        steps = torch.as_tensor(steps, dtype=torch.int64).reshape(-1)
        if steps.numel() and int(steps.min()) < 0:
            raise ValueError(f"steps must be >= 0, got {int(steps.min())}")
        program = compile_programs([self] * steps.numel())
        plateau = _ops.initial_plateau_state(steps.numel(), torch.device("cpu"),
                                             _ops.schedule_state_width(program, steps.numel()))
        out = _ops.evaluate_schedules(program, [float(base_lr)] * steps.numel(), steps, plateau)
        return out[:, 0], torch.where(out[:, 2] != 0, out[:, 1], math.nan)

    def __call__(self, t: int, base_lr: float = 1.0) -> float:
        """The lr of update `t` (0-based count of completed steps) for a group whose lr is `base_lr`."""
        return float(self.values([t], base_lr)[0][0])

    def momentum(self, t: int) -> float | None:
        """The momentum / beta1 set at update `t`, or None if the schedule does not cycle it."""
        value = float(self.values([t])[1][0])
        return None if math.isnan(value) else value

    # -- state_dict form: plain data only, so torch.load(weights_only=True) reads it -----------

    _SCHEDULE_FIELDS: ClassVar[tuple[str, ...]] = ()  # the arguments that hold schedules

    def spec(self) -> dict:
        args = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Schedule):
                value = value.spec()
            elif isinstance(value, tuple):
                value = [v.spec() if isinstance(v, Schedule) else v for v in value]
            args[f.name] = value
        return {"name": type(self).__name__, "args": args}


def from_spec(spec: dict) -> Schedule:
    """The schedule that `Schedule.spec()` described."""
    if not isinstance(spec, dict) or set(spec) != {"name", "args"}:
        raise ValueError(f"a schedule spec is a dict with keys 'name' and 'args', got {spec!r}")
    cls = _BY_NAME.get(spec["name"])
    if cls is None:
        raise ValueError(f"unknown schedule {spec['name']!r}")
    try:
        args = dict(spec["args"])
        for name in cls._SCHEDULE_FIELDS:
            value = args[name]
            args[name] = [from_spec(s) for s in value] if isinstance(value, (list, tuple)) else from_spec(value)
        return cls(**args)
    except (KeyError, TypeError) as e:
        raise ValueError(f"malformed {spec['name']} spec {spec!r}: {e}") from None


def compile_programs(schedules: Sequence[Schedule | None]) -> list[float]:
    """The `programs` argument of the ops: one root offset per group, then the nodes."""
    program: list[float] = [0.0] * len(schedules)
    roots: dict[Schedule, int] = {}  # equal schedules (values, not objects) share their nodes
    for g, schedule in enumerate(schedules):
        key = _Constant() if schedule is None else schedule
        if key not in roots:
            roots[key] = key._encode(program)
        program[g] = float(roots[key])
    return program


@dataclass(frozen=True)
class _Constant(Schedule):
    """No schedule: the group's lr."""

    def _node(self, children=()):
        return "Constant", []


# ---------------------------------------------------------------------------------------------
# Relative schedules: they scale the group's lr (torch's initial_lr).


@dataclass(frozen=True)
class ConstantLR(Schedule):
    """lr = base_lr * factor while t < total_iters, then base_lr."""

    factor: float = 1.0 / 3
    total_iters: int = 5
    steps_per_epoch: int = 1

    def _validate(self):
        _check_float("factor", self.factor, 0.0, 1.0)
        _check_int("total_iters", self.total_iters, 0)

    def _node(self, children=()):
        return "ConstantLR", [self.factor, self.total_iters]


@dataclass(frozen=True)
class LinearLR(Schedule):
    """lr = base_lr * (start_factor + (end_factor - start_factor) * min(t, total_iters) / total_iters)."""

    start_factor: float = 1.0 / 3
    end_factor: float = 1.0
    total_iters: int = 5
    steps_per_epoch: int = 1

    def _validate(self):
        _check_float("start_factor", self.start_factor, 0.0, 1.0)  # 0: warmup from zero (torch refuses it)
        _check_float("end_factor", self.end_factor, 0.0, 1.0)
        _check_int("total_iters", self.total_iters, 1)

    def _node(self, children=()):
        return "LinearLR", [self.start_factor, self.end_factor, self.total_iters]


@dataclass(frozen=True)
class StepLR(Schedule):
    """lr = base_lr * gamma ** (t // step_size)."""

    step_size: int
    gamma: float = 0.1
    steps_per_epoch: int = 1

    def _validate(self):
        _check_int("step_size", self.step_size, 1)
        _check_float("gamma", self.gamma, 0.0)

    def _node(self, children=()):
        return "StepLR", [self.step_size, self.gamma]


def StepDecay(step_size: int, decay_factor: float = 0.1, steps_per_epoch: int = 1) -> StepLR:
    """StepLR under the name and argument words of step decay: lr = base_lr * decay_factor ** (t // step_size)."""
    return StepLR(step_size=step_size, gamma=decay_factor, steps_per_epoch=steps_per_epoch)


@dataclass(frozen=True)
class MultiStepLR(Schedule):
    """lr = base_lr * gamma ** (number of milestones <= t); a repeated milestone counts twice."""

    milestones: tuple[int, ...]
    gamma: float = 0.1
    steps_per_epoch: int = 1

    def __post_init__(self):
        if isinstance(self.milestones, (str, bytes)) or not isinstance(self.milestones, Sequence):
            raise ValueError(f"milestones must be a sequence of integers, got {self.milestones!r}")
        object.__setattr__(self, "milestones", tuple(self.milestones))
        super().__post_init__()

    def _validate(self):
        for m in self.milestones:
            _check_int("milestones", m, 0)
        _check_float("gamma", self.gamma, 0.0)

    def _node(self, children=()):
        return "MultiStepLR", [self.gamma, len(self.milestones), *self.milestones]


@dataclass(frozen=True)
class ExponentialLR(Schedule):
    """lr = base_lr * gamma ** t."""

    gamma: float
    steps_per_epoch: int = 1

    def _validate(self):
        _check_float("gamma", self.gamma, 0.0)

    def _node(self, children=()):
        return "ExponentialLR", [self.gamma]


@dataclass(frozen=True)
class ExponentialDecay(Schedule):
    """lr = base_lr * exp(-decay_rate * t): ExponentialLR with gamma = exp(-decay_rate)."""

    decay_rate: float
    steps_per_epoch: int = 1

    def _validate(self):
        _check_float("decay_rate", self.decay_rate, 0.0)

    def _node(self, children=()):
        return "ExponentialDecay", [self.decay_rate]


@dataclass(frozen=True)
class CosineAnnealingLR(Schedule):
    """lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * t / T_max)) / 2 for t <= T_max, eta_min after.

    torch's recursive form keeps oscillating past T_max; this one holds eta_min (README, Differences).
    """

    T_max: int
    eta_min: float = 0.0
    steps_per_epoch: int = 1

    _ABSOLUTE_LRS = ("eta_min",)

    def _validate(self):
        _check_int("T_max", self.T_max, 1)
        _check_float("eta_min", self.eta_min, 0.0)

    def _node(self, children=()):
        return "CosineAnnealingLR", [self.T_max, self.eta_min]


CosineAnnealing = CosineAnnealingLR


@dataclass(frozen=True)
class CosineAnnealingWarmRestarts(Schedule):
    """Cosine from base_lr to eta_min over each cycle; cycle i lasts T_0 * T_mult ** i steps."""

    T_0: int
    T_mult: int = 1
    eta_min: float = 0.0
    steps_per_epoch: int = 1

    _ABSOLUTE_LRS = ("eta_min",)

    def _validate(self):
        _check_int("T_0", self.T_0, 1)
        _check_int("T_mult", self.T_mult, 1)
        _check_float("eta_min", self.eta_min, 0.0)

    def _node(self, children=()):
        return "CosineAnnealingWarmRestarts", [self.T_0, self.T_mult, self.eta_min]


@dataclass(frozen=True)
class PolynomialLR(Schedule):
    """lr = base_lr * (1 - min(t, total_iters) / total_iters) ** power."""

    total_iters: int = 5
    power: float = 1.0
    steps_per_epoch: int = 1

    def _validate(self):
        _check_int("total_iters", self.total_iters, 1)
        _check_float("power", self.power, 0.0)

    def _node(self, children=()):
        return "PolynomialLR", [self.total_iters, self.power]


@dataclass(frozen=True)
class InverseSqrt(Schedule):
    """Linear warmup, then inverse square root decay: with n = t + 1,
    lr = base_lr * n / warmup_steps for n < warmup_steps, else base_lr * sqrt(warmup_steps / n).
    (No torch twin.)"""

    warmup_steps: int
    steps_per_epoch: int = 1

    def _validate(self):
        _check_int("warmup_steps", self.warmup_steps, 1)

    def _node(self, children=()):
        return "InverseSqrt", [self.warmup_steps]


@dataclass(frozen=True)
class WarmupStableDecay(Schedule):
    """Warmup, stable, decay ("WSD"). (No torch twin.) The factor on base_lr is
    (t + 1) / warmup_steps for t < W; 1 for W <= t < W + S; then, with p = min(1, (t - W - S) / decay_steps),
    min_lr_ratio + (1 - min_lr_ratio) * shape(p), shape being 1 - p (linear), (1 + cos(pi p)) / 2
    (cosine) or 1 - sqrt(p) (1-sqrt). W = warmup_steps, S = stable_steps."""

    warmup_steps: int
    stable_steps: int
    decay_steps: int
    decay: str = "linear"
    min_lr_ratio: float = 0.0
    steps_per_epoch: int = 1

    _SHAPES = ("linear", "cosine", "1-sqrt")

    def _validate(self):
        _check_int("warmup_steps", self.warmup_steps, 0)
        _check_int("stable_steps", self.stable_steps, 0)
        _check_int("decay_steps", self.decay_steps, 1)
        _check_choice("decay", self.decay, self._SHAPES)
        _check_float("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)

    def _node(self, children=()):
        return "WarmupStableDecay", [self.warmup_steps, self.stable_steps, self.decay_steps, self._SHAPES.index(self.decay),
                      self.min_lr_ratio]


@dataclass(frozen=True)
class Decay(Schedule):
    """A decay from the base lr to a floor over ``decay_steps`` steps, in one of the shapes the
    warmup-decay schedules of HF transformers and torchtitan use. (No torch twin.)

    With p = (t + offset) / decay_steps and shape(p) one of 1 - p ("linear"),
    (1 + cos(2 pi num_cycles p)) / 2 ("cosine"), (1 + cos(pi ((num_cycles p) mod 1))) / 2
    ("cosine_restarts": num_cycles hard restarts), (1 - p) ** power ("polynomial"), 1 - sqrt(p)
    ("1-sqrt"), 1 / sqrt(1 + p) ("inverse_sqrt", decay_steps being the timescale): lr = base_lr * (min_factor + (1 - min_factor) * shape(p)), or with an absolute floor
    ``min_lr``, min_lr + (base_lr - min_lr) * shape(p). From t = decay_steps - offset on the lr is
    the floor (``after="floor"``), or the shape goes on (``after="continue"``, as HF's cosine
    schedules do past their last step; "inverse_sqrt" always goes on).

        >>> Decay(decay_steps=100, shape="cosine", min_factor=0.1)(50, base_lr=1.0)
        0.55
    """

    decay_steps: int
    shape: str = "linear"
    min_factor: float = 0.0
    min_lr: float | None = None
    power: float = 1.0
    num_cycles: float = 0.5
    offset: int = 0
    after: str = "floor"
    steps_per_epoch: int = 1

    _SHAPES = ("linear", "cosine", "cosine_restarts", "polynomial", "1-sqrt", "inverse_sqrt")
    _ABSOLUTE_LRS = ("min_lr",)

    def _validate(self):
        _check_int("decay_steps", self.decay_steps, 1)
        _check_choice("shape", self.shape, self._SHAPES)
        _check_float("min_factor", self.min_factor, 0.0, 1.0)
        if self.min_lr is not None:
            _check_float("min_lr", self.min_lr, 0.0)
            if self.min_factor != 0.0:
                raise ValueError("min_factor and min_lr: give one floor, a factor of the base lr or an lr")
        _check_float("power", self.power, 0.0, low_open=True)
        _check_float("num_cycles", self.num_cycles, 0.0, low_open=True)
        _check_int("offset", self.offset, 0)
        _check_choice("after", self.after, ("floor", "continue"))
        if self.after == "floor" and self.offset >= self.decay_steps:
            raise ValueError(f"offset must be less than decay_steps={self.decay_steps}, got {self.offset}")
        if self.after == "continue" and self.shape not in ("cosine", "inverse_sqrt"):
            raise ValueError(f"after='continue' applies to the 'cosine' and 'inverse_sqrt' shapes (the others "
                             f"end at p = 1), got shape={self.shape!r}")
        if self.shape == "inverse_sqrt" and self.after != "continue":
            raise ValueError("shape='inverse_sqrt' has no end: give after='continue'")
        for name, default in (("power", 1.0), ("num_cycles", 0.5)):
            used = {"power": ("polynomial",), "num_cycles": ("cosine", "cosine_restarts")}[name]
            if getattr(self, name) != default and self.shape not in used:
                raise ValueError(f"{name} applies to the {' and '.join(map(repr, used))} shapes, not {self.shape!r}")

    def _node(self, children=()):
        end = 2.0 ** 53 if self.after == "continue" else self.decay_steps - self.offset
        param = self.power if self.shape == "polynomial" else self.num_cycles
        absolute = self.min_lr is not None
        return "Decay", [self.decay_steps, self.offset, end, self._SHAPES.index(self.shape), param,
                         self.min_lr if absolute else self.min_factor, absolute]


@dataclass(frozen=True)
class Cycles(Schedule):
    """Annealing cycles as timm's CosineLRScheduler, TanhLRScheduler and PolyLRScheduler run them
    (without their warmup: wrap in ``Warmup``; without noise). (No torch twin.)

    Cycle i lasts t_i = t_initial * cycle_mul ** i steps and peaks at base_lr * cycle_decay ** i;
    with t_c the time into it, the lr is lr_min + (peak - lr_min) * shape, shape being
    (1 + cos(pi t_c ** k / t_i ** k)) / 2 ("cosine", k = k_decay),
    (1 - tanh(lb (1 - t_c / t_i) + ub t_c / t_i)) / 2 ("tanh"), or
    (1 - t_c ** k / t_i ** k) ** power ("poly"). After cycle_limit cycles the lr is lr_min.
    """

    t_initial: int
    shape: str = "cosine"
    lr_min: float = 0.0
    cycle_mul: float = 1.0
    cycle_decay: float = 1.0
    cycle_limit: int = 1
    k_decay: float = 1.0
    power: float = 0.5
    lb: float = -7.0
    ub: float = 3.0
    steps_per_epoch: int = 1

    _SHAPES = ("cosine", "tanh", "poly")
    _ABSOLUTE_LRS = ("lr_min",)

    def _validate(self):
        _check_int("t_initial", self.t_initial, 1)
        _check_choice("shape", self.shape, self._SHAPES)
        _check_float("lr_min", self.lr_min, 0.0)
        _check_float("cycle_mul", self.cycle_mul, 1.0)
        _check_float("cycle_decay", self.cycle_decay, 0.0, low_open=True)
        _check_int("cycle_limit", self.cycle_limit, 1)
        _check_float("k_decay", self.k_decay, 0.0, low_open=True)
        _check_float("power", self.power, 0.0, low_open=True)
        _check_float("lb", self.lb)
        _check_float("ub", self.ub)
        used = {"k_decay": ("cosine", "poly"), "power": ("poly",), "lb": ("tanh",), "ub": ("tanh",)}
        defaults = {"k_decay": 1.0, "power": 0.5, "lb": -7.0, "ub": 3.0}
        for name, shapes in used.items():
            if getattr(self, name) != defaults[name] and self.shape not in shapes:
                raise ValueError(f"{name} applies to the {' and '.join(map(repr, shapes))} shapes, not {self.shape!r}")

    def _node(self, children=()):
        return "Cycles", [self.t_initial, self.cycle_mul, self.cycle_decay, self.cycle_limit, self.lr_min,
                          self._SHAPES.index(self.shape), self.k_decay, self.power, self.lb, self.ub]


# ---------------------------------------------------------------------------------------------
# Absolute schedules: they set the lr (and momentum) themselves, as in torch.


@dataclass(frozen=True)
class OneCycleLR(Schedule):
    """The 1cycle policy, phase for phase as torch.optim.lr_scheduler.OneCycleLR.

    initial = max_lr / div_factor, min = initial / final_div_factor. Two phases end at
    pct_start * N - 1 (initial -> max, momentum max -> base) and N - 1 (max -> min, momentum base -> max);
    three phases at pct_start * N - 1, 2 * pct_start * N - 2 and N - 1 (initial -> max, max -> initial,
    initial -> min; momentum max -> base -> max, then held). N = total_steps, or epochs * steps_per_epoch
    as in torch (here steps_per_epoch only sizes the run: OneCycleLR always counts optimizer steps).
    Past N - 1 the final value holds, where torch raises.
    """

    max_lr: float
    total_steps: int | None = None
    epochs: int | None = None
    steps_per_epoch: int | None = None
    pct_start: float = 0.3
    anneal_strategy: str = "cos"
    cycle_momentum: bool = True
    base_momentum: float = 0.85
    max_momentum: float = 0.95
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    three_phase: bool = False

    _ABSOLUTE_LRS = ("max_lr",)

    def _validate(self):
        if self.total_steps is not None:
            _check_int("total_steps", self.total_steps, 1)
        elif self.epochs is None or self.steps_per_epoch is None:
            raise ValueError("total_steps, or both epochs and steps_per_epoch, must be given")
        else:
            _check_int("epochs", self.epochs, 1)
            _check_int("steps_per_epoch", self.steps_per_epoch, 1)
        _check_float("max_lr", self.max_lr, 0.0)
        _check_float("pct_start", self.pct_start, 0.0, 1.0)
        _check_choice("anneal_strategy", self.anneal_strategy, ("cos", "linear"))
        _check_float("div_factor", self.div_factor, 0.0, low_open=True)
        _check_float("final_div_factor", self.final_div_factor, 0.0, low_open=True)
        _check_float("base_momentum", self.base_momentum, 0.0, 1.0)
        _check_float("max_momentum", self.max_momentum, 0.0, 1.0)
        start = 0.0
        for end, *_ in self._phases():
            if not end > start:
                raise ValueError(
                    f"pct_start={self.pct_start} with total_steps={self.n_steps} leaves a phase without steps; "
                    "give more steps or a pct_start further from 0 and 1")
            start = end

    @property
    def n_steps(self) -> int:
        return self.total_steps if self.total_steps is not None else self.epochs * self.steps_per_epoch

    def _phases(self) -> list[tuple[float, float, float, float, float]]:
        n, pct = self.n_steps, self.pct_start
        initial = self.max_lr / self.div_factor
        minimum = initial / self.final_div_factor
        low, high = self.base_momentum, self.max_momentum
        if self.three_phase:
            return [(float(pct * n) - 1, initial, self.max_lr, high, low),
                    (float(2 * pct * n) - 2, self.max_lr, initial, low, high),
                    (n - 1.0, initial, minimum, high, high)]
        return [(float(pct * n) - 1, initial, self.max_lr, high, low),
                (n - 1.0, self.max_lr, minimum, low, high)]

    def _time_divisor(self) -> int:
        return 1

    def _node(self, children=()):
        phases = self._phases()
        args = [self.n_steps, self.anneal_strategy == "linear", self.cycle_momentum, len(phases)]
        for phase in phases:
            args.extend(phase)
        return "OneCycleLR", args

    @property
    def absolute(self) -> bool:
        return True


@dataclass(frozen=True)
class CyclicLR(Schedule):
    """Cyclical learning rate, as torch.optim.lr_scheduler.CyclicLR with its built-in policies.

    With L = up + down, r = up / L, c = floor(1 + t / L), x = 1 + t / L - c,
    s = x / r if x <= r else (x - 1) / (r - 1): lr = base_lr + (max_lr - base_lr) * s * g and
    momentum = max_momentum - (max_momentum - base_momentum) * s * g, where g is 1 (triangular),
    1 / 2 ** (c - 1) (triangular2) or gamma ** t (exp_range). A Python scale_fn cannot run on the
    device and is refused. scale_mode defaults to the mode's own ('cycle', or 'iterations' for
    exp_range); given explicitly, it applies (torch ignores it without a scale_fn).
    """

    base_lr: float
    max_lr: float
    step_size_up: int = 2000
    step_size_down: int | None = None
    mode: str = "triangular"
    gamma: float = 1.0
    scale_fn: Any = None
    scale_mode: str | None = None
    cycle_momentum: bool = True
    base_momentum: float = 0.8
    max_momentum: float = 0.9
    steps_per_epoch: int = 1

    _MODES = ("triangular", "triangular2", "exp_range")

    _ABSOLUTE_LRS = ("base_lr", "max_lr")

    def _validate(self):
        if self.scale_fn is not None:
            raise ValueError("scale_fn: a Python function cannot run inside the device kernel; use mode="
                             "'triangular', 'triangular2' or 'exp_range' (with gamma), or a torch scheduler")
        _check_float("base_lr", self.base_lr, 0.0)
        _check_float("max_lr", self.max_lr, 0.0)
        _check_int("step_size_up", self.step_size_up, 1)
        if self.step_size_down is not None:
            _check_int("step_size_down", self.step_size_down, 0)
        _check_choice("mode", self.mode, self._MODES)
        _check_float("gamma", self.gamma, 0.0)
        if self.scale_mode is not None:
            _check_choice("scale_mode", self.scale_mode, ("cycle", "iterations"))
        _check_float("base_momentum", self.base_momentum, 0.0, 1.0)
        _check_float("max_momentum", self.max_momentum, 0.0, 1.0)

    def _node(self, children=()):
        up = float(self.step_size_up)
        down = float(self.step_size_down) if self.step_size_down is not None else up
        scale_mode = self.scale_mode or ("iterations" if self.mode == "exp_range" else "cycle")
        return "CyclicLR", [self.base_lr, self.max_lr, up + down, up / (up + down), self._MODES.index(self.mode),
                         scale_mode == "cycle", self.gamma, self.cycle_momentum, self.base_momentum,
                         self.max_momentum]

    @property
    def absolute(self) -> bool:
        return True


@dataclass(frozen=True)
class ReduceLROnPlateau(Schedule):
    """Reduce the lr when a metric stops improving: torch.optim.lr_scheduler.ReduceLROnPlateau with
    its state (best, bad count, cooldown, current lr) on the device, driven by ``opt.observe(metric)``
    with a device tensor, without a host sync. ``sched(t)`` on the host is the lr before any reduction.
    """

    mode: str = "min"
    factor: float = 0.1
    patience: int = 10
    threshold: float = 1e-4
    threshold_mode: str = "rel"
    cooldown: int = 0
    min_lr: float = 0.0
    eps: float = 1e-8

    _ABSOLUTE_LRS = ("min_lr", "eps")
    observes_metric = True

    def _validate(self):
        _check_choice("mode", self.mode, ("min", "max"))
        _check_float("factor", self.factor, 0.0, 1.0, high_open=True)
        _check_int("patience", self.patience, 0)
        _check_float("threshold", self.threshold, 0.0)
        _check_choice("threshold_mode", self.threshold_mode, ("rel", "abs"))
        _check_int("cooldown", self.cooldown, 0)
        _check_float("min_lr", self.min_lr, 0.0)
        _check_float("eps", self.eps, 0.0)

    def _node(self, children=()):
        return "ReduceLROnPlateau", [self.mode == "max", self.factor, self.patience, self.threshold,
                          self.threshold_mode == "abs", self.cooldown, self.min_lr, self.eps]


_MAX_WINDOW = _C.max_greedy_window  # GreedyLR's smoothing window: its values live in the schedule state


@dataclass(frozen=True)
class GreedyLR(Schedule):
    """HF transformers' GreedyLR (``get_scheduler("greedy")``), with its state on the device and
    driven by ``opt.observe(metric)``: the lr falls by ``factor`` after more than ``patience``
    observations without improvement (then ``cooldown`` observations pass unjudged) and rises by
    ``1 / factor`` after more than ``patience`` improvements in a row (then ``warmup`` pass), within
    ``[min_lr, max_lr]``; with ``smooth`` each metric is first averaged over the last
    ``window_size`` observed. After ``reset_start`` reductions with every GreedyLR group at its
    ``min_lr``, the schedule starts afresh from the base lr. Exact to HF's lrs observation by
    observation; as one HF GreedyLR drives all of an optimizer's groups, the reset waits for every
    group with a GreedyLR schedule. ``sched(t)`` on the host is the lr before any observation.
    """

    mode: str = "min"
    factor: float = 0.95
    patience: int = 10
    threshold: float = 1e-6
    threshold_mode: str = "abs"
    cooldown: int = 0
    warmup: int = 0
    min_lr: float = 1e-3
    max_lr: float = 1.0
    eps: float = 1e-8
    smooth: bool = False
    window_size: int = 50
    reset_start: int = 500

    _ABSOLUTE_LRS = ("min_lr", "max_lr", "eps")
    observes_metric = True

    def _validate(self):
        _check_choice("mode", self.mode, ("min", "max"))
        _check_float("factor", self.factor, 0.0, 1.0, low_open=True, high_open=True)
        _check_int("patience", self.patience, 0)
        _check_float("threshold", self.threshold)  # as HF: any number
        _check_choice("threshold_mode", self.threshold_mode, ("rel", "abs"))
        _check_int("cooldown", self.cooldown, 0)
        _check_int("warmup", self.warmup, 0)
        _check_float("min_lr", self.min_lr, 0.0)
        if not (isinstance(self.max_lr, float) and self.max_lr == math.inf):  # inf: no cap
            _check_float("max_lr", self.max_lr, 0.0)  # below min_lr too, as HF takes it
        _check_float("eps", self.eps, 0.0)
        if not isinstance(self.smooth, bool):
            raise ValueError(f"smooth must be True or False, got {self.smooth!r}")
        if isinstance(self.window_size, bool) or not isinstance(self.window_size, numbers.Integral) or not (
                1 <= self.window_size <= _MAX_WINDOW):
            raise ValueError(f"window_size must be an integer in [1, {_MAX_WINDOW}], got {self.window_size!r}")
        _check_int("reset_start", self.reset_start, 0)

    def _node(self, children=()):
        return "GreedyLR", [self.mode == "max", self.factor, self.patience, self.threshold,
                            self.threshold_mode == "abs", self.cooldown, self.warmup, self.min_lr, self.max_lr,
                            self.eps, self.smooth, self.window_size, self.reset_start]


# ---------------------------------------------------------------------------------------------
# Composition


@dataclass(frozen=True)
class SequentialLR(Schedule):
    """schedulers[i] runs from milestones[i-1] on, seeing time t - milestones[i-1] (torch's SequentialLR).

    Warmup then cosine, the most common schedule in LLM training:
    ``SequentialLR([LinearLR(start_factor=0.01, total_iters=500), CosineAnnealingLR(T_max=9_500)], milestones=[500])``.
    """

    schedulers: tuple[Schedule, ...]
    milestones: tuple[int, ...]
    steps_per_epoch: int = 1

    def __post_init__(self):
        for name in ("schedulers", "milestones"):
            object.__setattr__(self, name, _schedule_tuple(name, getattr(self, name)))
        super().__post_init__()

    def _validate(self):
        _check_schedules(self.schedulers)
        for i, s in enumerate(self.schedulers):
            if s.observes_metric:
                raise ValueError(f"schedulers[{i}]: {type(s).__name__} cannot be part of a SequentialLR "
                                 "(as in torch); give it its own param group")
        if len(self.milestones) != len(self.schedulers) - 1:
            raise ValueError(f"milestones must hold len(schedulers) - 1 = {len(self.schedulers) - 1} entries, "
                             f"got {len(self.milestones)}")
        for m in self.milestones:
            _check_int("milestones", m, 1)
        if any(b <= a for a, b in zip(self.milestones, self.milestones[1:])):
            raise ValueError(f"milestones must be strictly increasing, got {list(self.milestones)}")
        if self._depth() > _MAX_DEPTH:
            raise ValueError(f"schedulers: SequentialLR nests deeper than {_MAX_DEPTH} levels")

    def scaled(self, factor: float) -> Schedule:
        if factor == 1.0:
            return self
        return dataclasses.replace(self, schedulers=tuple(s.scaled(factor) for s in self.schedulers))

    _SCHEDULE_FIELDS = ("schedulers",)

    def _children(self):
        return self.schedulers

    def _node(self, children=()):
        return "SequentialLR", [len(self.schedulers), *self.milestones, *children]

    @property
    def absolute(self) -> bool:
        return all(s.absolute for s in self.schedulers)


@dataclass(frozen=True)
class Warmup(Schedule):
    """A warmup ramp over the first ``warmup_steps`` steps, then ``schedule``. (No torch twin.)

    The ramp climbs from a start to the base lr: with p = (t + offset) / span (span defaults to
    warmup_steps) and shape(p) one of p ("linear"), (1 - cos(pi p)) / 2 ("cosine"),
    1 - sqrt(1 - p) ("1-sqrt"), the lr is base_lr * (start_factor + (1 - start_factor) * shape(p)),
    or from an absolute ``start_lr``, start_lr + (base_lr - start_lr) * shape(p). With
    ``target="schedule"`` the ramp climbs to the lr ``schedule`` gives where the ramp ends instead
    of the base lr (timm's tanh schedule warms up so). From t =
    warmup_steps on, ``schedule`` runs, seeing t - warmup_steps (``prefix=True``, as SequentialLR
    and timm's warmup_prefix=True) or t itself (``prefix=False``, timm's default).

    HF's warmups are ``Warmup(s, W)``; timm's ``Warmup(s, warmup_t, start_lr=warmup_lr_init,
    prefix=warmup_prefix)``; torchtitan's ``Warmup(s, W, offset=1, span=W + 1)``.
    """

    schedule: Schedule
    warmup_steps: int
    start_factor: float = 0.0
    start_lr: float | None = None
    shape: str = "linear"
    prefix: bool = True
    offset: int = 0
    span: int | None = None
    target: str = "base"
    steps_per_epoch: int = 1

    _SHAPES = ("linear", "cosine", "1-sqrt")
    _ABSOLUTE_LRS = ("start_lr",)
    _SCHEDULE_FIELDS = ("schedule",)

    def _validate(self):
        if not isinstance(self.schedule, Schedule):
            raise ValueError(f"schedule must be a fusedlr schedule, got {type(self.schedule).__name__}")
        if self.schedule.observes_metric:
            raise ValueError(f"schedule: a {type(self.schedule).__name__} cannot follow a warmup (its state is "
                             "the group's); warm up with a schedule of its own param group")
        _check_int("warmup_steps", self.warmup_steps, 1)
        _check_float("start_factor", self.start_factor, 0.0, 1.0)
        if self.start_lr is not None:
            _check_float("start_lr", self.start_lr, 0.0)
            if self.start_factor != 0.0:
                raise ValueError("start_factor and start_lr: give one start, a factor of the base lr or an lr")
        _check_choice("shape", self.shape, self._SHAPES)
        if not isinstance(self.prefix, bool):
            raise ValueError(f"prefix must be True or False, got {self.prefix!r}")
        _check_int("offset", self.offset, 0)
        if self.span is not None:
            _check_int("span", self.span, 1)
        if (self.warmup_steps - 1 + self.offset) / self._span() > 1:
            raise ValueError(f"the ramp passes its end: (warmup_steps - 1 + offset) / span = "
                             f"{(self.warmup_steps - 1 + self.offset) / self._span()} > 1")
        _check_choice("target", self.target, ("base", "schedule"))
        if self.target == "schedule" and _has_schedule_target(self.schedule):
            raise ValueError("target='schedule': the schedule after this warmup holds another warmup with "
                             "target='schedule' or a Product, which the kernels do not evaluate there")
        if self._depth() > _MAX_DEPTH:
            raise ValueError(f"schedule: nests deeper than {_MAX_DEPTH} levels")

    def _span(self) -> int:
        return self.warmup_steps if self.span is None else self.span

    def _children(self):
        return (self.schedule,)

    def _node(self, children=(0.0,)):
        absolute = self.start_lr is not None
        return "Warmup", [children[0], self.warmup_steps, self.offset, self._span(),
                          self.start_lr if absolute else self.start_factor, absolute,
                          self._SHAPES.index(self.shape), self.prefix, self.target == "schedule"]

    def scaled(self, factor: float) -> Schedule:
        if factor == 1.0:
            return self
        start = None if self.start_lr is None else self.start_lr * factor
        return dataclasses.replace(self, schedule=self.schedule.scaled(factor), start_lr=start)


@dataclass(frozen=True)
class Product(Schedule):
    """base_lr times the product of each schedule's factor (its lr for a base lr of 1): torch's
    ChainedScheduler of its chainable schedulers, which multiply the lr in turn. Each schedule must
    scale with the base lr (no absolute lr, momentum or plateau state; no product inside).

        >>> Product([ConstantLR(factor=0.5, total_iters=3), ExponentialLR(gamma=0.9)])(1, base_lr=1.0)
        0.45
    """

    schedulers: tuple[Schedule, ...]
    steps_per_epoch: int = 1

    _SCHEDULE_FIELDS = ("schedulers",)

    def __post_init__(self):
        object.__setattr__(self, "schedulers", _schedule_tuple("schedulers", self.schedulers))
        super().__post_init__()

    def _validate(self):
        _check_schedules(self.schedulers)
        for i, s in enumerate(self.schedulers):
            if not _scales_with_base(s):
                raise ValueError(f"schedulers[{i}]: {type(s).__name__} does not scale with the base lr (an "
                                 "absolute lr, a cycled momentum, plateau state or a product inside), so it "
                                 "has no factor to multiply")
        if self._depth() > _MAX_DEPTH:
            raise ValueError(f"schedulers: nests deeper than {_MAX_DEPTH} levels")

    def _children(self):
        return self.schedulers

    def _node(self, children=()):
        return "Product", [len(self.schedulers), *(children or [0.0] * len(self.schedulers))]

    def scaled(self, factor: float) -> Schedule:
        return self  # every factor is relative


def _scales_with_base(schedule: Schedule) -> bool:
    """Whether schedule(t, b) = b * schedule(t, 1) for every b: what a product multiplies."""
    if isinstance(schedule, Product) or schedule.observes_metric or schedule.absolute or schedule.cycles_momentum:
        return False
    if isinstance(schedule, Warmup) and schedule.target == "schedule":
        return False
    if any(getattr(schedule, name) not in (None, 0, 0.0) for name in schedule._ABSOLUTE_LRS):
        return False
    return all(_scales_with_base(c) for c in schedule._children())


def _has_schedule_target(schedule: Schedule) -> bool:
    return (isinstance(schedule, (Warmup, Product)) and getattr(schedule, "target", "schedule") == "schedule") or any(
        _has_schedule_target(c) for c in schedule._children())


_BY_NAME = {cls.__name__: cls for cls in (
    ConstantLR, LinearLR, StepLR, MultiStepLR, ExponentialLR, ExponentialDecay, CosineAnnealingLR,
    CosineAnnealingWarmRestarts, PolynomialLR, InverseSqrt, WarmupStableDecay, OneCycleLR, CyclicLR,
    ReduceLROnPlateau, GreedyLR, SequentialLR, Warmup, Decay, Cycles, Product)}


def torch_scheduler(schedule: Schedule, optimizer: torch.optim.Optimizer, last_epoch: int = -1):
    """The torch.optim.lr_scheduler object that steps `optimizer` through the same lrs as `schedule`
    (stepped once per schedule time unit), for comparisons. InverseSqrt and WarmupStableDecay, which
    torch lacks, become a LambdaLR over this schedule's own host formula. ``last_epoch=k - 1``
    resumes after k steps on an optimizer that loaded a fusedlr state_dict (not for SequentialLR,
    whose torch form does not resume)."""
    from torch.optim import lr_scheduler as L

    args = {k: v for k, v in schedule.spec()["args"].items() if k != "steps_per_epoch"}
    if isinstance(schedule, SequentialLR):
        if last_epoch != -1:
            raise ValueError("last_epoch: torch's SequentialLR does not resume from a step count")
        return L.SequentialLR(optimizer, [torch_scheduler(s, optimizer) for s in schedule.schedulers],
                              milestones=list(schedule.milestones))
    if isinstance(schedule, ExponentialDecay):
        return L.ExponentialLR(optimizer, gamma=math.exp(-schedule.decay_rate), last_epoch=last_epoch)
    if isinstance(schedule, Product):
        return L.ChainedScheduler([torch_scheduler(s, optimizer, last_epoch) for s in schedule.schedulers],
                                  optimizer=optimizer)
    if isinstance(schedule, (InverseSqrt, WarmupStableDecay, Warmup, Decay, Cycles)):
        # no torch twin: the host formula, per group (the absolute lrs some take are not factors)
        bases = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        return L.LambdaLR(optimizer, [lambda t, b=b: schedule(t, b) / b if b else 0.0 for b in bases],
                          last_epoch=last_epoch)
    if isinstance(schedule, OneCycleLR):
        args = {k: v for k, v in schedule.spec()["args"].items() if v is not None}
    if isinstance(schedule, CyclicLR):
        args.pop("scale_mode")
    if isinstance(schedule, ReduceLROnPlateau):
        return L.ReduceLROnPlateau(optimizer, **args)
    if isinstance(schedule, GreedyLR):
        try:
            from transformers.optimization import GreedyLR as HFGreedyLR
        except ImportError:
            raise ValueError("torch_scheduler: GreedyLR's twin is HF transformers' GreedyLR; install "
                             "transformers") from None
        return HFGreedyLR(optimizer, **args)
    return getattr(L, type(schedule).__name__)(optimizer, **args, last_epoch=last_epoch)


def from_hf(name: str, num_warmup_steps: int = 0, num_training_steps: int | None = None, *,
            base_lr: float | None = None, **scheduler_specific_kwargs) -> Schedule:
    """The schedule of HF transformers' ``get_scheduler(name, optimizer, num_warmup_steps,
    num_training_steps, scheduler_specific_kwargs=...)``, step for step, for every name ("greedy"
    and "reduce_lr_on_plateau" observation by observation, fed by ``opt.observe(metric)``; their
    min_lr and max_lr are one lr for every group here, a schedule per group for lists). HF's floors and ends given as lrs ("polynomial"'s
    ``lr_end``, "cosine_with_min_lr"'s ``min_lr``) are fractions of the optimizer's default lr in HF:
    give that lr as ``base_lr`` for every group to follow HF exactly (without it, "cosine_with_min_lr"
    floors at ``min_lr`` itself, and "polynomial" needs it unless ``lr_end`` is 0)."""
    kwargs = dict(scheduler_specific_kwargs)
    name = getattr(name, "value", name)  # a transformers.SchedulerType
    _check_int("num_warmup_steps", num_warmup_steps, 0)
    warmup = num_warmup_steps

    def training_steps() -> int:
        if num_training_steps is None:
            raise ValueError(f"{name!r} needs num_training_steps")
        _check_int("num_training_steps", num_training_steps, warmup + 1)
        return num_training_steps

    def after_warmup(schedule: Schedule, **ramp) -> Schedule:
        return schedule if warmup == 0 else Warmup(schedule, warmup, **ramp)

    def no_more(*allowed: str) -> None:
        extra = set(kwargs) - set(allowed)
        if extra:
            raise ValueError(f"{name!r}: unsupported scheduler_specific_kwargs {sorted(extra)}")

    def lr_fraction(key: str, value: float) -> float:
        if base_lr is None:
            raise ValueError(f"{name!r}: {key}={value!r} is an lr, a fraction of the optimizer's default lr in HF; "
                             "give that lr as base_lr=")
        _check_float("base_lr", base_lr, 0.0, low_open=True)
        return value / base_lr

    constant = ConstantLR(factor=1.0, total_iters=0)
    if name == "constant":
        no_more()
        return constant
    if name == "constant_with_warmup":
        no_more()
        return after_warmup(constant)
    if name == "linear":
        no_more()
        return after_warmup(Decay(training_steps() - warmup))
    if name == "cosine":
        no_more("num_cycles")
        decay = training_steps() - warmup
        return after_warmup(Decay(decay, "cosine", num_cycles=kwargs.get("num_cycles", 0.5), after="continue"))
    if name == "cosine_with_restarts":
        no_more("num_cycles")
        cycles = kwargs.get("num_cycles", 1)
        return after_warmup(Decay(training_steps() - warmup, "cosine_restarts", num_cycles=cycles))
    if name == "polynomial":
        no_more("lr_end", "power")
        lr_end, power = kwargs.get("lr_end", 1e-7), kwargs.get("power", 1.0)
        if base_lr is not None and not lr_end < base_lr:
            raise ValueError(f"'polynomial': lr_end ({lr_end}) must be smaller than the initial lr ({base_lr})")
        floor = 0.0 if lr_end == 0 else lr_fraction("lr_end", lr_end)
        decay = training_steps() - warmup
        # HF holds lr_end from the step after num_training_steps; at that step (1 - p) ** power is 0
        return after_warmup(Decay(decay, "polynomial", min_factor=floor, power=power))
    if name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
        allowed = ("num_cycles", "min_lr", "min_lr_rate") + (("warmup_lr_rate",) if "warmup" in name else ())
        no_more(*allowed)
        if ("min_lr" in kwargs) == ("min_lr_rate" in kwargs):
            raise ValueError(f"{name!r} takes one of min_lr and min_lr_rate")
        floor = {"min_factor": kwargs["min_lr_rate"]} if "min_lr_rate" in kwargs else (
            {"min_factor": lr_fraction("min_lr", kwargs["min_lr"])} if base_lr is not None else {"min_lr": kwargs["min_lr"]})
        cycles = kwargs.get("num_cycles", 0.5)
        total = training_steps()
        if name == "cosine_with_min_lr":
            return after_warmup(Decay(total - warmup, "cosine", num_cycles=cycles, after="continue", **floor))
        # progress counts from one step earlier, and the warmup ramps to (t + 1) / W, or from warmup_lr_rate
        decay = Decay(max(1, total - warmup), "cosine", num_cycles=cycles, after="continue", offset=1, **floor)
        rate = kwargs.get("warmup_lr_rate")
        if rate is None:
            return after_warmup(decay, offset=1)
        _check_float("warmup_lr_rate", rate, 0.0, 1.0)
        return after_warmup(decay, start_factor=rate, span=max(1, warmup - 1))
    if name == "inverse_sqrt":
        no_more("timescale")
        timescale = kwargs.get("timescale")
        if timescale is None:
            timescale = warmup or 10_000
        _check_int("timescale", timescale, 1)
        # HF: 1 / sqrt((t - W + timescale) / timescale) from t = W on
        return after_warmup(Decay(timescale, "inverse_sqrt", after="continue"))
    if name == "warmup_stable_decay":
        no_more("num_decay_steps", "num_stable_steps", "warmup_type", "decay_type", "min_lr_ratio", "num_cycles")
        if "num_decay_steps" not in kwargs:
            raise ValueError("'warmup_stable_decay' needs num_decay_steps")
        decay_steps = kwargs["num_decay_steps"]
        _check_int("num_decay_steps", decay_steps, 1)
        stable_steps = kwargs.get("num_stable_steps")
        if stable_steps is None:  # what the other phases leave of the run
            stable_steps = training_steps() - warmup - decay_steps
            if stable_steps < 0:
                raise ValueError(f"'warmup_stable_decay': num_warmup_steps ({warmup}) and num_decay_steps "
                                 f"({decay_steps}) exceed num_training_steps ({training_steps()}); pass fewer, "
                                 "or num_stable_steps")
        _check_int("num_stable_steps", stable_steps, 0)
        ratio = kwargs.get("min_lr_ratio", 0.0)
        warmup_type, decay_type = kwargs.get("warmup_type", "linear"), kwargs.get("decay_type", "cosine")
        _check_choice("warmup_type", warmup_type, Warmup._SHAPES)
        _check_choice("decay_type", decay_type, ("linear", "cosine", "1-sqrt"))
        cycles = {"num_cycles": kwargs.get("num_cycles", 0.5)} if decay_type == "cosine" else {}
        schedule = Decay(decay_steps, decay_type, min_factor=ratio, **cycles)
        if stable_steps:
            schedule = SequentialLR([constant, schedule], milestones=[stable_steps])
        return after_warmup(schedule, start_factor=ratio, shape=warmup_type)
    if name in ("reduce_lr_on_plateau", "greedy"):
        cls = ReduceLROnPlateau if name == "reduce_lr_on_plateau" else GreedyLR
        no_more(*(f.name for f in dataclasses.fields(cls)), "verbose")
        if kwargs.pop("verbose", False):
            raise ValueError(f"{name!r}: verbose=True prints from the host on every change, which an on-device "
                             "schedule never sees; read opt.last_lr() instead")
        for key in ("min_lr", "max_lr"):
            if isinstance(kwargs.get(key), (list, tuple)):
                raise ValueError(f"{name!r}: {key} is one lr here; give each param group a schedule of its own "
                                 f"for a list of them")
        return cls(**kwargs)
    raise ValueError(f"from_hf: unknown scheduler name {name!r}")


def from_timm(scheduler, updates_per_epoch: int | None = None) -> Schedule:
    """The schedule of a timm ``CosineLRScheduler``, ``TanhLRScheduler`` or ``PolyLRScheduler``,
    warmup included (``warmup_t``, ``warmup_lr_init``, ``warmup_prefix`` both ways). timm steps one
    stepped per epoch (``t_in_epochs=True``, its default) with ``step(epoch)``: give the optimizer
    steps per epoch as ``updates_per_epoch``. Exact to the lr timm sets at every update, the first
    included (the base lr, where timm has no warmup). Noise (``noise_range_t``) is random on the host and
    raises, as do timm's other schedulers."""
    kind = type(scheduler).__name__
    shapes = {"CosineLRScheduler": "cosine", "TanhLRScheduler": "tanh", "PolyLRScheduler": "poly"}
    if kind not in shapes or not type(scheduler).__module__.startswith("timm."):
        raise ValueError(f"from_timm: {kind} cannot be expressed (timm's CosineLRScheduler, TanhLRScheduler "
                         "and PolyLRScheduler can)")
    if getattr(scheduler, "noise_range_t", None) is not None:
        raise ValueError("from_timm: noise_range_t adds random noise on the host, which no on-device schedule "
                         "reproduces; drop the noise")
    if scheduler.t_in_epochs:
        if updates_per_epoch is None:
            raise ValueError("from_timm: the scheduler steps once per epoch (t_in_epochs=True); give "
                             "updates_per_epoch, the optimizer steps in one epoch")
        _check_int("updates_per_epoch", updates_per_epoch, 1)
    per_epoch = updates_per_epoch if scheduler.t_in_epochs else 1
    shape = shapes[kind]
    extra = {"k_decay": scheduler.k_decay} if shape != "tanh" else {"lb": scheduler.lb, "ub": scheduler.ub}
    if shape == "poly":
        extra["power"] = scheduler.power
    cycles = Cycles(t_initial=scheduler.t_initial, shape=shape, lr_min=scheduler.lr_min,
                    cycle_mul=scheduler.cycle_mul, cycle_decay=scheduler.cycle_decay,
                    cycle_limit=scheduler.cycle_limit, **extra)
    if not scheduler.warmup_t:
        # timm sets the base lr when it is made and the schedule's from its first step() on: its
        # first update runs at the base lr, whatever the shape gives at 0 (tanh's is below it)
        return Warmup(cycles, 1, start_factor=1.0, prefix=False, steps_per_epoch=per_epoch)
    # timm's tanh schedule without warmup_prefix ramps to its own lr at warmup_t, the others to the base lr
    target = "schedule" if shape == "tanh" and not scheduler.warmup_prefix else "base"
    return Warmup(cycles, scheduler.warmup_t, start_lr=scheduler.warmup_lr_init, prefix=bool(scheduler.warmup_prefix),
                  target=target, steps_per_epoch=per_epoch)


def from_torchtitan(warmup_steps: int, training_steps: int, decay_ratio: float | None = None,
                    decay_type: str = "linear", min_lr_factor: float = 0.0) -> Schedule:
    """torchtitan's ``[lr_scheduler]`` schedule: a linear warmup to the base lr in (t + 1) /
    (warmup_steps + 1), stable, then a decay over round(training_steps * decay_ratio) steps (all the
    steps after warmup when decay_ratio is None) of type "linear", "sqrt" (1 - sqrt) or "cosine",
    to min_lr_factor times the base lr, with progress (t + 1 - start) / (decay steps + 1)."""
    _check_int("warmup_steps", warmup_steps, 0)
    _check_int("training_steps", training_steps, 1)
    _check_choice("decay_type", decay_type, ("linear", "sqrt", "cosine"))
    _check_float("min_lr_factor", min_lr_factor, 0.0, 1.0)
    if decay_ratio is None:
        decay_steps = training_steps - warmup_steps
    else:
        _check_float("decay_ratio", decay_ratio, 0.0, 1.0)
        decay_steps = round(training_steps * decay_ratio)
    stable_steps = training_steps - warmup_steps - decay_steps
    if decay_steps < 0 or stable_steps < 0:
        raise ValueError(f"warmup_steps ({warmup_steps}) and the decay's {decay_steps} steps exceed "
                         f"training_steps ({training_steps})")
    schedule: Schedule = ConstantLR(factor=1.0, total_iters=0)
    if decay_steps > 0:
        shape = {"sqrt": "1-sqrt"}.get(decay_type, decay_type)
        # from the decay's last step on, torchtitan holds its progress at 1: the floor
        decay = Decay(decay_steps + 1, shape, min_factor=min_lr_factor, offset=1)
        schedule = decay if stable_steps == 0 else SequentialLR([schedule, decay], milestones=[stable_steps])
    if warmup_steps == 0:
        return schedule
    return Warmup(schedule, warmup_steps, offset=1, span=warmup_steps + 1)
