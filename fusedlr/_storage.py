"""How a parameter's optimizer state is stored: the group settings that choose it (state_dtype,
stochastic_rounding, rounding_seed), the optimizer's master-weight modes, and the conversions
between a float32 master weight and a bfloat16 parameter with its int16 remainder.

The kernels' side is csrc/storage_math.h ([note: storage], [note: remainders], [note: stochastic
rounding]); the conversions here are the same bit operations, for checkpoints and mode changes.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor

# master_weights: False, True (a float32 copy, state "master_weight") or "remainder" (state
# "master_remainder": the int16 low halves of float32 masters whose top halves are the bfloat16
# parameters).
REMAINDER = "remainder"
MASTER_KEYS = ("master_weight", "master_remainder")
_SEED_LIMIT = 1 << 53  # the kernels read the seed from a double


def check_master_weights(value: Any) -> bool | str:
    if value is True or value is False or value == REMAINDER:
        return value
    raise ValueError(f"Invalid master_weights: {value!r} (True keeps a float32 copy of each bfloat16 / float16 "
                     f"parameter, 'remainder' the int16 low halves of float32 masters of bfloat16 parameters, "
                     f"False none)")


def master_key(master_weights: bool | str) -> str:
    """The state key of the master weights a mode keeps."""
    return "master_remainder" if master_weights == REMAINDER else "master_weight"


def check_storage_settings(group: dict) -> None:
    """Raise ValueError, naming the setting, for a group's state_dtype, stochastic_rounding or
    rounding_seed the kernels cannot take, or a state_dtype its parameters cannot have."""
    state_dtype = group["state_dtype"]
    if state_dtype is not None and state_dtype != torch.bfloat16:
        raise ValueError(f"Invalid state_dtype: {state_dtype!r} (None keeps the state in float32, float64 for "
                         f"float64 parameters; torch.bfloat16 in bfloat16)")
    check_rounding(group)
    if state_dtype == torch.bfloat16:
        for p in group["params"]:
            if p.dtype == torch.float64:
                raise ValueError("state_dtype=torch.bfloat16 is for float32, bfloat16 and float16 parameters; this "
                                 "group holds a float64 one (its state is computed in float64)")


def check_rounding(group: dict) -> None:
    """The group's stochastic_rounding and rounding_seed, checked where the step reads them."""
    if not isinstance(group["stochastic_rounding"], bool):
        raise ValueError(f"Invalid stochastic_rounding: {group['stochastic_rounding']!r} (must be True or False)")
    seed = group["rounding_seed"]
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < _SEED_LIMIT:
        raise ValueError(f"Invalid rounding_seed: {seed!r} (an integer in [0, 2**53) is required)")


def default_seed() -> int:
    """A group's rounding_seed when none is given: from torch's seed, so that torch.manual_seed
    makes the rounding reproducible too."""
    return torch.initial_seed() % _SEED_LIMIT


def state_dtype(key: str, param: Tensor, group: dict) -> torch.dtype:
    """The dtype of state `key` of `param` in `group`."""
    if key == "master_weight":
        return torch.float32
    if key == "master_remainder":
        return torch.int16
    if group.get("state_dtype") == torch.bfloat16:
        return torch.bfloat16
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def split_master(master: Tensor) -> tuple[Tensor, Tensor]:
    """A float32 master as its bfloat16 top half rounded to nearest, ties away from zero, and the
    int16 remainder ([note: remainders]): int32 arithmetic wraps as the kernels' uint32 does."""
    bits = master.to(torch.float32).contiguous().view(torch.int32)
    rounded = (bits + 0x8000) & -0x10000
    return (rounded >> 16).to(torch.int16).view(torch.bfloat16), (bits - rounded).to(torch.int16)


def join_master(param: Tensor, remainder: Tensor) -> Tensor:
    """The float32 master of a bfloat16 parameter and its int16 remainder."""
    high = param.contiguous().view(torch.int16).to(torch.int32) << 16
    return (high + remainder.to(torch.int32)).view(torch.float32)
