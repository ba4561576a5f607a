"""Independent references: the torch.optim.lr_scheduler twin of each fusedlr schedule, and plain
Python formulas for the schedules torch does not have."""

from __future__ import annotations

import math

import torch
from torch.optim import lr_scheduler as L

from fusedlr import schedules as S


def inverse_sqrt_factor(warmup: int):
    def factor(t: int) -> float:
        n = t + 1
        return n / warmup if n < warmup else math.sqrt(warmup / n)
    return factor


def wsd_factor(s: S.WarmupStableDecay):
    def factor(t: int) -> float:
        w, st, d = s.warmup_steps, s.stable_steps, s.decay_steps
        if t < w:
            return (t + 1) / w
        if t < w + st:
            return 1.0
        p = min(1.0, (t - w - st) / d)
        shape = {"linear": 1 - p, "cosine": (1 + math.cos(math.pi * p)) / 2, "1-sqrt": 1 - math.sqrt(p)}[s.decay]
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * shape
    return factor


def _args(s: S.Schedule, *drop: str) -> dict:
    return {k: v for k, v in s.spec()["args"].items() if k not in ("steps_per_epoch",) + drop}


def torch_twin(s: S.Schedule, opt: torch.optim.Optimizer):
    """The torch scheduler that gives `s`'s lr on `opt`, stepped once per schedule time unit."""
    if s in HF_MADE:  # HF's own LambdaLR
        import transformers

        name, warmup, total, kwargs = HF_MADE[s]
        return transformers.get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total,
                                          scheduler_specific_kwargs=kwargs)
    if isinstance(s, S.SequentialLR):
        return L.SequentialLR(opt, [torch_twin(c, opt) for c in s.schedulers], milestones=list(s.milestones))
    if isinstance(s, S.ExponentialDecay):
        return L.ExponentialLR(opt, gamma=math.exp(-s.decay_rate))
    if isinstance(s, S.InverseSqrt):
        return L.LambdaLR(opt, inverse_sqrt_factor(s.warmup_steps))
    if isinstance(s, S.WarmupStableDecay):
        return L.LambdaLR(opt, wsd_factor(s))
    if isinstance(s, S.OneCycleLR):
        args = {k: v for k, v in s.spec()["args"].items() if v is not None}
        return L.OneCycleLR(opt, **args)
    if isinstance(s, S.CyclicLR):
        return L.CyclicLR(opt, **_args(s, "scale_mode"))
    if isinstance(s, S.MultiStepLR):
        return L.MultiStepLR(opt, milestones=list(s.milestones), gamma=s.gamma)
    return getattr(L, type(s).__name__)(opt, **_args(s))


def time_unit(s: S.Schedule) -> int:
    """Optimizer steps per torch scheduler step."""
    return 1 if isinstance(s, S.OneCycleLR) else s.steps_per_epoch


def torch_values(s: S.Schedule, n: int, base_lr: float, optimizer: str = "sgd"):
    """lr (and momentum or beta1, None when not cycled) at t = 0..n-1 from the torch twin."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = (torch.optim.SGD([p], lr=base_lr, momentum=0.9) if optimizer == "sgd"
           else torch.optim.Adam([p], lr=base_lr))
    sched = torch_twin(s, opt)
    lrs, momenta = [], []
    for t in range(n):
        lrs.append(sched.get_last_lr()[0])
        group = opt.param_groups[0]
        momenta.append(group["momentum"] if optimizer == "sgd" else group["betas"][0])
        if t < n - 1:
            opt.step()
            sched.step()
    return lrs, (momenta if s.cycles_momentum else None)


# Schedules made by from_hf out of the general nodes (Warmup, Decay), twinned by HF's own schedulers.
HF_MADE = {S.from_hf(name, warmup, total, **kwargs): (name, warmup, total, kwargs) for name, warmup, total, kwargs in [
    ("cosine_warmup_with_min_lr", 20, 200, {"min_lr_rate": 0.1, "warmup_lr_rate": 0.05}),
    ("warmup_stable_decay", 15, 200, {"num_decay_steps": 90, "warmup_type": "cosine", "decay_type": "cosine",
                                      "num_cycles": 0.7, "min_lr_ratio": 0.05}),
    ("cosine_with_restarts", 10, 180, {"num_cycles": 2.5}),
]}

# One instance of every schedule, sized so that 200 steps cross their boundaries.
SCHEDULES = {
    "none": None,
    "ConstantLR": S.ConstantLR(factor=0.25, total_iters=40),
    "LinearLR": S.LinearLR(start_factor=0.05, end_factor=0.9, total_iters=120),
    "StepLR": S.StepLR(step_size=30, gamma=0.5),
    "MultiStepLR": S.MultiStepLR(milestones=[90, 20, 50, 50], gamma=0.6),
    "ExponentialLR": S.ExponentialLR(gamma=0.985),
    "ExponentialDecay": S.ExponentialDecay(decay_rate=0.02),
    "CosineAnnealingLR": S.CosineAnnealingLR(T_max=200, eta_min=1e-4),
    "CosineAnnealingWarmRestarts": S.CosineAnnealingWarmRestarts(T_0=15, T_mult=2, eta_min=1e-4),
    "PolynomialLR": S.PolynomialLR(total_iters=150, power=2.0),
    "InverseSqrt": S.InverseSqrt(warmup_steps=25),
    "WarmupStableDecay": S.WarmupStableDecay(warmup_steps=20, stable_steps=60, decay_steps=80, decay="1-sqrt",
                                             min_lr_ratio=0.1),
    "OneCycleLR": S.OneCycleLR(max_lr=0.02, total_steps=200),
    "OneCycleLR-3phase-linear": S.OneCycleLR(max_lr=0.02, total_steps=201, pct_start=0.25, three_phase=True,
                                             anneal_strategy="linear"),
    "CyclicLR-triangular": S.CyclicLR(base_lr=1e-3, max_lr=0.02, step_size_up=30, step_size_down=20),
    "CyclicLR-triangular2": S.CyclicLR(base_lr=1e-3, max_lr=0.02, step_size_up=25, mode="triangular2"),
    "CyclicLR-exp_range": S.CyclicLR(base_lr=1e-3, max_lr=0.02, step_size_up=20, mode="exp_range", gamma=0.995),
    "SequentialLR": S.SequentialLR([S.LinearLR(start_factor=0.01, total_iters=30),
                                    S.CosineAnnealingLR(T_max=240, eta_min=1e-4)], milestones=[30]),
    "StepLR-per-epoch": S.StepLR(step_size=3, gamma=0.5, steps_per_epoch=10),
    **{f"hf-{name}": schedule for schedule, (name, *_) in HF_MADE.items()},
}
