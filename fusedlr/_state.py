"""The optimizers' per-parameter state: which state a parameter has and of which dtype, and how it
is created (zero, or copied from a checkpoint) in packed buffers ([note: packed state]).

Which optional state a parameter has is the optimizer's hook (`_has_state(key, param, group)`),
passed in here as `has_state`; `keys` are its state keys besides "step", in the op's order.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from . import _C
from . import distributed as _dist
from .distributed import local_of

HasState = Callable[[str, Tensor, dict], bool]  # (key, param, group): whether the param's state holds key

_is_compiling = torch.compiler.is_compiling


# -- which state, of which dtype ------------------------------------------------------------------

def state_dtype(param: Tensor) -> torch.dtype:
    """Optimizer state is float32 for low-precision parameters (csrc/step_inputs.cpp, state_dtype)."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def is_low_precision(param: Tensor) -> bool:
    return param.dtype in (torch.bfloat16, torch.float16)


def has_master_weight(param: Tensor, master_weights: bool) -> bool:
    """Whether the parameter's state holds a "master_weight" under the master_weights option."""
    return master_weights and is_low_precision(param)


# -- packed buffers -------------------------------------------------------------------------------

# [note: packed state]
# The optimizer creates the state of many parameters at once (their first step, load_state_dict).
# The state entries of those parameters ("exp_avg", "momentum_buffer", ...) that are small are then
# views into shared buffers ("packs") of at most _PACK_BYTES, one set per dtype, and their step
# counters are the elements of one int64 vector. The views have their parameter's shape and
# strides, as torch's state does, and start on 64-byte boundaries. A step reads every state
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


def _packed_state(params: Sequence[Tensor]) -> list[Tensor]:
    """Zero state tensors for `params` (float32 for low-precision ones), packed by state dtype."""
    out: list[Tensor | None] = [None] * len(params)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        by_dtype.setdefault(state_dtype(p), []).append(i)
    for dtype, indices in by_dtype.items():
        for i, t in zip(indices, _packed_like([params[i] for i in indices], dtype)):
            out[i] = t
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

def new_states(keys: Sequence[str], has_state: HasState, fresh: Sequence[tuple[Tensor, dict]]) -> list[dict]:
    """The state of parameters with their first gradient (each with its group), [note: packed
    state]: step 0, zero buffers, master weights copied from the parameters."""
    if not fresh:
        return []
    states = [{"step": step} for step in _packed_steps([0] * len(fresh), fresh[0][0].device)]
    shards = [local_of(p) for p, _ in fresh]
    for key in keys:
        holders = [i for i, (p, group) in enumerate(fresh) if has_state(key, p, group)]
        for i, tensor in zip(holders, _packed_state([shards[i] for i in holders])):
            if key == "master_weight":
                tensor.copy_(shards[i].detach())
            states[i][key] = _dist.like_parameter(tensor, fresh[i][0])
    return states


def ensure_state(keys: Sequence[str], has_state: HasState, param: Tensor, group: dict, state: dict) -> None:
    """Adds state the settings now need (a momentum buffer, max_exp_avg_sq, a master weight)."""
    for key in keys:
        if state.get(key) is None and has_state(key, param, group):
            shard = local_of(param)
            tensor = torch.zeros_like(shard, dtype=state_dtype(param))
            if key == "master_weight":
                tensor.copy_(shard.detach())
            state[key] = _dist.like_parameter(tensor, param)


def packed_copy(keys: Sequence[str], loaded: dict[Tensor, dict]) -> dict[Tensor, dict]:
    """The optimizer's state from checked saved state ([note: packed state]): copies on the
    parameters' device, in their layout."""
    params = list(loaded)
    device = params[0].device if params else None
    steps = _packed_steps([loaded[p]["step"] for p in params], device)
    state = {p: {"step": step} for p, step in zip(params, steps)}
    for key in keys:
        holders = [p for p in params if key in loaded[p]]
        with torch.no_grad():
            for p, tensor in zip(holders, _packed_state([local_of(p) for p in holders])):
                tensor.copy_(_dist.local_value(loaded[p][key], p))
                state[p][key] = _dist.like_parameter(tensor, p)
    return state


class Placeholders:
    """Empty tensors standing for optional state a parameter does not have (the op takes a tensor
    of every state list for every parameter), one per parameter, made once."""

    def __init__(self):
        self._empty: dict[Tensor, Tensor] = {}

    def of(self, param: Tensor) -> Tensor:
        empty = self._empty.get(param)
        if empty is None:
            empty = self._empty[param] = local_of(param).new_empty(0, dtype=state_dtype(param))
        return empty
