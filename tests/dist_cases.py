"""The ranks of tests/test_distributed.py: `python dist_cases.py CASE RANK WORLD PORT DIR`. Each case
trains the same tiny model twice under the same wrapper (DDP, FSDP2, tensor parallel, ZeRO), once
with a fusedlr optimizer, once with torch.optim's (foreach=False) + its scheduler +
clip_grad_norm_, on the same data, and compares parameters (and norms) every step. A failed check
raises: the rank exits non-zero with the message."""

from __future__ import annotations

import copy
import math
import io
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import fusedlr
from fusedlr import schedules as S

STEPS = 12
TOL = dict(rtol=1e-5, atol=1e-6)  # ten float32 ulps of values of order 1, as the single-process parity


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 4))


def local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def pair(schedule, max_grad_norm, opt="adamw", **extra):
    """fusedlr optimizer factory and the torch twin factory (optimizer, scheduler)."""
    def ours(params):
        cls = {"adamw": fusedlr.AdamW, "sgd": fusedlr.SGD}[opt]
        kwargs = dict(lr=0.01, weight_decay=0.1) if opt == "adamw" else dict(lr=0.05, momentum=0.9)
        return cls(params, schedule=schedule, max_grad_norm=max_grad_norm, **kwargs, **extra)

    def theirs(params):
        cls = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[opt]
        kwargs = dict(lr=0.01, weight_decay=0.1) if opt == "adamw" else dict(lr=0.05, momentum=0.9)
        o = cls(params, foreach=False, **kwargs)
        if isinstance(schedule, S.OneCycleLR):
            return o, torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.02, total_steps=STEPS)
        return o, torch.optim.lr_scheduler.StepLR(o, step_size=4, gamma=0.5)
    return ours, theirs


def train_both(a: nn.Module, b: nn.Module, make_ours, make_theirs, max_grad_norm, batch_of, after_backward=None,
               ours_cls=None):
    opt = make_ours(list(a.parameters()))
    ref, sched = make_theirs(list(b.parameters()))
    clipped = 0
    for step in range(STEPS):
        x, y = batch_of(step)
        for m in (a, b):
            loss = ((m(x) - y) ** 2).mean() * (30.0 if step % 3 == 0 else 1.0)  # some steps clip, some not
            loss.backward()
        if max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(list(b.parameters()), max_grad_norm)
            norm = float(local(norm.full_tensor() if isinstance(norm, DTensor) else norm))
            clipped += norm > max_grad_norm
        opt.step()
        ref.step()
        sched.step()
        if step == 0:
            lists = opt._lists
        assert opt._lists is lists  # the fast path: the step's lists are not rebuilt from step to step
        if max_grad_norm is not None:
            got = float(opt.last_grad_norm())
            assert math.isclose(got, norm, rel_tol=1e-5), (step, got, norm)
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert type(p) is type(q), name
            if isinstance(p, DTensor):
                assert p.placements == q.placements, name
            torch.testing.assert_close(local(p.detach()), local(q.detach()), **TOL,
                                       msg=lambda m: f"step {step}, {name}: {m}")
        opt.zero_grad()
        ref.zero_grad()
    if max_grad_norm is not None:
        assert 0 < clipped < STEPS, clipped  # both kinds of steps happened
    return opt, ref


def same_batches(rank_dependent: bool):
    def batch_of(step):
        g = torch.Generator().manual_seed(1000 * step + (dist.get_rank() if rank_dependent else 0))
        return torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
    return batch_of


# -- cases ---------------------------------------------------------------------------------------

def case_ddp():
    from torch.nn.parallel import DistributedDataParallel as DDP
    for max_norm in (None, 0.5):
        a, b = DDP(model()), DDP(model())
        ours, theirs = pair(S.OneCycleLR(max_lr=0.02, total_steps=STEPS), max_norm)
        train_both(a, b, ours, theirs, max_norm, same_batches(True))


def fsdp(m, mesh=None):
    from torch.distributed.fsdp import fully_shard
    for layer in m:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(m, mesh=mesh)


class CountedFallback:
    """Counts the parameters whose gradients the steps read (`read`, through
    fusedlr.distributed.local_grads) and those of them read through local_grad (`params`), the rule
    for a DTensor gradient whose spec is not its parameter's own (the rest are read in C++: [note:
    DTensor gradients])."""

    def __enter__(self):
        import fusedlr.distributed as fd
        self.module, self.originals, self.read, self.params = fd, (fd.local_grads, fd.local_grad), 0, []

        def local_grads(params):
            self.read += len(params)
            return self.originals[0](params)
        fd.local_grads = local_grads
        fd.local_grad = lambda p: self.params.append(p) or self.originals[1](p)
        return self

    def __exit__(self, *exc):
        self.module.local_grads, self.module.local_grad = self.originals


def case_fsdp2():
    for opt in ("adamw", "sgd"):
        for max_norm in (None, 0.5):
            a, b = fsdp(model()), fsdp(model())
            ours, theirs = pair(S.StepLR(step_size=4, gamma=0.5), max_norm, opt=opt)
            with CountedFallback() as fallback:
                fused, _ = train_both(a, b, ours, theirs, max_norm, same_batches(True))
            # FSDP2's gradients: all read, all on the C++ path
            assert fallback.read == STEPS * len(list(a.parameters())) and not fallback.params, fallback.read
            p = next(a.parameters())
            state = fused.state[p]
            for key, value in state.items():
                if key != "step":  # state of the parameter's mesh and placements, in its shape
                    assert isinstance(value, DTensor) and value.placements == p.placements, key
                    assert value.shape == p.shape and value.to_local().shape == p.to_local().shape, key


def tp(m, mesh):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    # Colwise: weight Shard(0), bias Shard(0); Rowwise: weight Shard(1), bias Replicate
    return parallelize_module(m, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel(), "4": ColwiseParallel(
        output_layouts=Replicate())})


def case_tp():
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for max_norm in (None, 0.5):
        a, b = tp(model(), mesh), tp(model(), mesh)
        placements = {p.placements for p in a.parameters()}
        assert {(Shard(0),), (Shard(1),), (Replicate(),)} <= placements, placements
        ours, theirs = pair(S.OneCycleLR(max_lr=0.02, total_steps=STEPS), max_norm)
        train_both(a, b, ours, theirs, max_norm, same_batches(False))


def case_fsdp_tp():
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    for max_norm in (None, 0.5):
        a = fsdp(tp(model(), mesh["tp"]), mesh["dp"])
        b = fsdp(tp(model(), mesh["tp"]), mesh["dp"])
        assert all(p.device_mesh.ndim == 2 for p in a.parameters())
        ours, theirs = pair(S.StepLR(step_size=4, gamma=0.5), max_norm)

        def dp_batch(step):  # the same data across the tp ranks of a dp rank
            g = torch.Generator().manual_seed(1000 * step + mesh["dp"].get_local_rank())
            return torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
        train_both(a, b, ours, theirs, max_norm, dp_batch)


def case_zero():
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP
    a, b = DDP(model()), DDP(model())
    max_norm = 0.5
    folder = sys.argv[5]

    def ours(params):
        return ZeroRedundancyOptimizer(params, optimizer_class=fusedlr.AdamW, lr=0.01, weight_decay=0.1,
                                       schedule=S.StepLR(step_size=4, gamma=0.5), max_grad_norm=max_norm,
                                       partition_group=dist.group.WORLD)

    def theirs(params):
        o = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, lr=0.01, weight_decay=0.1,
                                    foreach=False)
        return o, torch.optim.lr_scheduler.StepLR(o, step_size=4, gamma=0.5)

    def save_both(name):
        # ZeRO's checkpoint: the ranks' states gathered to rank 0 (pickled: fusedlr's saved groups carry
        # no process group), then saved without the process group ZeRO keeps in its own groups
        opt.consolidate_state_dict(to=0)
        ref.consolidate_state_dict(to=0)
        if dist.get_rank() == 0:
            saved = opt.state_dict()
            assert len(saved["state"]) == len(list(a.parameters()))  # every rank's partition
            for group in saved["param_groups"]:
                group.pop("partition_group", None)
            torch.save({"ours": saved, "theirs": ref.state_dict(), "sched": sched.state_dict()},
                       os.path.join(folder, name))
        dist.barrier()
        return [p.detach().clone() for p in a.parameters()], [q.detach().clone() for q in b.parameters()]

    def run(steps):
        for step in steps:
            x, y = same_batches(True)(step)
            for m in (a, b):
                (((m(x) - y) ** 2).mean() * (30.0 if step % 3 == 0 else 1.0)).backward()
            norm = float(torch.nn.utils.clip_grad_norm_(list(b.parameters()), max_norm))
            opt.step()
            ref.step()
            sched.step()
            got = float(opt.optim.last_grad_norm())  # this rank's partition, the norm of the whole model
            assert math.isclose(got, norm, rel_tol=1e-5), (step, got, norm)
            for p, q in zip(a.parameters(), b.parameters()):
                torch.testing.assert_close(p.detach(), q.detach(), **TOL, msg=lambda m: f"step {step}: {m}")
            opt.zero_grad()
            ref.zero_grad()

    opt = ours(list(a.parameters()))
    ref, sched = theirs(list(b.parameters()))
    half = STEPS // 2
    run(range(half))
    weights = save_both("half.pt")
    run(range(half, STEPS))
    # ZeRO's load_state_dict writes the loaded state into fusedlr's optimizer past its load_state_dict:
    # the trained optimizer takes it (its moments, not its own later ones) and resumes its schedule
    # from the state's step counts, as torch's twins resume
    saved = torch.load(os.path.join(folder, "half.pt"), weights_only=False)
    opt.load_state_dict(saved["ours"])
    ref.load_state_dict(saved["theirs"])
    sched.load_state_dict(saved["sched"])
    with torch.no_grad():
        for params, values in ((a.parameters(), weights[0]), (b.parameters(), weights[1])):
            for p, v in zip(params, values):
                p.copy_(v)
    assert opt.optim.schedule_steps().tolist() == [half] * len(opt.optim.param_groups)
    assert math.isclose(float(opt.optim.last_lr()[0]), sched.get_last_lr()[0], rel_tol=1e-12)
    run(range(half, STEPS))
    save_both("end.pt")  # and saves again


def case_skip_agrees():
    """An inf on one rank only (GradScaler's flag or a gradient) skips the step on every rank."""
    a = fsdp(model())
    opt = fusedlr.AdamW(a.parameters(), lr=0.01, skip_nonfinite=True)
    for step in range(3):
        x, y = same_batches(True)(step)
        ((a(x) - y) ** 2).mean().backward()
        before = [p.detach().to_local().clone() for p in a.parameters()]
        steps = opt.schedule_steps().clone()
        if step == 1 and dist.get_rank() == 1:
            next(a.parameters()).grad.to_local()[0] = math.inf
        opt.step()
        opt.zero_grad()
        moved = any(not torch.equal(p.detach().to_local(), q) for p, q in zip(a.parameters(), before))
        assert moved == (step != 1) and int(opt.schedule_steps()[0]) == int(steps[0]) + (step != 1), step
    # GradScaler's found_inf on one rank
    opt2 = fusedlr.AdamW(a.parameters(), lr=0.01)
    x, y = same_batches(True)(0)
    ((a(x) - y) ** 2).mean().backward()
    opt2.step()
    ((a(x) - y) ** 2).mean().backward()
    before = [p.detach().to_local().clone() for p in a.parameters()]
    opt2.found_inf = torch.tensor([1.0 if dist.get_rank() == 0 else 0.0])
    opt2.grad_scale = torch.tensor([1.0])
    opt2.step()
    assert all(torch.equal(p.detach().to_local(), q) for p, q in zip(a.parameters(), before))
    assert int(opt2.schedule_steps()[0]) == 1
    # a NaN in one rank's copy of a replicated gradient (a Rowwise bias; the lowest rank's copy is
    # the one the norm counts): every rank skips, the replicas stay alike
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    t = tp(model(), mesh)
    bias = t[2].bias
    assert bias.placements == (Replicate(),)
    opt3 = fusedlr.AdamW(t.parameters(), lr=0.01, skip_nonfinite=True)
    for step in range(3):
        x, y = same_batches(False)(step)
        ((t(x) - y) ** 2).mean().backward()
        before = [p.detach().to_local().clone() for p in t.parameters()]
        if step == 1 and dist.get_rank() == dist.get_world_size() - 1:
            bias.grad.to_local()[0] = math.nan
        opt3.step()
        opt3.zero_grad()
        moved = [not torch.equal(p.detach().to_local(), q) for p, q in zip(t.parameters(), before)]
        assert (not any(moved)) if step == 1 else all(moved), (step, moved)
        assert int(opt3.schedule_steps()[0]) == [1, 1, 2][step], step
        copies = [torch.empty_like(bias.to_local()) for _ in range(dist.get_world_size())]
        dist.all_gather(copies, bias.detach().to_local())
        assert all(torch.equal(c, copies[0]) for c in copies), step


def case_dcp():
    """dcp.save / dcp.load through get_/set_optimizer_state_dict resume bitwise equal to an
    uninterrupted run, under FSDP2 and DDP, for several schedules including ReduceLROnPlateau, and
    with bfloat16 and 8-bit state rounded stochastically (its dtype and seed survive DCP's flattening;
    8-bit state is saved decoded, as float32 DTensors, and encodes to the same bytes on load)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    from torch.nn.parallel import DistributedDataParallel as DDP
    folder = sys.argv[5]
    schedules = [S.OneCycleLR(max_lr=0.02, total_steps=STEPS), S.ReduceLROnPlateau(patience=0, factor=0.5),
                 S.SequentialLR([S.LinearLR(start_factor=0.1, total_iters=3), S.CosineAnnealingLR(T_max=9)],
                                milestones=[3])]
    settings = [(schedule, {}) for schedule in schedules] + [
        (schedules[0], dict(state_dtype=dtype, stochastic_rounding=True, rounding_seed=5))
        for dtype in (torch.bfloat16, torch.float8_e4m3fn)]
    for wrap_name, wrap in (("fsdp2", fsdp), ("ddp", DDP)):
        for k, (schedule, storage) in enumerate(settings):
            def make(storage=storage):
                m = wrap(model())
                return m, fusedlr.AdamW(m.parameters(), lr=0.01, schedule=schedule, max_grad_norm=0.5, **storage)

            def run(m, opt, steps):
                for step in steps:
                    x, y = same_batches(True)(step)
                    loss = ((m(x) - y) ** 2).mean()
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
                    if isinstance(schedule, S.ReduceLROnPlateau):
                        opt.observe(torch.tensor(1.0))  # never improves: the lr falls every step
            whole, whole_opt = make()
            run(whole, whole_opt, range(STEPS))
            first, first_opt = make()
            run(first, first_opt, range(STEPS // 2))
            path = os.path.join(folder, f"{wrap_name}-{k}")
            dcp.save({"model": get_model_state_dict(first), "optim": get_optimizer_state_dict(first, first_opt)},
                     checkpoint_id=path)
            resumed, resumed_opt = make({})  # its storage settings come with the checkpoint's groups
            before = [local(p.detach()).clone() for p in resumed.parameters()]
            # set_optimizer_state_dict first steps the new optimizer with zero gradients and lr 0
            state = {"model": get_model_state_dict(resumed), "optim": get_optimizer_state_dict(resumed, resumed_opt)}
            assert all(torch.equal(local(p.detach()), q) for p, q in zip(resumed.parameters(), before))
            assert int(resumed_opt.schedule_steps()[0]) == 0
            dcp.load(state, checkpoint_id=path)
            set_model_state_dict(resumed, state["model"])
            set_optimizer_state_dict(resumed, resumed_opt, state["optim"])
            assert int(resumed_opt.schedule_steps()[0]) == STEPS // 2
            torch.testing.assert_close(resumed_opt.last_lr(), first_opt.last_lr(), rtol=0, atol=0)
            if storage:  # 8-bit state is held as its codes and scales (uint8), saved decoded
                held = torch.uint8 if storage["state_dtype"] == torch.float8_e4m3fn else torch.bfloat16
                assert all(state["exp_avg"].dtype == held for state in resumed_opt.state.values())
                assert resumed_opt.param_groups[0]["rounding_seed"] == 5
            run(resumed, resumed_opt, range(STEPS // 2, STEPS))
            for p, q in zip(whole.parameters(), resumed.parameters()):
                assert torch.equal(local(p.detach()), local(q.detach())), (wrap_name, k)
            torch.testing.assert_close(whole_opt.last_lr(), resumed_opt.last_lr(), rtol=0, atol=0)
    # a fusedlr checkpoint resumed by torch's AdamW through DCP, which loads every key of torch's own
    # state_dict: fusedlr's saved groups carry torch's (foreach, fused, ...), and torch goes on as
    # fusedlr does
    def run_plain(m, opt, steps):
        for step in steps:
            x, y = same_batches(True)(step)
            ((m(x) - y) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
    whole = fsdp(model())
    whole_opt = fusedlr.AdamW(whole.parameters(), lr=0.01, weight_decay=0.1)
    run_plain(whole, whole_opt, range(STEPS))
    first = fsdp(model())
    first_opt = fusedlr.AdamW(first.parameters(), lr=0.01, weight_decay=0.1)
    run_plain(first, first_opt, range(STEPS // 2))
    path = os.path.join(folder, "to-torch")
    dcp.save({"model": get_model_state_dict(first), "optim": get_optimizer_state_dict(first, first_opt)},
             checkpoint_id=path)
    resumed = fsdp(model())
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=0.01, weight_decay=0.1, foreach=False)
    state = {"model": get_model_state_dict(resumed), "optim": get_optimizer_state_dict(resumed, resumed_opt)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(resumed, state["model"])
    set_optimizer_state_dict(resumed, resumed_opt, state["optim"])
    run_plain(resumed, resumed_opt, range(STEPS // 2, STEPS))
    for p, q in zip(whole.parameters(), resumed.parameters()):
        torch.testing.assert_close(local(p.detach()), local(q.detach()), **TOL)


def case_state_init_step():
    """torch's state-initializing step (zero gradients, lr 0) changes neither parameters nor counters."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    m = fsdp(model())
    opt = fusedlr.AdamW(m.parameters(), lr=0.01, weight_decay=0.5, schedule=S.OneCycleLR(max_lr=0.1, total_steps=10))
    before = [p.detach().to_local().clone() for p in m.parameters()]
    get_optimizer_state_dict(m, opt)
    assert all(torch.equal(p.detach().to_local(), q) for p, q in zip(m.parameters(), before))
    assert opt.schedule_steps().tolist() == [0] and len(opt.state) == len(before)
    schedule = opt.param_groups[0]["schedule"]
    # the lrs DCP set to 0 for that step are back: the groups' own next lrs, the base lr untouched
    assert all(float(g["lr"]) == schedule(0, 0.01) and g["initial_lr"] == 0.01 for g in opt.param_groups)
    x, y = same_batches(True)(0)
    ((m(x) - y) ** 2).mean().backward()
    opt.step()  # a step as any first one: no lr conflict
    assert opt.schedule_steps().tolist() == [1]
    assert any(not torch.equal(p.detach().to_local(), q) for p, q in zip(m.parameters(), before))


def case_grad_scaler():
    """torch.amp.GradScaler with FSDP2: fusedlr unscales and clips in its step, by the global norm of
    the unscaled gradients; torch unscales, clips with clip_grad_norm_, then steps."""
    a, b = fsdp(model()), fsdp(model())
    opt = fusedlr.AdamW(a.parameters(), lr=0.01, weight_decay=0.1, max_grad_norm=0.5)
    ref = torch.optim.AdamW(b.parameters(), lr=0.01, weight_decay=0.1, foreach=False)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) for _ in range(2)]
    for step in range(STEPS):
        x, y = same_batches(True)(step)
        for m, scaler in zip((a, b), scalers):
            scaler.scale(((m(x) - y) ** 2).mean() * (30.0 if step % 3 == 0 else 1.0)).backward()
        scalers[1].unscale_(ref)
        norm = torch.nn.utils.clip_grad_norm_(list(b.parameters()), 0.5)
        norm = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
        for o, scaler in ((opt, scalers[0]), (ref, scalers[1])):
            scaler.step(o)
            scaler.update()
        assert math.isclose(float(opt.last_grad_norm()), norm, rel_tol=1e-5), (step, float(opt.last_grad_norm()), norm)
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p.to_local().detach(), q.to_local().detach(), **TOL)
        opt.zero_grad()
        ref.zero_grad()


def case_grad_placements():
    """A gradient of other placements than its parameter's is redistributed to the parameter's: the
    step equals one given the gradient in the parameter's placements."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    full = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    a, b = (nn.Parameter(distribute_tensor(full.clone(), mesh, [Shard(0)])) for _ in range(2))
    opt_a, opt_b = fusedlr.AdamW([a], lr=0.1), fusedlr.AdamW([b], lr=0.1)
    for step in range(3):
        grad = torch.randn(6, 4, generator=torch.Generator().manual_seed(step + 1))
        a.grad = distribute_tensor(grad, mesh, [Replicate()])
        b.grad = distribute_tensor(grad, mesh, [Shard(0)])  # b's placements, not b's own spec
        with CountedFallback() as fallback:
            opt_a.step()
            opt_b.step()
        assert fallback.read == 2 and [id(p) for p in fallback.params] == [id(a), id(b)], fallback.read
        assert torch.equal(a.to_local(), b.to_local()), step
    assert not torch.equal(a.full_tensor(), full)
    # a plain tensor as a DTensor parameter's gradient: refused, the optimizer as it was
    before = {key: local(value).clone() for key, value in opt_a.state[a].items()}
    assert "step" in before  # the step count, which the schedule reads
    param_before = a.to_local().clone()
    a.grad = torch.randn(6, 4)
    try:
        opt_a.step()
    except ValueError as e:
        assert "must be a DTensor" in str(e), e
    else:
        raise AssertionError("a plain gradient of a DTensor parameter was stepped")
    assert torch.equal(a.to_local(), param_before)
    for key, value in opt_a.state[a].items():
        assert torch.equal(local(value), before[key]), key
    # a plain parameter beside a DTensor one: a copy on every rank, its squares counted once
    c = nn.Parameter(torch.ones(5))
    opt = fusedlr.AdamW([a, c], lr=0.1, max_grad_norm=math.inf)
    a.grad = distribute_tensor(torch.full((6, 4), 2.0), mesh, [Shard(0)])
    c.grad = torch.full((5,), 3.0)
    opt.step()
    assert math.isclose(float(opt.last_grad_norm()), math.sqrt(24 * 4.0 + 5 * 9.0), rel_tol=1e-12)
    assert not torch.equal(c.detach(), torch.ones(5))


def case_nccl():
    """One rank on a GPU with NCCL: FSDP2 with clipping against torch, the norm's all-reduce queued
    on the stream without a host sync."""
    torch.cuda.set_device(0)
    for max_norm in (None, 0.5):
        a, b = fsdp(model().cuda()), fsdp(model().cuda())
        ours, theirs = pair(S.OneCycleLR(max_lr=0.02, total_steps=STEPS), max_norm)

        def batch_of(step):
            x, y = same_batches(True)(step)
            return x.cuda(), y.cuda()
        train_both(a, b, ours, theirs, max_norm, batch_of)
    opt = fusedlr.AdamW(a.parameters(), lr=0.01, max_grad_norm=0.5, skip_nonfinite=True)
    x, y = batch_of(0)
    ((a(x) - y) ** 2).mean().backward()
    opt.step()  # state created
    ((a(x) - y) ** 2).mean().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def case_settings_agree():
    """Settings that decide whether the norm's all-reduce runs, or by what factor it clips, differ
    across ranks: the first step raises the same error on every rank instead of hanging or clipping
    each shard by another factor, and changes nothing."""
    a = fsdp(model())
    rank = dist.get_rank()
    for name, kwargs, flags in (("max_grad_norm", dict(max_grad_norm=0.5 if rank == 0 else None), False),
                                ("max_grad_norm", dict(max_grad_norm=0.5 + rank), False),
                                ("skip_nonfinite", dict(skip_nonfinite=rank == 1), False),
                                ("GradScaler", {}, rank == 0)):
        opt = fusedlr.AdamW(a.parameters(), lr=0.01, **kwargs)
        if flags:
            opt.grad_scale, opt.found_inf = torch.tensor([1.0]), torch.tensor([0.0])
        x, y = same_batches(True)(0)
        ((a(x) - y) ** 2).mean().backward()
        before = [p.detach().to_local().clone() for p in a.parameters()]
        try:
            opt.step()
        except ValueError as e:
            assert "differ in " + name in str(e), e
        else:
            raise AssertionError(f"{name}: ranks of different settings stepped")
        assert all(torch.equal(p.detach().to_local(), q) for p, q in zip(a.parameters(), before)), name
        assert not opt.state and int(opt.schedule_steps()[0]) == 0, name
        a.zero_grad()
    opt = fusedlr.AdamW(a.parameters(), lr=0.01, max_grad_norm=0.5, skip_nonfinite=True)
    for step in range(2):  # alike: checked once, then stepped
        x, y = same_batches(True)(step)
        ((a(x) - y) ** 2).mean().backward()
        opt.step()
        a.zero_grad()
    assert int(opt.schedule_steps()[0]) == 2


def case_bad_tensors():
    """A DTensor handed to the op itself, or a parameter with a null data pointer: an error, nothing
    changed, the process alive."""
    from fusedlr import _ops
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    d = distribute_tensor(torch.ones(4, 4), mesh, [Shard(0)])
    plain = torch.ones(2, 4)
    state = [torch.zeros(2, 4)]
    steps = torch.zeros(1, dtype=torch.int64)
    for params, grads in (([d], [d]), ([plain], [d])):
        try:
            _ops.step_("adam", params, grads, [[torch.zeros(2, 4)], [torch.zeros(2, 4)], [torch.empty(0)],
                                               [torch.empty(0)]],
                       [steps.view(())], [0], [0.1, 0.9, 0.999, 1e-8, 0, 0, 0, 1], [1.0, 0.0, 1.0],
                       torch.zeros(1, dtype=torch.int64), _ops.initial_plateau_state(1, "cpu"))
        except (RuntimeError, ValueError) as e:
            assert "DTensor" in str(e) or "subclass" in str(e) or "mixed" in str(e), e
        else:
            raise AssertionError("a DTensor reached the kernel")
    assert torch.equal(plain, torch.ones(2, 4)) and int(steps) == 0 and torch.equal(state[0], torch.zeros(2, 4))


def case_compile():
    """torch.compile(fullgraph=True) of the step over FSDP2's DTensor parameters: one graph for the
    whole run (no recompile per step), equal to the eager step (to rounding: the compiled norm adds
    in another order), clipping by the global norm too."""
    from torch._dynamo.utils import counters
    for max_norm in (None, 0.5):
        torch._dynamo.reset()
        counters.clear()
        a, b = fsdp(model()), fsdp(model())
        schedule = S.OneCycleLR(max_lr=0.02, total_steps=STEPS)
        compiled, eager = (fusedlr.AdamW(m.parameters(), lr=0.01, weight_decay=0.1, schedule=schedule,
                                         max_grad_norm=max_norm) for m in (a, b))

        @torch.compile(fullgraph=True)
        def step():
            compiled.step()

        batch_of = same_batches(True)
        for k in range(STEPS):
            x, y = batch_of(k)
            for m in (a, b):
                (((m(x) - y) ** 2).mean() * (30.0 if k % 3 == 0 else 1.0)).backward()
            (step if k > 0 else compiled.step)()  # the state exists before compiling, as after a warm-up step
            eager.step()
            for (name, p), q in zip(a.named_parameters(), b.parameters()):
                assert isinstance(p, DTensor) and p.placements == q.placements, name
                torch.testing.assert_close(p.to_local(), q.to_local(), **TOL, msg=lambda m: f"step {k}, {name}: {m}")
            if max_norm is not None:  # compiled, the local sums of squares add in another order
                assert math.isclose(float(compiled.last_grad_norm()), float(eager.last_grad_norm()), rel_tol=1e-5), k
            # gradients kept (zeroed in place), as for any compiled step: a new gradient is a new graph input
            a.zero_grad(set_to_none=False)
            b.zero_grad(set_to_none=False)
        assert float(compiled.last_lr()[0]) == float(eager.last_lr()[0]) == schedule(STEPS, 0.01)
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def main():
    case, rank, world, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    backend = "nccl" if case == "nccl" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        globals()[f"case_{case}"]()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    print(f"rank {rank}: {case} ok", flush=True)


if __name__ == "__main__":
    main()
    # gloo's worker threads outlive destroy_process_group once FSDP2 or a mesh has used the group
    # (torch 2.14); one that frees a tensor during Python's shutdown aborts the process after the case
    # passed (examples/fsdp_train.py says more). The case is done and reported: skip that shutdown.
    sys.stderr.flush()
    os._exit(0)
