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


@dataclasses.dataclass(frozen=True)
class Entry:
    fused: type
    reference: Callable  # (params, foreach=False, **kwargs) -> a torch.optim.Optimizer
    kwargs: dict
    op: str  # its optimizer in fusedlr/_ops.py OPTIMIZERS
    random_hyper: Callable[[random.Random, object], tuple[dict, bool]]
    alike: dict = dataclasses.field(default_factory=dict)
    variants: dict = dataclasses.field(default_factory=dict)
    # An update of lr * sign(c): where c lies within a rounding of 0, two float32 runs that round c
    # apart step 2 lr apart in that element (float64 runs practically never).
    sign_update: bool = False

    def hyper(self, values: dict) -> list[float]:
        """A group's `hyper` slots from their values by name."""
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
}

# The ops: each C++ optimizer once, with the entry that draws its settings.
OPS = {entry.op: entry for entry in reversed(list(OPTIMIZERS.values()))}
