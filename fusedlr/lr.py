"""torch's lr convention for fusedlr's optimizers, and the scheduler that framework slots take.

[note: the lr convention]
Frameworks read ``param_groups[i]["lr"]`` as the lr in use and hand schedulers the group's
``initial_lr``. A fusedlr group with a schedule follows that:

- ``group["lr"]`` is the lr the group's next step uses: a 0-dim float64 view into the optimizer's
  ``group_lrs`` vector, on the parameters' device, which every step rewrites on the device
  (csrc/python_plan.cpp, [note: next lrs]). float64, the dtype the schedule is evaluated in, so
  that the value read is exactly the lr the kernel used, and a torch scheduler reading it
  computes in float64 as it does from a float. Reading it as a float is the reader's host sync.
- ``group["initial_lr"]`` is the base lr the schedule scales (a float; writing it changes the
  base, as torch's schedulers read it). A timm ``lr_scale`` key scales the group's schedule.
- Anyone else's write to a scheduled group's lr (a torch LRScheduler's ``fill_``, a framework's
  ``group["lr"] = ...``) would schedule the group twice. The next ``step()`` raises instead,
  before it changes anything, unless the value written is the one the schedule gives anyway. The
  check costs nothing on the step: a write is seen by the vector's version counter (the
  optimizer's own writes do not bump it) or by the group holding another object.
- A group without a schedule is torch's: its ``lr`` is whatever was set (a float), read at each
  step; a new value reaches the step without rebuilding the step's lists.
"""

from __future__ import annotations

import numbers
import warnings

import torch
from torch import Tensor
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

__all__ = ["LRConflictError", "OnDeviceScheduler", "OnDeviceMetricScheduler"]


class LRConflictError(RuntimeError):
    """A scheduled group's lr was written from outside: it would have been scheduled twice."""


def lr_scale(group: dict) -> float:
    """A scheduled group's lr_scale (timm's layer decay: the group runs at that multiple of its
    schedule, as timm's schedulers run it), 1.0 for a group without a schedule or the key. The
    key's value is checked either way."""
    scale = group.get("lr_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 0 or scale == float("inf"):
        raise ValueError(f"lr_scale must be a finite number >= 0, got {scale!r}")
    return 1.0 if group["schedule"] is None else float(scale)


def base_lr(group: dict) -> float:
    """The lr a group's schedule scales: its initial_lr times its lr_scale when it has a schedule,
    else its lr."""
    if group["schedule"] is None:
        return float(group["lr"])
    base = float(group.get("initial_lr", group["lr"]))
    if not 0 <= base < float("inf"):  # NaN too
        raise ValueError(f"initial_lr must be a finite number >= 0, got {group.get('initial_lr')!r}")
    return base * lr_scale(group)


def is_own_lr(opt, g: int, value) -> bool:
    """Whether `value` is the view of group g's next lr that the optimizer put into the group."""
    return value is opt._lr_views[g]


_ADVICE = ("fusedlr evaluates this group's schedule on the device at every step, and a second scheduler on top "
           "would schedule it twice. Give a framework's scheduler slot opt.as_lr_scheduler() (HF Trainer: "
           "optimizers=(opt, opt.as_lr_scheduler()), or under FSDP return it from Trainer.create_scheduler; Lightning: "
           "return it from configure_optimizers), drop the "
           "torch LRScheduler (fusedlr.from_torch converts one), change the base lr through group['initial_lr'], "
           "or set group['schedule'] = None to set the lr yourself")


def _is_number(value, number: float) -> bool:
    """Whether `value` (a group's lr) is a real number or one-element real tensor equal to `number`."""
    if isinstance(value, Tensor):
        return value.numel() == 1 and not value.is_complex() and float(value) == number
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value) == number


def check_scheduled_lrs(opt) -> None:
    """Raises LRConflictError, changing nothing, if a scheduled group's lr was written from outside;
    then follows groups that gained a schedule (their lr becomes their base lr) or lost one (their
    lr becomes a float, the last lr)."""
    groups = opt.param_groups
    if len(opt._lr_views) != len(groups):
        opt._attach_lrs()  # the groups were replaced wholesale
        return
    replaced = [g for g, group in enumerate(groups)
                if group["schedule"] is not None and opt._lr_views[g] is not None and not is_own_lr(opt, g, group["lr"])]
    if replaced:
        # the lr its schedule gives is no conflict: a wrapper that keeps a copy of the groups (torch's
        # ZeroRedundancyOptimizer) copies it back once after a load ([note: state written past
        # load_state_dict], fusedlr/optim.py)
        expected = opt._schedule_values()[:, 0].tolist()
        for g in replaced:
            value = groups[g]["lr"]
            if not _is_number(value, expected[g]):
                raise LRConflictError(f"param group {g}: its 'lr' was replaced (now {value!r}), but the group has "
                                      f"a fusedlr schedule. {_ADVICE}.")
    # under torch.compile the step writes the lrs itself, and the version check waits for eager
    written = not torch.compiler.is_compiling() and opt._group_lrs._version != opt._lrs_version
    if written:
        expected = opt._schedule_values()[:, 0]
        bad = [g for g, group in enumerate(groups) if group["schedule"] is not None and opt._lr_views[g] is not None
               and bool(opt._group_lrs[g] != expected[g])]
        if bad:
            g = bad[0]
            raise LRConflictError(f"param group {g}: its 'lr' was written in place (to {float(opt._group_lrs[g])!r}"
                                  f", where its schedule gives {float(expected[g])!r}), as a torch LRScheduler "
                                  f"does, but the group has a fusedlr schedule. {_ADVICE}.")
    changed = written
    for g, group in enumerate(groups):
        own = is_own_lr(opt, g, group["lr"])
        if group["schedule"] is not None and not own:
            group.setdefault("initial_lr", float(group["lr"]))
            with torch.inference_mode(False):
                group["lr"] = opt._lr_views[g] = opt._group_lrs[g]
            changed = True
        elif group["schedule"] is None and opt._lr_views[g] is not None:
            if own:
                group["lr"] = float(group["lr"])
            opt._lr_views[g] = None
            changed = True
    if changed:
        opt._refresh_lrs()


def twin_keys(schedule, saved: dict, next_momentum: float | None) -> dict:
    """The keys a torch twin of `schedule` keeps in a saved param group, so that it resumes from a
    fusedlr checkpoint (OneCycleLR's and CyclicLR's initial_lr, OneCycleLR's max_lr, min_lr; the
    momentum bounds of a cycling
    schedule; the cycled momentum or beta1 of the next step)."""
    from .schedules import CyclicLR, OneCycleLR

    keys: dict = {}
    if isinstance(schedule, OneCycleLR):
        initial = schedule.max_lr / schedule.div_factor
        keys.update(initial_lr=initial, max_lr=schedule.max_lr, min_lr=initial / schedule.final_div_factor)
    if isinstance(schedule, CyclicLR):
        keys["initial_lr"] = schedule.base_lr  # where torch's CyclicLR leaves it
    if isinstance(schedule, (OneCycleLR, CyclicLR)) and schedule.cycle_momentum:
        keys.update(max_momentum=schedule.max_momentum, base_momentum=schedule.base_momentum)
    if next_momentum is not None:
        if "betas" in saved:
            keys["betas"] = (next_momentum, *saved["betas"][1:])
        else:
            keys["momentum"] = next_momentum
    return keys


class OnDeviceScheduler(LRScheduler):
    """The scheduler of a fusedlr optimizer, for the places where a framework wants one
    (``Trainer(optimizers=(opt, opt.as_lr_scheduler()))``, Lightning's ``configure_optimizers``,
    accelerate's ``prepare``): the schedule runs inside the optimizer's step, so ``step()``
    changes nothing but the count of calls (a metric given to it goes to ``opt.observe``).
    ``get_last_lr()`` is as torch's: each group's ``lr`` when ``step()`` (or the constructor) last
    ran, so between an optimizer step and the scheduler's the lr that step used (as HF Trainer
    logs it), after the scheduler's the lr of the next step.
    """

    def __init__(self, optimizer):
        # LRScheduler.__init__ is not called: it would wrap optimizer.step and write the lrs.
        self.optimizer = optimizer
        self.last_epoch = 0
        # the optimizer's step() calls at the last step() here, and the two last gaps between them:
        # the cadence a framework steps its scheduler at ([note: scheduler cadence])
        self._calls_seen = getattr(optimizer, "_step_calls", 0)
        self._gaps = (1, 1)
        self._cadence_warned = False
        self.base_lrs = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
        self._get_lr_called_within_step = False
        self._last_lr = self.get_lr()

    def get_lr(self) -> list[float | Tensor]:
        """Each group's lr now: copies of the device tensors of scheduled groups (no host sync)."""
        return [lr.clone() if isinstance(lr, Tensor) else lr for lr in (g["lr"] for g in self.optimizer.param_groups)]

    def step(self, metrics=None, epoch=None) -> None:
        """Counts the call and notes the lrs for get_last_lr(); the optimizer's step already moved
        every schedule. A metric (as ReduceLROnPlateau.step takes it) goes to ``optimizer.observe``."""
        if epoch is not None:
            raise ValueError("step(epoch=...): a fusedlr schedule follows the optimizer's step counter; "
                             "use opt.set_schedule_steps(k) to move it")
        if metrics is not None:
            self.optimizer.observe(metrics)
        else:
            self._check_cadence()
        self.last_epoch += 1
        self._last_lr = self.get_lr()

    # [note: scheduler cadence]
    # A framework may step its scheduler once an epoch (Lightning's interval="epoch") or every few
    # optimizer steps (frequency=N), meaning a schedule that moves at that cadence. A fusedlr schedule
    # moves with the optimizer's steps, in its own units (steps_per_epoch), and this step() changes
    # nothing, so such a config would go unread. Where the scheduler is stepped every N > 1 optimizer
    # steps twice in a row (one long gap is a step a GradScaler skipped, or a first epoch) and a
    # scheduled group's schedule does not count N steps per epoch, it warns once, saying what to set.
    def _check_cadence(self) -> None:
        calls = getattr(self.optimizer, "_step_calls", None)
        if calls is None:
            return
        gap, self._calls_seen = calls - self._calls_seen, calls
        self._gaps = (self._gaps[1], gap)
        if self._cadence_warned or gap <= 1 or self._gaps[0] != gap:
            return
        schedules = [g["schedule"] for g in self.optimizer.param_groups if g.get("schedule") is not None]
        if any(getattr(s, "steps_per_epoch", 1) != gap for s in schedules):
            self._cadence_warned = True
            warnings.warn(f"opt.as_lr_scheduler() is stepped every {gap} optimizer steps (Lightning's "
                          f"interval='epoch' or frequency={gap}?), but a fusedlr schedule moves with the optimizer's "
                          f"steps and this step() changes nothing: to move the schedule once per {gap} steps, give "
                          f"it steps_per_epoch={gap} (as a torch scheduler stepped per epoch takes it)", stacklevel=3)

    def state_dict(self) -> dict:
        """The count of calls, with the keys torch's schedulers keep (LambdaLR's too, HF Trainer's
        kind), so that a torch scheduler resumes from it: the lrs as floats (a host sync, at saving)."""
        groups = len(self.optimizer.param_groups)
        return {"last_epoch": self.last_epoch, "_step_count": self.last_epoch + 1,
                "base_lrs": [float(lr) for lr in self.base_lrs], "_last_lr": [float(lr) for lr in self._last_lr],
                "_get_lr_called_within_step": False, "lr_lambdas": [None] * groups}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_epoch = int(state_dict.get("last_epoch", 0))
        self._last_lr = self.get_lr()


class OnDeviceMetricScheduler(OnDeviceScheduler, ReduceLROnPlateau):
    """The scheduler of a fusedlr optimizer with a metric-driven schedule (ReduceLROnPlateau,
    GreedyLR): as an instance of torch's ReduceLROnPlateau, it is what HF Trainer and Lightning hand
    their monitored metric to at each evaluation (``step(metric)``, which goes to
    ``opt.observe``) instead of stepping it per batch. Otherwise an OnDeviceScheduler."""

