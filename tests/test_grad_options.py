"""Gradient clipping (max_grad_norm), non-finite skips (skip_nonfinite) and fp32 master weights
(master_weights) against torch: clip_grad_norm_ + torch.optim, a run without the skipped steps, and
an fp32 reference."""

import copy
import math

import pytest
import torch

import fusedlr
from fusedlr import _state
from fusedlr import schedules as S
from registry import OPTIMIZERS as REGISTRY
from test_optimizers import F64_TOL, OPTIMIZERS, VARIANTS, float32_flips, make_params, run_parity
from test_state_dict import assert_unchanged, snapshot
from twins import SCHEDULES

MAX_NORM = 20.0  # run_parity's gradient norms span about 2.6 to 2600


@pytest.mark.parametrize("schedule", ["none", "OneCycleLR", "CosineAnnealingWarmRestarts", "SequentialLR"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_clipping_matches_clip_grad_norm(optimizer, schedule):
    fused_cls, torch_cls, kwargs = OPTIMIZERS[optimizer]
    run_parity(fused_cls, torch_cls, kwargs, SCHEDULES[schedule], max_grad_norm=MAX_NORM)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_clipping_variants(variant):
    fused_cls, torch_cls, kwargs = VARIANTS[variant]
    run_parity(fused_cls, torch_cls, kwargs, SCHEDULES["StepLR"], max_grad_norm=MAX_NORM)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_clipping_float32(optimizer):
    """float32: torch sums the squares in float32, fusedlr in float64, so the norms (and the clip
    factors) differ by float32 roundings, 1e-6 relative; the parameters stay within ten ulps as in
    test_parity_float32."""
    fused_cls, torch_cls, kwargs = OPTIMIZERS[optimizer]
    run_parity(fused_cls, torch_cls, kwargs, SCHEDULES["OneCycleLR"], dtype=torch.float32,
               tol=dict(rtol=1e-5, atol=1e-5), max_grad_norm=MAX_NORM, flips=float32_flips(optimizer))


def test_norm_does_not_depend_on_the_thread_count():
    """The norm is summed by chunks in a fixed order: bitwise the same on one thread and on all. Its
    float32 squares are summed in float32 by blocks of 16 (csrc/cpu, [note: sum of squares]): within
    1e-6 of the exact norm."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(n, generator=gen).requires_grad_() for n in (300_000, 70_001, 5)]
    norms = []
    threads = torch.get_num_threads()
    try:
        for n in (1, max(threads, 2)):
            torch.set_num_threads(n)
            opt = fusedlr.AdamW([p.detach().clone().requires_grad_() for p in params], max_grad_norm=math.inf)
            for p, q in zip(opt.param_groups[0]["params"], params):
                p.grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(q.numel()))
            opt.step()
            norms.append(float(opt.last_grad_norm()))
    finally:
        torch.set_num_threads(threads)
    assert norms[0] == norms[1]
    expected = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in opt.param_groups[0]["params"]))
    assert norms[0] == pytest.approx(expected, rel=1e-6)


def test_infinite_max_norm_reports_the_norm_without_clipping():
    params = make_params(torch.float64, 0)
    opt = fusedlr.SGD([p.clone().requires_grad_() for p in params], lr=0.1, max_grad_norm=math.inf)
    ref = torch.optim.SGD([p.clone().requires_grad_() for p in params], lr=0.1, foreach=False)
    assert math.isnan(float(opt.last_grad_norm()))
    for p, q in zip(opt.param_groups[0]["params"], ref.param_groups[0]["params"]):
        p.grad = torch.full_like(p, 100.0)
        q.grad = p.grad.clone()
    opt.step()
    ref.step()
    total = sum(p.numel() for p in params)
    assert float(opt.last_grad_norm()) == pytest.approx(100 * math.sqrt(total), rel=1e-14)
    for p, q in zip(opt.param_groups[0]["params"], ref.param_groups[0]["params"]):
        torch.testing.assert_close(p, q, **F64_TOL)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("clip", [None, 5.0])
def test_nonfinite_gradients_skip_the_step(optimizer, clip):
    """NaN, inf and -inf put into one element of a random tensor at random steps: those steps change
    nothing, bitwise, and the run equals torch's optimizer and scheduler that never took them."""
    fused_cls, torch_cls, kwargs = OPTIMIZERS[optimizer]
    schedule = S.StepLR(step_size=3, gamma=0.7)
    start = make_params(torch.float64, 5)
    fused = [p.clone().requires_grad_() for p in start]
    ref = [p.clone().requires_grad_() for p in start]
    opt = fused_cls(fused, schedule=schedule, skip_nonfinite=True, max_grad_norm=clip, **kwargs)
    ref_opt = torch_cls(ref, foreach=False, **kwargs)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=3, gamma=0.7)
    gen = torch.Generator().manual_seed(6)
    poisoned = sorted(torch.randperm(60, generator=gen)[:12].tolist())
    for k in range(60):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in start]
        for p, g in zip(fused, grads):
            p.grad = g.clone()
        if k in poisoned:
            bad = [math.nan, math.inf, -math.inf][k % 3]
            victim = fused[int(torch.randint(len(fused), (1,), generator=gen))]
            victim.grad.view(-1)[int(torch.randint(victim.numel(), (1,), generator=gen))] = bad
            before = snapshot(opt, fused)
            opt.step()
            assert not math.isfinite(float(opt.last_grad_norm()))
            assert_unchanged(before, opt, fused)
            continue
        opt.step()
        for q, g in zip(ref, grads):
            q.grad = g
        if clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(ref, clip, foreach=False)
            assert float(opt.last_grad_norm()) == pytest.approx(float(norm), rel=1e-12)
        ref_opt.step()
        ref_sched.step()
    assert opt.schedule_steps().tolist() == [60 - len(poisoned)]
    assert float(opt.last_lr()[0]) == pytest.approx(ref_sched.get_last_lr()[0], rel=1e-12)
    for p, q in zip(fused, ref):
        torch.testing.assert_close(p, q, **F64_TOL)
        for key, value in ref_opt.state[q].items():
            if key != "step" and value is not None:
                torch.testing.assert_close(opt.state[p][key], value, **F64_TOL)


def test_nonfinite_gradient_without_skip_reaches_the_parameters_as_in_torch():
    """skip_nonfinite=False is torch's behaviour: the NaN goes through (and the norm says so)."""
    p = torch.zeros(4, requires_grad=True)
    opt = fusedlr.SGD([p], lr=0.1, max_grad_norm=1.0)
    p.grad = torch.tensor([1.0, math.nan, 0.0, 0.0])
    opt.step()
    assert math.isnan(float(opt.last_grad_norm())) and bool(p.isnan().all())
    assert opt.schedule_steps().tolist() == [1]


# -- master weights ---------------------------------------------------------------------------------


def bf16_runs(optimizer_cls, kwargs, steps=300, seed=0):
    """An fp32 model and two bf16 copies, one with master weights, trained on the same bf16
    gradients; returns the three optimizers."""
    gen = torch.Generator().manual_seed(seed)
    start = [torch.randn(n, generator=gen) for n in (1000, 70_001, 7)]
    start = [p.bfloat16().float() for p in start]  # representable in bf16: all three start equal
    ref = [p.clone().requires_grad_() for p in start]
    master = [p.bfloat16().requires_grad_() for p in start]
    plain = [p.bfloat16().requires_grad_() for p in start]
    opts = (optimizer_cls(ref, **kwargs), optimizer_cls(master, master_weights=True, **kwargs),
            optimizer_cls(plain, **kwargs))
    for _ in range(steps):
        # a drift the same way every step, as a loss keeps pulling: tiny updates add up
        grads = [(torch.randn(p.shape, generator=gen) * 0.3 + 1).bfloat16() for p in start]
        for group, convert in zip((ref, master, plain), (torch.Tensor.float, torch.Tensor.clone, torch.Tensor.clone)):
            for p, g in zip(group, grads):
                p.grad = convert(g)
        for opt in opts:
            opt.step()
    return opts


@pytest.mark.parametrize("optimizer", list(REGISTRY))
def test_master_weights_follow_the_float32_run(optimizer):
    """The master weights are the fp32 run itself (same operations in fp32: bitwise equal, as the
    fp32 and bf16 loops share one update), each parameter its master weight rounded to bf16; without
    master weights the bf16 model drifts from the fp32 one by far more than a bf16 rounding."""
    fused_cls = REGISTRY[optimizer].fused
    kwargs = dict(REGISTRY[optimizer].alike, lr=1e-4)  # updates below a bf16 ulp of the parameters
    ref_opt, master_opt, plain_opt = bf16_runs(fused_cls, kwargs)
    params = [g["params"] for g in (ref_opt.param_groups[0], master_opt.param_groups[0], plain_opt.param_groups[0])]
    master_error, plain_error = [], []
    for ref, master, plain in zip(*params):
        master_weight = master_opt.state[master]["master_weight"]
        assert master_weight.dtype == torch.float32
        assert torch.equal(master_weight, ref.detach())
        # rounded to nearest, ties away from zero (fusedlr/_state.py, [note: remainders]): torch's
        # round-to-nearest-even differs on exact ties only
        assert torch.equal(master.detach(), _state.split_master(master_weight)[0])
        ties = (master_weight.view(torch.int32) & 0xFFFF) == 0x8000
        assert torch.equal(master.detach()[~ties], master_weight.bfloat16()[~ties])
        for name, value in ref_opt.state[ref].items():
            assert torch.equal(master_opt.state[master][name], value), name
        master_error.append((master.detach().float() - ref.detach()).abs())
        plain_error.append((plain.detach().float() - ref.detach()).abs())
        # one bf16 rounding: at most half an ulp, 2**-8 of the value
        assert bool((master_error[-1] <= 2.0 ** -8 * ref.detach().abs()).all())
    master_error, plain_error = torch.cat(master_error).mean(), torch.cat(plain_error).mean()
    # without master weights, updates below half an ulp are lost every step
    assert plain_error > 10 * master_error, (plain_error, master_error)


def test_master_weights_match_torch_float32():
    """The master copy against torch's own AdamW run in fp32 on the same (bf16-valued) gradients."""
    gen = torch.Generator().manual_seed(4)
    start = [torch.randn(n, generator=gen).bfloat16() for n in (33, 4097)]
    params = [p.clone().requires_grad_() for p in start]
    ref = [p.float().requires_grad_() for p in start]
    opt = fusedlr.AdamW(params, lr=1e-3, weight_decay=0.1, master_weights=True,
                        schedule=S.CosineAnnealingLR(T_max=100))
    ref_opt = torch.optim.AdamW(ref, lr=1e-3, weight_decay=0.1, foreach=False)
    ref_sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=100)
    for _ in range(100):
        for p, q in zip(params, ref):
            p.grad = torch.randn(p.shape, generator=gen).bfloat16()
            q.grad = p.grad.float()
        opt.step()
        ref_opt.step()
        ref_sched.step()
    for p, q in zip(params, ref):
        # as test_parity_float32: ten float32 ulps of values of order 1
        torch.testing.assert_close(opt.state[p]["master_weight"], q.detach(), rtol=1e-5, atol=1e-5)
        assert torch.equal(p.detach(), _state.split_master(opt.state[p]["master_weight"])[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_weights_resume_bitwise(dtype):
    gen = torch.Generator().manual_seed(8)
    start = [torch.randn(n, generator=gen).to(dtype) for n in (100, 9)]
    grads = [[torch.randn(p.shape, generator=gen).to(dtype) for p in start] for _ in range(20)]

    def train(params, opt, steps):
        for k in steps:
            for p, g in zip(params, grads[k]):
                p.grad = g.clone()
            opt.step()

    whole = [p.clone().requires_grad_() for p in start]
    whole_opt = fusedlr.Adam(whole, lr=1e-2, master_weights=True, schedule=S.ExponentialLR(gamma=0.95))
    train(whole, whole_opt, range(20))

    first = [p.clone().requires_grad_() for p in start]
    first_opt = fusedlr.Adam(first, lr=1e-2, master_weights=True, schedule=S.ExponentialLR(gamma=0.95))
    train(first, first_opt, range(10))
    checkpoint = copy.deepcopy(first_opt.state_dict())
    assert all(s["master_weight"].dtype == torch.float32 for s in checkpoint["state"].values())
    resumed = [p.detach().clone().requires_grad_() for p in first]
    resumed_opt = fusedlr.Adam(resumed, lr=1e-2, master_weights=True, schedule=S.ExponentialLR(gamma=0.95))
    resumed_opt.load_state_dict(checkpoint)
    train(resumed, resumed_opt, range(10, 20))
    for p, q in zip(whole, resumed):
        assert torch.equal(p, q)
        assert torch.equal(whole_opt.state[p]["master_weight"], resumed_opt.state[q]["master_weight"])

    # a checkpoint with master weights does not load into an optimizer that keeps none
    plain_opt = fusedlr.Adam([p.detach().clone().requires_grad_() for p in first], lr=1e-2)
    with pytest.raises(ValueError, match="master weight"):
        plain_opt.load_state_dict(checkpoint)
    assert not plain_opt.state


def test_master_weights_created_for_a_checkpoint_without_them():
    """A torch checkpoint (no master weights) loads; the master copies start from the parameters."""
    params = [torch.randn(10).bfloat16().requires_grad_()]
    ref_opt = torch.optim.AdamW([params[0].detach().clone().requires_grad_()], lr=1e-2)
    ref_opt.param_groups[0]["params"][0].grad = torch.ones(10, dtype=torch.bfloat16)
    ref_opt.step()
    opt = fusedlr.AdamW(params, lr=1e-2, master_weights=True)
    opt.load_state_dict(ref_opt.state_dict())
    params[0].grad = torch.ones(10, dtype=torch.bfloat16)
    before = params[0].detach().float()
    opt.step()
    state = opt.state[params[0]]
    assert state["master_weight"].dtype == torch.float32
    assert torch.equal(params[0].detach(), _state.split_master(state["master_weight"])[0])
    assert float((state["master_weight"] - before).abs().max()) > 0


def test_master_weights_only_for_low_precision_parameters():
    p32, p16 = torch.randn(5, requires_grad=True), torch.randn(5).half().requires_grad_()
    opt = fusedlr.SGD([p32, p16], lr=0.1, momentum=0.9, master_weights=True)
    p32.grad, p16.grad = torch.ones(5), torch.ones(5, dtype=torch.half)
    opt.step()
    assert "master_weight" not in opt.state[p32]
    assert opt.state[p16]["master_weight"].dtype == torch.float32


# -- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1.0, math.nan, "1", True])
@pytest.mark.parametrize("optimizer", [fusedlr.SGD, fusedlr.Adam, fusedlr.AdamW])
def test_invalid_max_grad_norm_raises(optimizer, value):
    with pytest.raises(ValueError, match="max_grad_norm"):
        optimizer([torch.zeros(2, requires_grad=True)], max_grad_norm=value)


@pytest.mark.parametrize("name", ["skip_nonfinite", "master_weights"])
def test_invalid_flags_raise(name):
    with pytest.raises(ValueError, match=name):
        fusedlr.AdamW([torch.zeros(2, requires_grad=True)], **{name: 1})


def test_last_grad_norm_needs_a_norm():
    opt = fusedlr.AdamW([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="max_grad_norm"):
        opt.last_grad_norm()


def test_last_grad_norm_is_a_copy():
    p = torch.zeros(3, requires_grad=True)
    opt = fusedlr.SGD([p], lr=0.1, max_grad_norm=1.0)
    p.grad = torch.ones(3)
    opt.step()
    first = opt.last_grad_norm()
    p.grad = torch.full((3,), 2.0)
    opt.step()
    assert float(first) == pytest.approx(math.sqrt(3)) and float(opt.last_grad_norm()) == pytest.approx(math.sqrt(12))


@pytest.mark.parametrize("scale", [1e20, 1e-25, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_of_huge_tiny_and_zero_gradients(scale, dtype):
    """Squares that overflow or underflow float32 still give the right norm (summed in double)."""
    p = torch.zeros(100_000, dtype=dtype, requires_grad=True)
    opt = fusedlr.SGD([p], lr=0.0, max_grad_norm=math.inf, skip_nonfinite=True)
    p.grad = torch.full((100_000,), scale, dtype=dtype)
    opt.step()
    expected = float(p.grad[0]) * math.sqrt(100_000)
    assert float(opt.last_grad_norm()) == pytest.approx(expected, rel=1e-12, abs=0)
    assert opt.schedule_steps().tolist() == [1]  # finite: not skipped
