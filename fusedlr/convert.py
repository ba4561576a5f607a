"""fusedlr.from_torch: a torch optimizer and its lr scheduler as one fusedlr optimizer."""

from __future__ import annotations

import functools
import math

import torch
from torch.optim import lr_scheduler as L

from . import schedules as S
from .optim import SGD, Adam, AdamW

__all__ = ["from_torch", "schedule_of"]

_OPTIMIZERS = {torch.optim.SGD: SGD, torch.optim.Adam: Adam, torch.optim.AdamW: AdamW}
_TORCH_ONLY_KEYS = ("foreach", "fused", "capturable", "differentiable")


def from_torch(optimizer: torch.optim.Optimizer, scheduler: L.LRScheduler | None = None, *,
               steps_per_epoch: int = 1):
    """The fusedlr optimizer with `optimizer`'s groups, hyperparameters and state (mid-run too),
    each group scheduled by the on-device twin of `scheduler` from where it is now.

    `scheduler` may be any torch scheduler with a fusedlr twin (SequentialLR of them too), or a
    LambdaLR made by HF transformers' ``get_scheduler``, or a ChainedScheduler of the schedulers that
    multiply the lr in turn; a scheduler stepped once per epoch takes ``steps_per_epoch`` (converted
    mid-epoch, the schedule counts the steps since the scheduler's last step from Adam's and AdamW's
    state where that count falls in the epoch; SGD's state counts no steps, so it is converted at
    the start of the scheduler's epoch). Anything
    else (a LambdaLR of your own function, a chain of schedulers that set the lr) raises ValueError
    naming it. Use the result in place of both; the scheduler is not needed any more.
    """
    cls = _OPTIMIZERS.get(type(optimizer))
    if cls is None:
        raise ValueError(f"from_torch: {type(optimizer).__name__} has no fusedlr counterpart "
                         f"(torch.optim.SGD, Adam and AdamW have)")
    if scheduler is not None and scheduler.optimizer is not optimizer:
        raise ValueError("from_torch: the scheduler steps another optimizer")
    greedy = _is_hf_greedy(scheduler)
    groups = []
    for g, group in enumerate(optimizer.param_groups):
        new = {k: v for k, v in group.items() if k not in _TORCH_ONLY_KEYS}
        new["schedule"] = None if scheduler is None else schedule_of(scheduler, g, steps_per_epoch)
        if greedy:  # its base lr is the lr it was made with, to which a reset returns
            new["initial_lr"] = scheduler._init_lrs[g]
        groups.append(new)
    fused = cls(groups)
    if optimizer.state:
        state_dict = optimizer.state_dict()
        if greedy:  # a torch group's lr would become the base lr on the way in
            for g, saved in enumerate(state_dict["param_groups"]):
                saved["initial_lr"] = scheduler._init_lrs[g]
        fused.load_state_dict(state_dict)
    if greedy or isinstance(scheduler, L.ReduceLROnPlateau):
        # a metric-driven schedule carries on from its state; its count of observations is no step count
        fused._set_metric_state([_metric_state(scheduler, g) for g in range(len(optimizer.param_groups))])
    elif scheduler is not None:
        unit = 1 if isinstance(scheduler, L.OneCycleLR) else steps_per_epoch
        # a ChainedScheduler keeps no count of its own: its schedulers step together
        last_epoch = (scheduler._schedulers[0] if isinstance(scheduler, L.ChainedScheduler) else scheduler).last_epoch
        start = max(last_epoch, 0) * unit
        taken = _steps_taken(optimizer)
        if taken is not None and start < taken < start + unit:
            start = taken  # mid-epoch: the steps taken since the scheduler's last step count too
        fused.set_schedule_steps(start)
    return fused


def _steps_taken(optimizer: torch.optim.Optimizer) -> int | None:
    """The most steps any parameter's state counts (Adam's and AdamW's "step"), None where the
    state keeps no count (SGD)."""
    counts = [int(state["step"]) for state in optimizer.state.values() if "step" in state]
    return max(counts) if counts else None


def schedule_of(scheduler, g: int = 0, steps_per_epoch: int = 1) -> S.Schedule:
    """The fusedlr schedule that gives param group g the lrs `scheduler` gives it."""
    per_epoch = {"steps_per_epoch": steps_per_epoch}
    group = scheduler.optimizer.param_groups[g]
    if isinstance(scheduler, L.ChainedScheduler):
        chainable = (L.ConstantLR, L.LinearLR, L.StepLR, L.MultiStepLR, L.ExponentialLR, L.PolynomialLR)
        for s in scheduler._schedulers:
            if not isinstance(s, chainable) and not (isinstance(s, L.CosineAnnealingLR) and s.eta_min == 0):
                raise ValueError(f"from_torch: a ChainedScheduler of {type(s).__name__} cannot be expressed (a "
                                 "chain multiplies the lr in turn: ConstantLR, LinearLR, StepLR, MultiStepLR, "
                                 "ExponentialLR, PolynomialLR and CosineAnnealingLR with eta_min=0 can)")
        return S.Product([schedule_of(s, g, steps_per_epoch) for s in scheduler._schedulers])
    if isinstance(scheduler, L.SequentialLR):
        return S.SequentialLR([schedule_of(s, g) for s in scheduler._schedulers],
                              milestones=list(scheduler._milestones), **per_epoch)
    if isinstance(scheduler, L.StepLR):
        return S.StepLR(step_size=scheduler.step_size, gamma=scheduler.gamma, **per_epoch)
    if isinstance(scheduler, L.MultiStepLR):
        return S.MultiStepLR(milestones=sorted(scheduler.milestones.elements()), gamma=scheduler.gamma, **per_epoch)
    if isinstance(scheduler, L.ExponentialLR):
        return S.ExponentialLR(gamma=scheduler.gamma, **per_epoch)
    if isinstance(scheduler, L.CosineAnnealingLR):
        return S.CosineAnnealingLR(T_max=scheduler.T_max, eta_min=scheduler.eta_min, **per_epoch)
    if isinstance(scheduler, L.CosineAnnealingWarmRestarts):
        return S.CosineAnnealingWarmRestarts(T_0=scheduler.T_0, T_mult=scheduler.T_mult, eta_min=scheduler.eta_min,
                                             **per_epoch)
    if isinstance(scheduler, L.LinearLR):
        return S.LinearLR(start_factor=scheduler.start_factor, end_factor=scheduler.end_factor,
                          total_iters=scheduler.total_iters, **per_epoch)
    if isinstance(scheduler, L.ConstantLR):
        return S.ConstantLR(factor=scheduler.factor, total_iters=scheduler.total_iters, **per_epoch)
    if isinstance(scheduler, L.PolynomialLR):
        return S.PolynomialLR(total_iters=scheduler.total_iters, power=scheduler.power, **per_epoch)
    if isinstance(scheduler, L.OneCycleLR):
        phases = scheduler._schedule_phases
        cycled = scheduler.cycle_momentum
        return S.OneCycleLR(max_lr=group["max_lr"], total_steps=scheduler.total_steps,
                            pct_start=(phases[0]["end_step"] + 1) / scheduler.total_steps,
                            anneal_strategy=scheduler._anneal_func_type, div_factor=group["max_lr"] / group["initial_lr"],
                            final_div_factor=group["initial_lr"] / group["min_lr"], three_phase=len(phases) == 3,
                            cycle_momentum=cycled, **({"base_momentum": group["base_momentum"],
                                                       "max_momentum": group["max_momentum"]} if cycled else {}))
    if isinstance(scheduler, L.CyclicLR):
        if scheduler._scale_fn_custom is not None:
            raise ValueError(f"from_torch: CyclicLR's scale_fn {scheduler._scale_fn_custom!r} is Python code, "
                             "which cannot run on the device; use mode='triangular', 'triangular2' or 'exp_range'")
        up = round(scheduler.total_size * scheduler.step_ratio)
        momentum = ({"base_momentum": scheduler.base_momentums[g], "max_momentum": scheduler.max_momentums[g]}
                    if scheduler.cycle_momentum else {})
        return S.CyclicLR(base_lr=scheduler.base_lrs[g], max_lr=scheduler.max_lrs[g], step_size_up=up,
                          step_size_down=int(scheduler.total_size) - up, mode=scheduler.mode, gamma=scheduler.gamma,
                          cycle_momentum=scheduler.cycle_momentum, **momentum, **per_epoch)
    if isinstance(scheduler, L.ReduceLROnPlateau):
        return S.ReduceLROnPlateau(mode=scheduler.mode, factor=scheduler.factor, patience=scheduler.patience,
                                   threshold=scheduler.threshold, threshold_mode=scheduler.threshold_mode,
                                   cooldown=scheduler.cooldown, min_lr=scheduler.min_lrs[g], eps=scheduler.eps)
    if _is_hf_greedy(scheduler):
        return S.GreedyLR(mode=scheduler.mode, factor=scheduler.factor, patience=scheduler.patience,
                          threshold=scheduler.threshold, threshold_mode=scheduler.threshold_mode,
                          cooldown=scheduler.cooldown, warmup=scheduler.warmup, min_lr=scheduler.min_lrs[g],
                          max_lr=scheduler.max_lrs[g], eps=scheduler.eps, smooth=scheduler.smooth,
                          window_size=scheduler.window_size, reset_start=scheduler.reset_start_original)
    if isinstance(scheduler, L.LambdaLR):
        return _hf_schedule(scheduler.lr_lambdas[g], group)
    raise ValueError(f"from_torch: {type(scheduler).__name__} has no on-device twin")


def _is_hf_greedy(scheduler) -> bool:
    return type(scheduler).__name__ == "GreedyLR" and type(scheduler).__module__.startswith("transformers.")


def _metric_state(scheduler, g: int) -> dict[str, float | list[float]]:
    """Group g's row of the schedule state (its slots by name, csrc/schedule_math.h) as `scheduler`
    (torch's ReduceLROnPlateau or HF's GreedyLR) holds it now: its lr, best metric (NaN for the
    starting infinity: nothing seen yet), counters and smoothing window."""
    max_mode = scheduler.mode == "max"
    best = float(scheduler.best)
    unset = best == (-math.inf if max_mode else math.inf)
    state = {"lr": float(scheduler.optimizer.param_groups[g]["lr"]), "best": math.nan if unset else best,
             "num_bad": scheduler.num_bad_epochs, "cooldown_counter": scheduler.cooldown_counter}
    if isinstance(scheduler, L.ReduceLROnPlateau):
        return state
    state.update(num_good=scheduler.num_good_epochs, warmup_counter=scheduler.warmup_counter,
                 at_min_reductions=scheduler.reset_start_original - scheduler.reset_start)
    window = scheduler._streaming_avg
    if scheduler.smooth and window is not None:
        values = [float(v) for v in window.values]
        if len(values) > scheduler.window_size:
            raise ValueError(f"from_torch: GreedyLR's window holds {len(values)} values, more than its "
                             f"window_size {scheduler.window_size}")
        state.update(window_count=len(values), window_sum=float(window.sum), window_head=0, values=values)
    return state


# HF transformers' get_scheduler builds LambdaLRs over these functions (functools.partial with the
# schedule's arguments as keywords): their names say which schedule it is.
_HF_LAMBDAS = {
    "_get_constant_lambda": "constant",
    "_get_constant_schedule_with_warmup_lr_lambda": "constant_with_warmup",
    "_get_linear_schedule_with_warmup_lr_lambda": "linear",
    "_get_cosine_schedule_with_warmup_lr_lambda": "cosine",
    "_get_cosine_with_hard_restarts_schedule_with_warmup_lr_lambda": "cosine_with_restarts",
    "_get_inverse_sqrt_schedule_lr_lambda": "inverse_sqrt",
    "_get_wsd_scheduler_lambda": "warmup_stable_decay",
    "_get_polynomial_decay_schedule_with_warmup_lr_lambda": "polynomial",
    "_get_cosine_with_min_lr_schedule_with_warmup_lr_rate_lambda": "cosine_warmup_with_min_lr",
}


def _hf_schedule(lr_lambda, group: dict) -> S.Schedule:
    func = lr_lambda.func if isinstance(lr_lambda, functools.partial) else lr_lambda
    name = _HF_LAMBDAS.get(getattr(func, "__name__", ""))
    if name is None or not getattr(func, "__module__", "").startswith("transformers."):
        raise ValueError(f"from_torch: the LambdaLR's function {lr_lambda!r} is Python code, which cannot run on "
                         "the device; write it as a fusedlr schedule (fusedlr.schedules)")
    kwargs = dict(lr_lambda.keywords) if isinstance(lr_lambda, functools.partial) else {}
    if name == "cosine":  # HF's plain cosine shares the function of cosine_with_min_lr, with a floor of 0
        if kwargs.get("min_lr_rate", 0.0) != 0.0:
            name = "cosine_with_min_lr"
        else:
            kwargs.pop("min_lr_rate", None)
    if kwargs.get("warmup_lr_rate", 0.0) is None:
        kwargs.pop("warmup_lr_rate")
    warmup = kwargs.pop("num_warmup_steps", 0)
    total = kwargs.pop("num_training_steps", None)
    # polynomial's lr_end is a fraction of the lr HF read when it was made (its lr_init)
    base_lr = kwargs.pop("lr_init", group.get("initial_lr", group["lr"]))
    return S.from_hf(name, warmup, total, base_lr=base_lr, **kwargs)
