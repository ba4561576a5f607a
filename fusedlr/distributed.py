"""What fusedlr's optimizers do for sharded parameters, on torch.distributed.

[note: DTensor parameters]
A DTensor parameter (FSDP2's fully_shard, tensor parallel, both on a 2-D mesh) is stepped over its
local shard: the step's lists hold the parameters' and state's local tensors, and each step passes
the local shards of the gradients. The state of a DTensor parameter is a DTensor of the
parameter's mesh and placements, so state_dict() and torch.distributed.checkpoint see sharded state
as they do for torch's optimizers. A gradient of other placements than its parameter's is
redistributed to the parameter's first (one collective for that gradient).

[note: global norm]
clip_grad_norm_ of sharded gradients is the norm of the whole model: every rank sums the squares of
the shards it holds, counting each shard once across the ranks that hold a copy of it (the lowest
such rank counts it; the others add 0 times the squares of their copies, so that a NaN or inf in
any rank's copy makes the norm non-finite on every rank), and one all-reduce over the ranks of the
parameters' mesh (or over `partition_group`, whose ranks hold the other partitions of plain
parameters, as under ZeRO) adds them up. The same all-reduce carries GradScaler's inf flags, so that every rank skips the same
steps. Nothing waits on the host: on CUDA the all-reduce is queued on the stream like the step.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from . import _C

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed
    DTensor = None
try:
    from torch.distributed.tensor.placement_types import _StridedShard
except ImportError:  # a torch without strided shards
    _StridedShard = None


def _is_sharded(placement) -> bool:
    # FSDP2 over tensor parallel shards a TP shard again along the same dimension: a strided shard
    return placement.is_shard() or (_StridedShard is not None and isinstance(placement, _StridedShard))


def is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local_of(t: Tensor) -> Tensor:
    """A DTensor's local shard (a plain tensor sharing its memory), or the tensor itself."""
    return t._local_tensor if is_dtensor(t) else t


def check_parameter(p: Tensor) -> None:
    """Raises ValueError for a DTensor parameter the step cannot update over its shard."""
    if not is_dtensor(p):
        return
    for placement in p.placements:
        if not (_is_sharded(placement) or placement.is_replicate()):
            raise ValueError(f"a DTensor parameter with placement {placement} is not supported: the step updates "
                             "sharded (Shard) or replicated (Replicate) parameters")


def like_parameter(local: Tensor, param: Tensor) -> Tensor:
    """State for `param` from its local shard: a DTensor of the parameter's mesh and placements
    for a DTensor parameter, else `local` itself."""
    if not is_dtensor(param):
        return local
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


def local_value(value: Tensor, param: Tensor) -> Tensor:
    """The local shard, in `param`'s placements, of a loaded state tensor for `param`: a DTensor
    (redistributed if its placements differ) or, for a DTensor parameter, a whole tensor (each rank
    takes its own shard of it, no collective)."""
    if not is_dtensor(param):
        if is_dtensor(value):
            return value.full_tensor()
        return value
    if is_dtensor(value):
        if value.device_mesh != param.device_mesh or value.placements != param.placements:
            value = value.redistribute(param.device_mesh, param.placements)
        return value._local_tensor
    from torch.distributed.tensor import distribute_tensor
    whole = distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    return whole._local_tensor


def local_grad(param: Tensor) -> Tensor | None:
    """The local shard of a DTensor parameter's gradient, in the parameter's placements; a plain
    parameter's gradient as it is."""
    grad = param.grad
    if grad is None or not is_dtensor(param):
        return grad
    spec, param_spec = getattr(grad, "_spec", None), param._spec
    if spec is None:
        raise ValueError("a DTensor parameter has a plain tensor gradient; its gradient must be a DTensor")
    # identity first: the common step compares no placements
    if spec is not param_spec and not (
            (spec.mesh is param_spec.mesh or spec.mesh == param_spec.mesh)
            and (spec.placements is param_spec.placements or spec.placements == param_spec.placements)):
        grad = grad.redistribute(param.device_mesh, param.placements)
    return grad._local_tensor


def local_grads(params: Sequence[Tensor]) -> list[Tensor | None]:
    """local_grad of each parameter, in one loop in C++ where the gradient has its parameter's own
    spec (FSDP2's every step; csrc/python_plan.cpp, [note: DTensor gradients]), through local_grad
    otherwise. torch.compile traces local_grad itself."""
    if torch.compiler.is_compiling():
        return [local_grad(p) for p in params]
    return _C.local_grads(params, DTensor, local_grad)


class NormReduction:
    """How this rank's sums of squares join the global norm ([note: global norm]): which of the
    step's parameters this rank counts, and the group the one all-reduce runs over."""

    def __init__(self, params: Sequence[Tensor], partition_group):
        dtensors = [p for p in params if is_dtensor(p)]
        if dtensors and partition_group is not None:
            raise ValueError("partition_group is for plain parameters partitioned across ranks (ZeRO); DTensor "
                             "parameters reduce their norm over their own mesh")
        self.group = partition_group
        self.counted = [True] * len(params)
        if not dtensors:
            return
        # the first parameter's mesh: the same choice on every rank
        mesh = dtensors[0].device_mesh
        ranks = frozenset(mesh.mesh.flatten().tolist())
        if any(frozenset(p.device_mesh.mesh.flatten().tolist()) != ranks for p in dtensors):
            raise ValueError("DTensor parameters on meshes of different ranks: the global norm (max_grad_norm, "
                             "skip_nonfinite, GradScaler's inf flags) needs one set of ranks")
        if len(ranks) == dist.get_world_size():
            self.group = None  # the default group
        elif mesh.ndim == 1:
            self.group = mesh.get_group()
        elif mesh.mesh_dim_names is not None:
            self.group = mesh._flatten().get_group()
        else:
            raise ValueError("DTensor parameters on a mesh of several dimensions without names that spans only "
                             "some ranks: name its dimensions (init_device_mesh(..., mesh_dim_names=...)) so that "
                             "the global norm can be reduced over its ranks")
        me = dist.get_rank()
        for i, p in enumerate(params):
            # a plain parameter next to DTensor ones is a copy on every rank: counted by the lowest rank
            self.counted[i] = _lowest_holder(p, me) if is_dtensor(p) else me == min(mesh.mesh.flatten().tolist())

    def check_settings(self, max_grad_norm: float | None, skip_nonfinite: bool, found_inf: bool,
                       device: torch.device) -> None:
        """[note: settings across ranks]
        Whether a sharded step runs the norm's all-reduce depends on settings each rank holds: a
        rank that clips or skips, or is handed GradScaler's flags, runs it, and a rank that does
        not leaves the others waiting until the group's timeout. A different max_grad_norm does not
        hang, but clips each rank's shards by another factor. So the first sharded step compares
        them over the ranks of the norm (one all-reduce, read on the host once) and raises the
        same ValueError on every rank where they differ."""
        names = ("max_grad_norm", "skip_nonfinite", "GradScaler")
        mine = [-1.0 if max_grad_norm is None else float(max_grad_norm), float(skip_nonfinite), float(found_inf)]
        both = torch.tensor(mine + [-v for v in mine], dtype=torch.float64, device=device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        values = both.tolist()
        highest, lowest = values[:len(mine)], [-v for v in values[len(mine):]]
        differ = [name for name, high, low in zip(names, highest, lowest) if high != low]
        if differ:
            raise ValueError(f"the ranks' optimizers differ in {', '.join(differ)} (this rank's: max_grad_norm="
                             f"{max_grad_norm}, skip_nonfinite={skip_nonfinite}, GradScaler's inf flags "
                             f"{'given' if found_inf else 'not given'})"
                             ": the global norm and the skipped steps are reduced across ranks, so every rank "
                             "must clip, skip and scale alike")

    def global_sum(self, local: Tensor) -> Tensor:
        """Sums `local` (this rank's partial sums) over the ranks of the norm, in place."""
        dist.all_reduce(local, group=self.group)
        return local


def _lowest_holder(p: Tensor, rank: int) -> bool:
    """Whether `rank` is the lowest of the ranks whose local shard of `p` is the same as its own."""
    mesh = p.device_mesh
    coordinate = mesh.get_coordinate()
    ranks = mesh.mesh
    # fix the coordinates of the sharded dimensions: what remains holds copies of this rank's shard
    index = tuple(c if _is_sharded(placement) else slice(None)
                  for c, placement in zip(coordinate, p.placements))
    return rank == int(ranks[index].min())


def state_initializer_code():
    """The code of torch.distributed.checkpoint's state-initializing step (it steps the optimizer
    once with zero gradients and lr 0 to create its state), or None."""
    try:
        from torch.distributed.checkpoint import state_dict
    except ImportError:
        return None
    initializer = getattr(state_dict, "_init_optim_state", None)
    return getattr(initializer, "__code__", None)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()
