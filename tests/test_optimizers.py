"""Every optimizer of the registry (tests/registry.py) + schedule against its reference (torch.optim.<Opt>
(foreach=False), or a float64 reference where torch has none) + the schedule's torch twin, step by
step, with fresh random gradients."""

import math
import warnings

import pytest
import torch

import fusedlr
from fusedlr import schedules as S
from registry import OPTIMIZERS as REGISTRY
from twins import SCHEDULES, time_unit, torch_twin

warnings.filterwarnings("ignore", message=".*lr_scheduler.step\\(\\)")

# In float64 both sides round the same operations in the same order (csrc/update_math.h, [note:
# rounding order]); what differs is torch's recursive lr (1e-13 relative drift) and the odd ulp.
# Over 200 steps that stays below 1e-11; a wrong formula is off by far more than 1e-9.
F64_TOL = dict(rtol=1e-9, atol=1e-11)

# (fusedlr class, reference, settings) of every optimizer of the registry, and of its variants
OPTIMIZERS = {name: (entry.fused, entry.reference, entry.kwargs) for name, entry in REGISTRY.items()}
VARIANTS = {f"{name}-{variant}": (entry.fused, entry.reference, kwargs)
            for name, entry in REGISTRY.items() for variant, kwargs in entry.variants.items()}
# The last spans two chunks of the CPU and CUDA kernels, the second with a scalar tail.
SHAPES = [(17, 9), (33,), (4, 3, 5), (1,), (70_001,)]


def make_params(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for shape in SHAPES]


def assert_close_but_sign_flips(actual, expected, tol, flips, msg):
    """assert_close, but for `flips` = (the share of elements, the largest difference) that may lie
    farther apart: where a sign update rounded its argument apart from the reference's."""
    if flips is None:
        torch.testing.assert_close(actual, expected, **tol, msg=msg)
        return
    share, largest = flips
    off = ~torch.isclose(actual, expected, **tol)
    assert int(off.sum()) <= share * actual.numel(), msg(f"{int(off.sum())} of {actual.numel()} elements differ")
    assert float((actual - expected).abs().max()) <= largest, msg("a difference larger than the sign flips allow")


def compare_state(fused_opt, torch_opt, fused_params, torch_params, tol, where, flips=None):
    """Parameters and every tensor of torch_opt's state (step counts exactly), compared on the CPU."""
    for i, (p, q) in enumerate(zip(fused_params, torch_params)):
        assert_close_but_sign_flips(p.detach().cpu(), q.detach().cpu(), tol, flips,
                                    msg=lambda m: f"{where}, param {i}: {m}")
        fs, ts = fused_opt.state.get(p, {}), torch_opt.state.get(q, {})
        assert bool(fs) or not ts, f"{where}: param {i} has no state, torch's has"
        for key, value in ts.items():
            if key == "step":
                assert int(fs["step"]) == int(value), f"{where}, param {i}: step"
            elif value is not None:
                assert_close_but_sign_flips(fs[key].cpu(), value.cpu(), tol, flips,
                                            msg=lambda m: f"{where}, param {i}, {key}: {m}")


def run_parity(fused_cls, torch_cls, kwargs, schedule, steps=200, dtype=torch.float64, tol=F64_TOL, seed=0,
               device="cpu", cpu_tol=None, compare_every=1, max_grad_norm=None, flips=None):
    """fusedlr on `device` against torch.optim (for-loop) + its scheduler twin on `device`, with the same
    fresh random gradients; parameter 2 has no gradient every 7th step (torch skips it: its state and
    step stay). With cpu_tol, a fusedlr run on the CPU is compared as well. Compared every
    compare_every steps and after the last, the lr at every compare_every-th step.

    With max_grad_norm, fusedlr clips in its step and torch runs clip_grad_norm_ before its step; the
    gradients' scale then varies over three decades, so some steps clip and some do not, and the
    norms are compared too."""
    start = make_params(dtype, seed)
    fused, ref, cpu = ([p.to(device, copy=True).requires_grad_() for p in start] for device in (device, device, "cpu"))
    fused_kwargs = dict(kwargs, schedule=schedule)
    if max_grad_norm is not None:
        fused_kwargs["max_grad_norm"] = max_grad_norm
    fused_opt = fused_cls(fused, **fused_kwargs)
    torch_opt = torch_cls(ref, foreach=False, **kwargs)
    cpu_opt = fused_cls(cpu, **fused_kwargs) if cpu_tol is not None else None
    torch_sched = torch_twin(schedule, torch_opt) if schedule is not None else None
    unit = time_unit(schedule) if schedule is not None else 1
    gen = torch.Generator().manual_seed(seed + 1)
    clipped = 0
    for k in range(steps):
        if torch_sched is not None and k % compare_every == 0:  # a host sync on a GPU
            expected_lr = torch_sched.get_last_lr()[0]
            assert float(fused_opt.last_lr()[0]) == pytest.approx(expected_lr, rel=1e-9, abs=1e-15), f"lr at {k}"
        for i, (p, q, r) in enumerate(zip(fused, ref, cpu)):
            if i == 2 and k % 7 == 3:
                p.grad = q.grad = r.grad = None
                continue
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if max_grad_norm is not None:
                g = g * 10.0 ** (k % 13 / 4 - 2)
            g = g.to(dtype)
            p.grad, q.grad, r.grad = g.to(device, copy=True), g.to(device, copy=True), g.clone()
        fused_opt.step()
        if max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(ref, max_grad_norm, foreach=False)
            clipped += bool(norm > max_grad_norm)
            torch.testing.assert_close(fused_opt.last_grad_norm().cpu(), norm.cpu().double(),
                                       rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=0,
                                       msg=lambda m: f"grad norm at step {k}: {m}")
        torch_opt.step()
        if cpu_opt is not None:
            cpu_opt.step()
        if torch_sched is not None and (k + 1) % unit == 0 and not (
                isinstance(schedule, S.OneCycleLR) and k + 1 >= schedule.n_steps):
            torch_sched.step()
        if (k + 1) % compare_every == 0 or k + 1 == steps:
            compare_state(fused_opt, torch_opt, fused, ref, tol, f"torch, step {k}", flips)
            if cpu_opt is not None:
                compare_state(fused_opt, cpu_opt, fused, cpu, cpu_tol, f"cpu, step {k}")
    assert fused_opt.schedule_steps().tolist() == [steps]
    if max_grad_norm is not None:
        assert 0.2 * steps < clipped < 0.8 * steps, f"{clipped} of {steps} steps clipped: the test tests too little"


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_parity_every_schedule_and_optimizer(optimizer, schedule):
    fused_cls, torch_cls, kwargs = OPTIMIZERS[optimizer]
    run_parity(fused_cls, torch_cls, kwargs, SCHEDULES[schedule])


@pytest.mark.parametrize("schedule", ["none", "OneCycleLR", "CyclicLR-triangular2", "SequentialLR", "StepLR"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parity_variants(variant, schedule):
    fused_cls, torch_cls, kwargs = VARIANTS[variant]
    run_parity(fused_cls, torch_cls, kwargs, SCHEDULES[schedule])


def float32_flips(optimizer, steps=200):
    """For a sign update in float32: an element whose argument an ulp apart from the reference's
    crosses 0 steps 2 lr apart (at most max_lr of OneCycleLR per step, 25 times the base lr);
    with arguments of order 1 that is about one element-step in 10^7, so 1e-4 of the elements is
    far above chance and far below a wrong update, which would move most of them."""
    entry = REGISTRY[optimizer]
    return (1e-4, 2 * 25 * entry.kwargs["lr"] * steps) if entry.sign_update else None


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_parity_float32(optimizer):
    """float32: the same operations in float32, but ATen's vector kernels fuse some multiply-adds, so
    each step may round differently by an ulp. Values (momentum buffers included) stay below ~10,
    where an ulp is 1e-6: 1e-5 is ten ulps, far under any formula error."""
    fused_cls, torch_cls, kwargs = OPTIMIZERS[optimizer]
    run_parity(fused_cls, torch_cls, kwargs, SCHEDULES["OneCycleLR"], dtype=torch.float32,
               tol=dict(rtol=1e-5, atol=1e-5), flips=float32_flips(optimizer))


def test_per_group_schedules_and_hyperparameters():
    """Each group runs its own schedule, lr, betas and weight decay: the same as one torch optimizer
    + scheduler per group."""
    groups = [
        (S.OneCycleLR(max_lr=0.03, total_steps=200), dict(lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)),
        (S.SequentialLR([S.LinearLR(start_factor=0.1, total_iters=20), S.ExponentialLR(gamma=0.99)],
                        milestones=[20]), dict(lr=0.02, betas=(0.8, 0.999), weight_decay=0.0)),
        (None, dict(lr=0.005, betas=(0.95, 0.98), weight_decay=0.01)),
    ]
    params = make_params(torch.float64, 3)[:3]
    fused_params = [p.clone().requires_grad_() for p in params]
    torch_params = [p.clone().requires_grad_() for p in params]
    fused_opt = fusedlr.AdamW([dict(params=[p], schedule=s, **kw) for p, (s, kw) in zip(fused_params, groups)])
    torch_opts = [torch.optim.AdamW([q], foreach=False, **kw) for q, (s, kw) in zip(torch_params, groups)]
    torch_scheds = [torch_twin(s, o) if s is not None else None for o, (s, kw) in zip(torch_opts, groups)]
    gen = torch.Generator().manual_seed(5)
    for k in range(200):
        expected = [sch.get_last_lr()[0] if sch else kw["lr"] for sch, (s, kw) in zip(torch_scheds, groups)]
        assert fused_opt.last_lr().tolist() == pytest.approx(expected, rel=1e-9)
        for p, q in zip(fused_params, torch_params):
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.grad, q.grad = g.clone(), g.clone()
        fused_opt.step()
        for o, sch in zip(torch_opts, torch_scheds):
            o.step()
            if sch is not None and k < 199:
                sch.step()
        for p, q in zip(fused_params, torch_params):
            torch.testing.assert_close(p, q, **F64_TOL)


def test_last_momentum_follows_cycle():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = fusedlr.Adam([p], betas=(0.9, 0.999), schedule=S.OneCycleLR(max_lr=0.1, total_steps=100))
    assert float(opt.last_momentum()[0]) == pytest.approx(0.95)
    plain = fusedlr.Adam([torch.nn.Parameter(torch.zeros(3))], betas=(0.7, 0.999))
    assert float(plain.last_momentum()[0]) == pytest.approx(0.7)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_low_precision_steps_round_an_fp32_update(device, dtype, amsgrad):
    """bf16 / fp16 parameters with fp32 state: each step equals torch's fp32 AdamW step from the same
    values (parameter upcast, state copied), rounded once to the parameter's dtype: at most one ulp
    apart where the fp32 results straddle a rounding boundary."""
    gen = torch.Generator().manual_seed(11)
    p = torch.nn.Parameter(torch.randn(4096, generator=gen).to(device=device, dtype=dtype))
    schedule = S.OneCycleLR(max_lr=0.01, total_steps=60)
    opt = fusedlr.AdamW([p], lr=0.01, amsgrad=amsgrad, weight_decay=0.1, schedule=schedule)
    ulp = torch.finfo(dtype).eps
    for k in range(60):
        grad = torch.randn(4096, generator=gen).to(device=device, dtype=dtype)
        ref_param = torch.nn.Parameter(p.detach().float())
        ref = torch.optim.AdamW([ref_param], lr=schedule(k), betas=(schedule.momentum(k), 0.999), amsgrad=amsgrad,
                                weight_decay=0.1, foreach=False)
        if k:
            ref.state[ref_param] = {key: (value.clone().float() if key != "step" else value.clone().float())
                                    for key, value in opt.state[p].items()}
        ref_param.grad = grad.float()
        p.grad = grad
        opt.step()
        ref.step()
        expected = ref_param.detach().to(dtype).float()
        diff = (p.detach().float() - expected).abs()
        assert (diff <= ulp * expected.abs().clamp_min(torch.finfo(dtype).tiny)).all(), k
        assert (diff == 0).float().mean() > 0.95, k  # nearly all elements round identically
        for key in ("exp_avg", "exp_avg_sq"):
            # ATen's kernels fuse some multiply-adds: an ulp or so of values of order 1
            torch.testing.assert_close(opt.state[p][key], ref.state[ref_param][key], rtol=1e-5, atol=1e-7)


def test_parameters_without_gradients_are_skipped():
    a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    opt = fusedlr.Adam([a, b], lr=0.1)
    a.grad = torch.ones(4)
    opt.step()
    assert b not in opt.state and torch.equal(b.detach(), torch.ones(4))
    assert int(opt.state[a]["step"]) == 1
    opt.step()  # a keeps its (stale) gradient, b still has none
    assert int(opt.state[a]["step"]) == 2 and b not in opt.state
    assert int(opt.schedule_steps()[0]) == 2


def test_step_with_no_gradients_still_advances_the_schedule():
    """torch's scheduler.step() counts steps whether or not any parameter had a gradient."""
    p = torch.nn.Parameter(torch.ones(4))
    opt = fusedlr.SGD([p], lr=1.0, schedule=S.StepLR(step_size=1, gamma=0.5))
    opt.step()
    opt.step()
    assert float(opt.last_lr()[0]) == 0.25 and torch.equal(p.detach(), torch.ones(4))


def test_closure_and_zero_grad():
    p = torch.nn.Parameter(torch.tensor([2.0]))
    opt = fusedlr.SGD([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == 4.0 and p.item() == pytest.approx(2.0 - 0.1 * 4.0)
    opt.zero_grad()
    assert p.grad is None


def test_add_param_group_mid_run_starts_its_own_schedule():
    a = torch.nn.Parameter(torch.ones(2))
    opt = fusedlr.SGD([a], lr=1.0, schedule=S.StepLR(step_size=1, gamma=0.5))
    a.grad = torch.ones(2)
    opt.step()
    b = torch.nn.Parameter(torch.ones(2))
    opt.add_param_group({"params": [b], "lr": 0.2})
    b.grad = torch.ones(2)
    opt.step()
    # The new group takes the default schedule, counted from its own first step.
    assert opt.last_lr().tolist() == [0.25, 0.1]
    assert b.detach().tolist() == pytest.approx([0.8, 0.8])
    assert opt.schedule_steps().tolist() == [2, 1]


def test_channels_last_and_noncontiguous_gradients():
    p = torch.nn.Parameter(torch.randn(2, 3, 4, 5, dtype=torch.float64).to(memory_format=torch.channels_last))
    q = torch.nn.Parameter(p.detach().clone())
    fused = fusedlr.AdamW([p], lr=0.01)
    ref = torch.optim.AdamW([q], lr=0.01, foreach=False)
    for _ in range(5):
        g = torch.randn(2, 3, 4, 5, dtype=torch.float64)  # contiguous: another layout than p
        p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        ref.step()
    torch.testing.assert_close(p, q, **F64_TOL)
    assert p.is_contiguous(memory_format=torch.channels_last)


def test_deepcopy_keeps_device_state():
    import copy
    p = torch.nn.Parameter(torch.ones(2))
    opt = fusedlr.SGD([p], lr=1.0, schedule=S.StepLR(step_size=1, gamma=0.5))
    p.grad = torch.ones(2)
    opt.step()
    clone = copy.deepcopy(opt)
    assert clone.last_lr().tolist() == [0.5] and math.isclose(float(opt.last_lr()[0]), 0.5)


def test_step_hooks_run():
    """step() skips torch's profiling wrapper when nothing listens, and runs hooks when they exist."""
    p = torch.nn.Parameter(torch.ones(2))
    opt = fusedlr.SGD([p], lr=0.5)
    calls = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    post = opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    from torch.optim.optimizer import register_optimizer_step_post_hook
    glob = register_optimizer_step_post_hook(lambda o, args, kwargs: calls.append("global"))
    p.grad = torch.ones(2)
    opt.step()
    assert calls == ["pre", "post", "global"] and p.detach().tolist() == [0.5, 0.5]
    for handle in (pre, post, glob):
        handle.remove()
    opt.step()
    assert calls == ["pre", "post", "global"] and p.detach().tolist() == [0.0, 0.0]


def test_step_is_recorded_by_the_profiler():
    """Under torch.profiler the step runs in torch's profiling wrapper, as torch's optimizers do."""
    p = torch.nn.Parameter(torch.ones(2))
    opt = fusedlr.AdamW([p], lr=0.5)
    p.grad = torch.ones(2)
    opt.step()  # the common step, outside the profiler
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    names = [event.name for event in prof.events()]
    assert "Optimizer.step#AdamW.step" in names


def test_step_updates_parameter_version_counters():
    p = torch.nn.Parameter(torch.ones(2))
    opt = fusedlr.Adam([p], lr=0.5)
    p.grad = torch.ones(2)
    before = p._version
    opt.step()
    assert p._version > before


def test_many_parameters_match_torch():
    """1,200 parameters (the CPU step gathers them on all threads), some without a gradient and some
    with a gradient in another layout (transposed), against torch for-loop AdamW."""
    gen = torch.Generator().manual_seed(9)
    start = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(1200)]
    fused = [p.clone().requires_grad_() for p in start]
    ref = [p.clone().requires_grad_() for p in start]
    opt = fusedlr.AdamW(fused, lr=0.01, weight_decay=0.1, schedule=S.StepLR(step_size=2))
    ref_opt = torch.optim.AdamW(ref, lr=0.01, weight_decay=0.1, foreach=False)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2)
    for k in range(6):
        for i, (p, q) in enumerate(zip(fused, ref)):
            if (i + k) % 5 == 0:
                p.grad = q.grad = None
                continue
            g = torch.randn(3, 4, generator=gen, dtype=torch.float64)
            p.grad = g.t() if i % 3 == 0 else g.t().contiguous()
            q.grad = g.t().contiguous()
        opt.step()
        ref_opt.step()
        ref_sched.step()
    compare_state(opt, ref_opt, fused, ref, F64_TOL, "after 6 steps")


def test_lion_defaults_and_the_sign_of_zero():
    """Lion's defaults are the paper's (lr 1e-4, betas (0.9, 0.99), no decay); its update is lr per
    element in the direction of -sign(c), none where c is 0 (torch.sign(0) = 0), and the decay
    multiplies first."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64))
    opt = fusedlr.Lion([p])
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-4, (0.9, 0.99), 0.0)
    opt.param_groups[0]["weight_decay"] = 0.5
    p.grad = torch.tensor([2.0, -1e-30, 0.0, -7.0], dtype=torch.float64)
    opt.step()
    decay = 1 - 1e-4 * 0.5
    expected = torch.tensor([1.0 * decay - 1e-4, -2.0 * decay + 1e-4, 0.5 * decay, 3.0 * decay + 1e-4],
                            dtype=torch.float64)
    assert torch.equal(p.detach(), expected)
    assert torch.equal(opt.state[p]["exp_avg"], (1 - 0.99) * p.grad)
    assert set(opt.state[p]) == {"step", "exp_avg"} and int(opt.state[p]["step"]) == 1
