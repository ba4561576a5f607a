"""The optimizers the generic tests run, each with its reference: torch's own optimizer where torch
has one (for-loop, foreach=False), else a float64 reference written here from the paper. A new
fusedlr optimizer is enrolled in every generic test (parity, clipping, non-finite skips, AMP,
master weights, packed state, state_dict, bad input, opcheck, torch.compile, the emulated CUDA
kernels) by an entry in OPTIMIZERS.

An entry's `kwargs` are settings under which every part of its update runs (weight decay,
momentum); `variants` are more settings for the parity tests; `alike` are the settings the
state_dict and master weight tests use. `random_hyper` draws a group's `hyper` slots for the op
tests (by slot name: fusedlr/_ops.py, OPTIMIZERS) and says which optional state a group needs.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable

import torch

import fusedlr
from fusedlr import _ops


class LionReference(torch.optim.Optimizer):
    """Lion (Chen et al., 2023) as the paper writes it, in the parameters' dtype: the reference for
    fusedlr.Lion, which torch lacks. It takes torch's arguments so that torch's schedulers drive its
    lr and beta1 (OneCycleLR and CyclicLR cycle betas[0]), and keeps torch's state layout
    ("step", "exp_avg")."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False, foreach=None):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, weight_decay = float(group["lr"]), group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = -p.grad if group["maximize"] else p.grad
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                interpolated = exp_avg * beta1 + (1 - beta1) * grad
                p.mul_(1 - lr * weight_decay)
                p.add_(torch.sign(interpolated), alpha=-lr)
                exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)
                state["step"] += 1


def _sgd_hyper(r: random.Random, schedule) -> tuple[dict, bool]:
    momentum = r.choice([0.0, 0.9])
    dampening = r.choice([0.0, 0.1]) if momentum else 0.0
    nesterov = float(momentum != 0 and dampening == 0 and r.random() < 0.5)
    values = dict(lr=r.choice([0.05, 0.1]), momentum=momentum, dampening=dampening,
                  weight_decay=r.choice([0.0, 0.01]), nesterov=nesterov, maximize=float(r.random() < 0.3))
    return values, momentum != 0 or (schedule is not None and schedule.cycles_momentum)


def _adam_hyper(r: random.Random, schedule) -> tuple[dict, bool]:
    amsgrad = float(r.random() < 0.4)
    values = dict(lr=r.choice([1e-3, 0.01]), beta1=r.choice([0.9, 0.8]), beta2=0.999, eps=1e-8,
                  weight_decay=r.choice([0.0, 0.01]), amsgrad=amsgrad, maximize=float(r.random() < 0.3),
                  decoupled_weight_decay=float(r.random() < 0.5))
    return values, bool(amsgrad)


def _lion_hyper(r: random.Random, schedule) -> tuple[dict, bool]:
    values = dict(lr=r.choice([1e-3, 0.01]), beta1=r.choice([0.9, 0.8]), beta2=r.choice([0.99, 0.95]),
                  weight_decay=r.choice([0.0, 0.1]), maximize=float(r.random() < 0.3))
    return values, False


# The slots every optimizer's groups have after its own, at their defaults.
ROUND_TO_NEAREST = dict(stochastic_rounding=0.0, rounding_seed=0.0)


@dataclasses.dataclass(frozen=True)
class Entry:
    fused: type
    reference: Callable  # (params, foreach=False, **kwargs) -> a torch.optim.Optimizer
    kwargs: dict
    op: str  # its optimizer in fusedlr/_ops.py OPTIMIZERS
    random_hyper: Callable[[random.Random, object], tuple[dict, bool]]
    alike: dict = dataclasses.field(default_factory=dict)
    variants: dict = dataclasses.field(default_factory=dict)
    # Lion's update is lr * sign(c): where c lies within a rounding of 0, two float32 runs that round
    # c apart step 2 lr apart in that element (float64 runs practically never).
    sign_update: bool = False

    def hyper(self, values: dict) -> list[float]:
        """A group's `hyper` slots from their values by name; the common rounding slots default to
        rounding to nearest (csrc/optimizer_traits.h, CommonSlot)."""
        values = dict(ROUND_TO_NEAREST, **values)
        slots = _ops.OPTIMIZERS[self.op].slots
        assert set(values) == set(slots), (sorted(values), slots)
        return [float(values[name]) for name in slots]


OPTIMIZERS = {
    "sgd": Entry(fusedlr.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3), "sgd",
                 _sgd_hyper, alike=dict(lr=0.05, momentum=0.9, nesterov=True),
                 variants={"plain": dict(lr=0.05),
                           "nesterov-maximize": dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-2,
                                                     maximize=True)}),
    "adam": Entry(fusedlr.Adam, torch.optim.Adam, dict(lr=0.01, betas=(0.8, 0.99), weight_decay=1e-2), "adam",
                  _adam_hyper, alike=dict(lr=0.01, amsgrad=True),
                  variants={"amsgrad-maximize": dict(lr=0.01, amsgrad=True, maximize=True, eps=1e-6),
                            "decoupled": dict(lr=0.01, weight_decay=0.05, decoupled_weight_decay=True)}),
    "adamw": Entry(fusedlr.AdamW, torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1), "adam", _adam_hyper,
                   alike=dict(lr=0.01, weight_decay=0.1, amsgrad=True),
                   variants={"amsgrad": dict(lr=0.01, amsgrad=True, weight_decay=0.05)}),
    "lion": Entry(fusedlr.Lion, LionReference, dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1), "lion",
                  _lion_hyper, alike=dict(lr=1e-3, weight_decay=0.1), sign_update=True,
                  variants={"maximize": dict(lr=3e-3, betas=(0.95, 0.98), maximize=True),
                            "no-decay": dict(lr=1e-3)}),
}

# The ops: each C++ optimizer once, with the entry that draws its settings.
OPS = {entry.op: entry for entry in reversed(list(OPTIMIZERS.values()))}
