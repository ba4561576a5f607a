"""The optimizers' per-parameter state: which state a parameter has and of which dtype, how it is
created (zero, or copied from a checkpoint) in packed buffers ([note: packed state]), and how its
storage is chosen: the group settings state_dtype, stochastic_rounding and rounding_seed, and the
optimizer's master-weight modes, with the conversions between a float32 master weight and a
bfloat16 parameter with its int16 remainder (csrc/storage_math.h, [note: storage], [note:
remainders]; the same bit operations as the kernels').

Which optional state a parameter has is the optimizer's hook (`_has_state(key, param, group)`),
passed in here as `has_state`; `keys` are the op's state lists besides "step", in the op's order
(the master weights' list is "master_weight", kept in the state as `state_key` says).
"""

from __future__ import annotations

import collections
import numbers
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from . import _C
from . import distributed as _dist
from .distributed import local_of

HasState = Callable[[str, Tensor, dict], bool]  # (key, param, group): whether the param's state holds key

_is_compiling = torch.compiler.is_compiling


# -- the optimizer's state table -------------------------------------------------------------------

class StateTable(collections.defaultdict):
    """An optimizer's `state`: torch's defaultdict(dict) of each parameter's state, which counts the
    entries put into it from outside the optimizer (`writes`; [note: state written past
    load_state_dict], fusedlr/optim.py). The optimizer puts its own through `put`, uncounted; an
    empty entry (what reading a missing parameter's state puts there) is no state, and not counted."""

    def __init__(self, entries=()):
        super().__init__(dict, entries)
        self.writes = 0

    def __setitem__(self, param, state) -> None:
        if state:
            self.writes += 1
        super().__setitem__(param, state)

    def put(self, param, state: dict) -> None:
        super().__setitem__(param, state)

    def __reduce__(self):
        return StateTable, (dict(self),), {"writes": self.writes}


# -- which state, of which dtype ------------------------------------------------------------------

# master_weights: False, True (a float32 copy, state "master_weight") or "remainder" (state
# "master_remainder": the int16 low halves of float32 masters whose top halves are the bfloat16
# parameters).
REMAINDER = "remainder"
MASTER_KEYS = ("master_weight", "master_remainder")
# state_dtype=MX8 keeps the optimizer state in 8 bits (csrc/storage_math.h, [note: 8-bit state]):
# e4m3 codes and one power-of-two scale per block of MX_BLOCK elements, held in a 1-D uint8 tensor
# per state (the codes of the parameter's local elements in memory order, then the scales)
MX8 = torch.float8_e4m3fn
MX_BLOCK = 32
_SEED_LIMIT = 1 << 53  # the kernels read the seed from a double


def math_dtype(param: Tensor) -> torch.dtype:
    """The dtype an update computes in: float32 for low-precision parameters (csrc/step_inputs.cpp,
    state_dtype)."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def state_dtype(key: str, param: Tensor, group: dict) -> torch.dtype:
    """The dtype of state `key` of `param` in `group`: the math type, or bfloat16 as the group's
    state_dtype says; float32 masters, int16 remainders."""
    if key == "master_weight":
        return torch.float32
    if key == "master_remainder":
        return torch.int16
    if group.get("state_dtype") == torch.bfloat16:
        return torch.bfloat16
    if group.get("state_dtype") == MX8:
        return torch.uint8
    return math_dtype(param)


def is_low_precision(param: Tensor) -> bool:
    return param.dtype in (torch.bfloat16, torch.float16)


def has_master_weight(param: Tensor, master_weights: bool | str) -> bool:
    """Whether the parameter's state holds a master weight under the master_weights option."""
    return bool(master_weights) and is_low_precision(param)


def state_key(key: str, master_weights: bool | str) -> str:
    """The state key of the op's list `key`: the master weights' depends on the mode."""
    if key == "master_weight" and master_weights == REMAINDER:
        return "master_remainder"
    return key


def check_master_weights(value: Any) -> bool | str:
    if value is True or value is False or value == REMAINDER:
        return value
    raise ValueError(f"Invalid master_weights: {value!r} (True keeps a float32 copy of each bfloat16 / float16 "
                     f"parameter, 'remainder' the int16 low halves of float32 masters of bfloat16 parameters, "
                     f"False none)")


def check_rounding(group: dict) -> None:
    """The group's stochastic_rounding and rounding_seed, checked where the step reads them."""
    if not isinstance(group["stochastic_rounding"], bool):
        raise ValueError(f"Invalid stochastic_rounding: {group['stochastic_rounding']!r} (must be True or False)")
    seed = group["rounding_seed"]
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < _SEED_LIMIT:
        raise ValueError(f"Invalid rounding_seed: {seed!r} (an integer in [0, 2**53) is required)")


def check_storage_settings(group: dict) -> None:
    """Raise ValueError, naming the setting, for a group's state_dtype, stochastic_rounding or
    rounding_seed the kernels cannot take, or a state_dtype its parameters cannot have."""
    dtype = group["state_dtype"]
    if not (dtype is None or dtype == torch.bfloat16 or dtype == MX8):
        raise ValueError(f"Invalid state_dtype: {dtype!r} (None keeps the state in float32, float64 for float64 "
                         f"parameters; torch.bfloat16 in bfloat16; torch.float8_e4m3fn in 8 bits: e4m3 codes "
                         f"with a scale per block of {MX_BLOCK} elements)")
    check_rounding(group)
    if dtype is not None and any(p.dtype == torch.float64 for p in group["params"]):
        raise ValueError(f"state_dtype={dtype} is for float32, bfloat16 and float16 parameters; this group "
                         "holds a float64 one (its state is computed in float64)")


DEFAULT_SEED = 0  # the same on every rank: replicas (DDP, replicated DTensors) round alike


# -- 8-bit state ([note: 8-bit state]) ------------------------------------------------------------

def mx_bytes(numel: int) -> int:
    """The bytes of 8-bit state of `numel` elements: a code each and a scale per block."""
    return numel + -(-numel // MX_BLOCK)


# The scale byte of a block of zeros (csrc/storage_math.h, mx_scale_byte: at least 1).
_MX_ZERO_SCALE = 1


def mx_zeros_(codes: Tensor, numel: int) -> Tensor:
    """8-bit state of `numel` zeros in `codes` (zero bytes) as the encoder writes them: the scale
    bytes set, so that a state no step has yet written saves and loads back byte for byte."""
    codes[numel:].fill_(_MX_ZERO_SCALE)
    return codes


def mx_encoded(value: Tensor, shard: Tensor) -> Tensor:
    """The 8-bit state of a parameter's local shard `shard` holding `value` (shaped like it): the
    codes of its elements in the shard's memory order (the order the kernels visit them), then the
    block scales, each block rounded to nearest by the kernels' own encoder (on the CPU)."""
    ordered = torch.empty_strided(shard.shape, shard.stride(), dtype=torch.float32)
    ordered.copy_(value.detach())
    codes = _C.mx_encode(ordered.as_strided((shard.numel(),), (1,)))
    return codes.to(shard.device)


def mx_decoded(codes: Tensor, shard: Tensor) -> Tensor:
    """The float32 values of 8-bit state `codes` of the local shard `shard`, shaped and strided
    like it (exact: a decoded block encodes to the same codes and scale again)."""
    flat = _C.mx_decode(codes.detach().cpu(), shard.numel())
    return flat.as_strided(shard.shape, shard.stride()).to(shard.device)


def held(local: Tensor, param: Tensor) -> Tensor:
    """A state tensor as the optimizer holds it: shaped like the parameter (a DTensor for a
    DTensor parameter), or 8-bit state as the rank's local uint8 bytes."""
    return local if local.dtype == torch.uint8 else _dist.like_parameter(local, param)


def state_value(value: Tensor, param: Tensor) -> Tensor:
    """A state tensor's values as torch keeps them, shaped like the parameter: 8-bit state decoded
    (float32; a DTensor of the parameter's placements for a DTensor parameter)."""
    if value.dtype != torch.uint8:
        return value
    return _dist.like_parameter(mx_decoded(value, local_of(param)), param)


def _converted(value: Tensor, param: Tensor, dtype: torch.dtype) -> Tensor:
    """State `value` of `param` as `dtype` (a group's state_dtype changed)."""
    shard = local_of(param)
    local = local_of(value)
    if local.dtype == torch.uint8:
        local = mx_decoded(local, shard)
    if dtype == torch.uint8:
        return mx_encoded(local, shard)
    return _dist.like_parameter(local.to(dtype), param)


# -- master weights as remainders ([note: remainders]) --------------------------------------------

def split_master(master: Tensor) -> tuple[Tensor, Tensor]:
    """A float32 master as its bfloat16 top half rounded to nearest, ties away from zero, and the
    int16 remainder: the kernels' own split (csrc/storage_math.h), on the CPU (checkpoints and mode
    changes only)."""
    param, remainder = _C.split_master(master.detach().to("cpu", torch.float32))
    return param.to(master.device), remainder.to(master.device)


def join_master(param: Tensor, remainder: Tensor) -> Tensor:
    """The float32 master of a bfloat16 parameter and its int16 remainder (csrc/storage_math.h)."""
    return _C.join_master(param.detach().cpu(), remainder.detach().cpu()).to(param.device)


def converted_master(param: Tensor, saved_key: str, saved: Tensor) -> Tensor:
    """The master weight of `param` kept as the other mode keeps it, from `saved` (its state
    `saved_key`, shaped like the parameter). A float32 master becomes a remainder with the parameter
    set to the master's bfloat16 rounding, which is what a step would write to it."""
    shard = local_of(param)
    value = local_of(saved).to(shard.device)
    if param.dtype != torch.bfloat16:
        raise ValueError(f"master_weights='remainder' completes bfloat16 parameters; this one is {param.dtype}")
    with torch.no_grad():
        if saved_key == "master_weight":  # to a remainder
            rounded, remainder = split_master(value)
            shard.copy_(rounded)
            out = torch.empty_like(shard, dtype=torch.int16).copy_(remainder)
        else:
            out = torch.empty_like(shard, dtype=torch.float32).copy_(join_master(shard, value))
    return _dist.like_parameter(out, param)


# -- packed buffers -------------------------------------------------------------------------------

class _Flat(NamedTuple):
    """The layout of 8-bit state for _packed_like: 1-D, `size` bytes."""
    size: int
    device: torch.device

    @property
    def shape(self) -> tuple[int]:
        return (self.size,)

    def stride(self) -> tuple[int]:
        return (1,)

    def numel(self) -> int:
        return self.size

# [note: packed state]
# The optimizer creates the state of many parameters at once (their first step, load_state_dict).
# The state entries of those parameters ("exp_avg", "momentum_buffer", ...) that are small are then
# views into shared buffers ("packs") of at most _PACK_BYTES, one set per dtype, and their step
# counters are the elements of one int64 vector. The views have their parameter's shape and
# strides, as torch's state does, and start on multiples of _PACK_ALIGN elements (64 bytes of
# float32; 8-bit state, 1-D bytes, on 16). A step reads every state
# tensor's storage: shared by thousands of small tensors, it is read once, not once per tensor from
# wherever the allocator put it. An entry of _ALONE_BYTES or more has a storage of its own (it
# gains nothing from sharing, and saving or copying it alone should not carry others along), as
# has state added later (a new momentum buffer, say) and the state of a parameter that is not
# dense (its strides do not span exactly its elements).
_PACK_ALIGN = 16  # elements
_PACK_BYTES = 16 << 20
_ALONE_BYTES = 4 << 20


def _zero_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    if device.type == "cpu" and not _is_compiling():  # a compiled first step makes plain zeros
        return _C.packed_state_buffer(numel, dtype)  # on huge pages where the kernel gives them
    return torch.zeros(numel, dtype=dtype, device=device)


def _is_dense(t: Tensor) -> bool:
    """Whether t's elements take exactly numel consecutive places of its storage, in some order of
    its dimensions (a contiguous, channels-last or transposed tensor; not a slice or an expand)."""
    if t.numel() == 0:
        return True
    span = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda dim: dim[1]):
        if size != 1:
            if stride != span:
                return False
            span *= size
    return True


def _packed_like(likes: Sequence[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """A zero tensor of `dtype` with each of `likes`' shape and strides, the small ones views of
    shared packs ([note: packed state])."""
    out: list[Tensor | None] = [None] * len(likes)
    packs: list[tuple[list[tuple[int, int]], int]] = []  # ([(index into likes, offset)], elements)
    members: list[tuple[int, int]] = []
    size = 0
    for i, like in enumerate(likes):
        padded = -(-like.numel() // _PACK_ALIGN) * _PACK_ALIGN
        if not _is_dense(like):
            out[i] = torch.zeros_like(like, dtype=dtype)
        elif padded * dtype.itemsize >= _ALONE_BYTES:
            packs.append(([(i, 0)], padded))
        else:
            if (size + padded) * dtype.itemsize > _PACK_BYTES:
                packs.append((members, size))
                members, size = [], 0
            members.append((i, size))
            size += padded
    packs.append((members, size))
    for members, size in packs:
        if members:
            buffer = _zero_buffer(size, dtype, likes[members[0][0]].device)
            for i, offset in members:
                out[i] = buffer.as_strided(likes[i].shape, likes[i].stride(), offset)
    return out


def _packed_state(params: Sequence[Tensor], dtypes: Sequence[torch.dtype]) -> list[Tensor]:
    """Zero state tensors for `params`, of `dtypes`, packed by dtype."""
    out: list[Tensor | None] = [None] * len(params)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, dtype in enumerate(dtypes):
        by_dtype.setdefault(dtype, []).append(i)
    for dtype, indices in by_dtype.items():
        likes = [_Flat(mx_bytes(params[i].numel()), params[i].device) if dtype == torch.uint8 else params[i]
                 for i in indices]
        for i, t in zip(indices, _packed_like(likes, dtype)):
            out[i] = mx_zeros_(t, params[i].numel()) if dtype == torch.uint8 else t
    return out


def _packed_steps(counts: Sequence[int], device: torch.device | None) -> list[Tensor]:
    """0-dim int64 step counters holding `counts`, the elements of one vector. Fresh counters (all
    zero) take no copy from the host, as torch's own lazily created state does not."""
    if not counts:
        return []
    steps = torch.zeros(len(counts), dtype=torch.int64, device=device)
    if any(counts):
        steps.copy_(torch.tensor(list(counts), dtype=torch.int64))
    return list(steps.unbind())


# -- the state of parameters ----------------------------------------------------------------------

def new_states(keys: Sequence[str], has_state: HasState, fresh: Sequence[tuple[Tensor, dict]],
               master_weights: bool | str) -> list[dict]:
    """The state of parameters with their first gradient (each with its group), [note: packed
    state]: step 0, zero buffers, master weights copied from the parameters (a remainder is zero:
    the master is the parameter)."""
    if not fresh:
        return []
    states = [{"step": step} for step in _packed_steps([0] * len(fresh), fresh[0][0].device)]
    shards = [local_of(p) for p, _ in fresh]
    for key in keys:
        holders = [i for i, (p, group) in enumerate(fresh) if has_state(key, p, group)]
        stored = state_key(key, master_weights)
        dtypes = [state_dtype(stored, fresh[i][0], fresh[i][1]) for i in holders]
        for i, tensor in zip(holders, _packed_state([shards[i] for i in holders], dtypes)):
            if stored == "master_weight":
                tensor.copy_(shards[i].detach())
            states[i][stored] = held(tensor, fresh[i][0])
    return states


def ensure_state(keys: Sequence[str], has_state: HasState, param: Tensor, group: dict, state: dict,
                 master_weights: bool | str) -> None:
    """Adds state the settings now need (a momentum buffer, max_exp_avg_sq, a master weight),
    converts a master weight of the other mode into this one's, and casts state into the dtype the
    group's state_dtype now says."""
    for key in keys:
        stored = state_key(key, master_weights)
        if key == "master_weight" and not has_state(key, param, group):
            for other in MASTER_KEYS:  # master weights turned off: the parameter is the value again
                state.pop(other, None)
            continue
        if state.get(stored) is None and has_state(key, param, group):
            other = next((k for k in MASTER_KEYS if k != stored and state.get(k) is not None), None)
            if key == "master_weight" and other is not None:
                state[stored] = converted_master(param, other, state.pop(other))
                continue
            shard = local_of(param)
            dtype = state_dtype(stored, param, group)
            if dtype == torch.uint8:
                tensor = mx_zeros_(torch.zeros(mx_bytes(shard.numel()), dtype=dtype, device=shard.device), shard.numel())
            else:
                tensor = torch.zeros_like(shard, dtype=dtype)
            if stored == "master_weight":
                tensor.copy_(shard.detach())
            state[stored] = held(tensor, param)
        value = state.get(stored)
        dtype = state_dtype(stored, param, group)
        if value is not None and value.dtype != dtype:
            state[stored] = _converted(value, param, dtype)


def packed_copy(keys: Sequence[str], loaded: dict[Tensor, dict], groups: Sequence[dict],
                master_weights: bool | str) -> dict[Tensor, dict]:
    """The optimizer's state from checked saved state ([note: packed state]): copies on the
    parameters' device, in their layout, of the dtypes the groups say; a master weight saved as
    the other mode keeps it converted (which sets a parameter to its master's rounding)."""
    params = list(loaded)
    device = params[0].device if params else None
    steps = _packed_steps([loaded[p]["step"] for p in params], device)
    state = {p: {"step": step} for p, step in zip(params, steps)}
    group_of = {p: group for group in groups for p in group["params"]}
    for key in keys:
        stored = state_key(key, master_weights)
        holders = [p for p in params if stored in loaded[p]]
        dtypes = [state_dtype(stored, p, group_of[p]) for p in holders]
        with torch.no_grad():
            for p, tensor in zip(holders, _packed_state([local_of(p) for p in holders], dtypes)):
                value = _dist.local_value(loaded[p][stored], p)
                tensor.copy_(mx_encoded(value, local_of(p)) if tensor.dtype == torch.uint8 else value)
                state[p][stored] = held(tensor, p)
    mine = state_key("master_weight", master_weights)
    for p in params:
        for other in MASTER_KEYS:
            if other != mine and other in loaded[p]:
                saved = _dist.like_parameter(_dist.local_value(loaded[p][other], p), p)
                state[p][mine] = converted_master(p, other, saved)
    return state


class Placeholders:
    """Empty tensors standing for optional state a parameter does not have (the op takes a tensor
    of every state list for every parameter), one per parameter, made once."""

    def __init__(self):
        self._empty: dict[Tensor, Tensor] = {}

    def of(self, param: Tensor) -> Tensor:
        empty = self._empty.get(param)
        if empty is None:
            empty = self._empty[param] = local_of(param).new_empty(0, dtype=math_dtype(param))
        return empty
