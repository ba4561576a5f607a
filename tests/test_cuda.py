"""The CUDA kernels: parity with torch.optim on CUDA and with fusedlr's CPU kernels, launches of many
tensors, ReduceLROnPlateau on the device, no host sync, CUDA graph capture, torch.compile, resume,
bad input."""

import copy
import io
import math
import warnings

import pytest
import torch

import fusedlr
from fusedlr import _ops
from fusedlr import schedules as S
from twins import SCHEDULES, torch_twin

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
warnings.filterwarnings("ignore", message=".*lr_scheduler.step\\(\\)")

CUDA = torch.device("cuda")
# Against torch: as tests/test_optimizers.py. Against the CPU kernels the element math is the same
# IEEE operations in the same order; only the double schedule and bias-correction functions (cos,
# pow, exp) may differ by an ulp between libm and CUDA's.
F64_CPU_TOL = dict(rtol=1e-11, atol=1e-13)
F32_TOL = dict(rtol=1e-5, atol=1e-5)

import test_optimizers  # noqa: E402
from test_optimizers import F64_TOL, OPTIMIZERS, VARIANTS, make_params  # noqa: E402  (the same as on the CPU)
from test_state_dict import assert_unchanged, snapshot  # noqa: E402


# [note: lean CUDA tests]
# What the kernels compute is proven on every CI run without a GPU: the CPU tests hold the shared
# math to torch for every schedule and option, and tests/test_cuda_emulation.py runs these very
# kernels on the CPU, bitwise against the CPU backend. A GPU's time is scarce, so the tests here
# check what only a GPU shows (the kernels on the device, streams, graphs, syncs, compile) over a
# few schedules each, short runs compared every 20 steps, and leave the rest to those.
SCHEDULES_ON_CUDA = ["none", "OneCycleLR", "CosineAnnealingWarmRestarts", "CyclicLR-exp_range", "SequentialLR",
                     "StepLR-per-epoch"]


def run_parity(*args, **kwargs):
    """tests/test_optimizers.py's parity run on CUDA, against torch on CUDA and fusedlr on the CPU."""
    kwargs.setdefault("cpu_tol", F64_CPU_TOL)
    kwargs.setdefault("steps", 60)
    test_optimizers.run_parity(*args, device=CUDA, compare_every=20, **kwargs)


def test_cuda_kernels_are_built():
    assert fusedlr.cuda_built()


@pytest.mark.parametrize("schedule", SCHEDULES_ON_CUDA)
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_parity_every_optimizer(optimizer, schedule):
    fused_cls, torch_cls, kwargs = OPTIMIZERS[optimizer]
    run_parity(fused_cls, torch_cls, kwargs, SCHEDULES[schedule])


@pytest.mark.parametrize("schedule", ["OneCycleLR", "SequentialLR"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parity_variants(variant, schedule):
    fused_cls, torch_cls, kwargs = VARIANTS[variant]
    run_parity(fused_cls, torch_cls, kwargs, SCHEDULES[schedule])


@pytest.mark.parametrize("schedule", ["OneCycleLR"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS) + ["adamw-amsgrad"])
def test_parity_float32(optimizer, schedule):
    fused_cls, torch_cls, kwargs = {**OPTIMIZERS, **VARIANTS}[optimizer]
    run_parity(fused_cls, torch_cls, kwargs, SCHEDULES[schedule], dtype=torch.float32, tol=F32_TOL, cpu_tol=F32_TOL)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS) + ["sgd-nesterov-maximize", "adamw-amsgrad"])
def test_clipping_parity(optimizer, dtype):
    """max_grad_norm on CUDA against clip_grad_norm_ + torch on CUDA, and against the CPU kernels."""
    fused_cls, torch_cls, kwargs = {**OPTIMIZERS, **VARIANTS}[optimizer]
    tol = F64_TOL if dtype == torch.float64 else F32_TOL
    run_parity(fused_cls, torch_cls, kwargs, SCHEDULES["OneCycleLR"], dtype=dtype, tol=tol,
               cpu_tol=F64_CPU_TOL if dtype == torch.float64 else F32_TOL, max_grad_norm=20.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_master_weights_match_the_cpu(optimizer, dtype):
    """Low-precision parameters with master weights, clipping and a schedule: CUDA against the CPU
    kernels (the same float32 operations), and each parameter its master weight rounded."""
    fused_cls, _, kwargs = OPTIMIZERS[optimizer]
    start = [p.to(dtype) for p in make_params(torch.float32, 2)]
    cuda = [p.to(CUDA, copy=True).requires_grad_() for p in start]
    cpu = [p.clone().requires_grad_() for p in start]
    options = dict(kwargs, master_weights=True, max_grad_norm=20.0, schedule=S.OneCycleLR(max_lr=0.01, total_steps=60))
    cuda_opt, cpu_opt = fused_cls(cuda, **options), fused_cls(cpu, **options)
    gen = torch.Generator().manual_seed(3)
    for _ in range(60):
        for p, q in zip(cuda, cpu):
            q.grad = torch.randn(q.shape, generator=gen).to(dtype)
            p.grad = q.grad.to(CUDA)
        cuda_opt.step()
        cpu_opt.step()
    for p, q in zip(cuda, cpu):
        master = cuda_opt.state[p]["master_weight"]
        assert torch.equal(p.detach(), master.to(dtype))
        torch.testing.assert_close(master.cpu(), cpu_opt.state[q]["master_weight"], **F32_TOL)
        for key, value in cpu_opt.state[q].items():
            torch.testing.assert_close(cuda_opt.state[p][key].cpu(), value, **F32_TOL)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_nonfinite_gradients_skip_the_step(optimizer):
    """skip_nonfinite on CUDA: a step with an inf or NaN anywhere changes nothing on the device."""
    fused_cls, _, kwargs = OPTIMIZERS[optimizer]
    params = [p.to(CUDA, copy=True).requires_grad_() for p in make_params(torch.float32, 4)]
    opt = fused_cls(params, skip_nonfinite=True, schedule=S.StepLR(step_size=1, gamma=0.5), **kwargs)
    gen = torch.Generator().manual_seed(5)
    for k in range(12):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(CUDA)
        if k % 4 == 3:
            params[k % len(params)].grad.view(-1)[-1] = [math.inf, math.nan, -math.inf][k % 3]
            before = snapshot(opt, params)
            opt.step()
            assert_unchanged(before, opt, params)
            assert not math.isfinite(float(opt.last_grad_norm()))
        else:
            opt.step()
    assert opt.schedule_steps().tolist() == [9]
    assert all(bool(p.isfinite().all()) for p in params)


def test_evaluate_schedules_matches_the_cpu():
    schedules = [s for s in SCHEDULES.values() if s is not None]
    programs = S.compile_programs(schedules)
    base_lrs = [0.1 * (g + 1) for g in range(len(schedules))]
    plateau = _ops.initial_plateau_state(len(schedules), torch.device("cpu"))
    for t in (0, 1, 7, 29, 30, 119, 200, 1000, 10 ** 7):
        steps = torch.full((len(schedules),), t, dtype=torch.int64)
        cpu = _ops.evaluate_schedules(programs, base_lrs, steps, plateau)
        cuda = _ops.evaluate_schedules(programs, base_lrs, steps.to(CUDA), plateau.to(CUDA))
        torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-13, atol=1e-300)


def many_tensor_model(device, seed=4):
    """3000 parameters of three dtypes (more than one launch holds), sizes 0 to 70_001, some of them
    views at an odd offset (no 16-byte accesses), in three groups."""
    gen = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.float64, torch.bfloat16]
    params = []
    for k in range(3000):
        n = 70_001 if k % 997 == 0 else (0 if k % 401 == 0 else 1 + (k * 37) % 263)
        dtype = dtypes[(k // 5) % 3]
        if k % 11 == 0:
            base = torch.randn(n + 1, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
            params.append(torch.nn.Parameter(base[1:]))
        else:
            params.append(torch.nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64).to(device=device,
                                                                                                     dtype=dtype)))
    return params


def many_tensor_optimizer(optimizer, params):
    schedules = [S.OneCycleLR(max_lr=0.02, total_steps=40), S.CosineAnnealingLR(T_max=30, eta_min=1e-4), None]
    groups = [dict(params=params[g::3], schedule=schedules[g]) for g in range(3)]
    if optimizer == "sgd":
        groups[1].update(momentum=0.0, nesterov=False, weight_decay=0.01)
        return fusedlr.SGD(groups, lr=0.05, momentum=0.9, nesterov=True)
    groups[0].update(amsgrad=True)
    groups[2].update(weight_decay=0.0)
    return fusedlr.Adam(groups, lr=0.01, weight_decay=0.05)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_more_tensors_than_one_launch_holds_match_the_cpu(optimizer):
    cuda_params = many_tensor_model(CUDA)
    cpu_params = many_tensor_model("cpu")
    cuda_opt = many_tensor_optimizer(optimizer, cuda_params)
    cpu_opt = many_tensor_optimizer(optimizer, cpu_params)
    gen = torch.Generator().manual_seed(9)
    for k in range(25):
        for i, (p, q) in enumerate(zip(cuda_params, cpu_params)):
            if (i + k) % 13 == 0:
                p.grad = q.grad = None
                continue
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            p.grad, q.grad = g.to(CUDA), g
        cuda_opt.step()
        cpu_opt.step()
    tols = {torch.float64: F64_CPU_TOL, torch.float32: F32_TOL, torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5)}
    for i, (p, q) in enumerate(zip(cuda_params, cpu_params)):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), **tols[p.dtype], msg=lambda m: f"param {i}: {m}")
        for key, value in cpu_opt.state.get(q, {}).items():
            tol = tols[torch.float64] if key == "step" or value.dtype == torch.float64 else tols[torch.float32]
            torch.testing.assert_close(cuda_opt.state[p][key].cpu(), value, **tol,
                                       msg=lambda m: f"param {i}, {key}: {m}")
        assert (p in cuda_opt.state) == (q in cpu_opt.state)
    assert cuda_opt.schedule_steps().tolist() == [25, 25, 25]


@pytest.mark.parametrize("metric_dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_reduce_on_plateau_with_a_device_metric(metric_dtype):
    schedule = S.ReduceLROnPlateau(patience=1, factor=0.5, cooldown=1, threshold=0.01)
    start = make_params(torch.float64, 6)[:3]
    fused = [p.to(CUDA).requires_grad_() for p in start]
    ref = [p.to(CUDA).requires_grad_() for p in start]
    fused_opt = fusedlr.SGD(fused, lr=0.1, momentum=0.9, schedule=schedule)
    ref_opt = torch.optim.SGD(ref, lr=0.1, momentum=0.9, foreach=False)
    ref_sched = torch_twin(schedule, ref_opt)
    gen = torch.Generator().manual_seed(7)
    for k in range(60):
        for p, q in zip(fused, ref):
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.grad, q.grad = g.to(CUDA), g.to(CUDA)
        fused_opt.step()
        ref_opt.step()
        metric = float(10 - k % 4 + k // 9)  # stalls and worsens: the plateau fires; exact in bfloat16
        fused_opt.observe(torch.tensor(metric, dtype=metric_dtype, device=CUDA))
        ref_sched.step(metric)
        assert float(fused_opt.last_lr()[0]) == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-12), k
    assert float(fused_opt.last_lr()[0]) < 0.1 / 4  # it did reduce, more than once
    for p, q in zip(fused, ref):
        torch.testing.assert_close(p, q, **F64_TOL)


def test_step_and_observe_do_not_sync_with_the_host():
    """Steps (plain, clipped, under GradScaler), observe() of a tensor and of a float, last_lr(),
    last_momentum() and last_grad_norm() under torch's sync debug mode: any sync raises."""
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)).to(CUDA)
    opts = [fusedlr.AdamW(model.parameters(), lr=1e-3, schedule=S.OneCycleLR(max_lr=1e-3, total_steps=100)),
            fusedlr.SGD(model.parameters(), lr=1e-3, momentum=0.9, schedule=S.ReduceLROnPlateau(patience=0),
                        max_grad_norm=1.0, skip_nonfinite=True)]
    scaled_opt = fusedlr.Adam(model.parameters(), lr=1e-3, schedule=S.CyclicLR(base_lr=1e-4, max_lr=1e-3))
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 8)
    x = torch.randn(16, 32, device=CUDA)
    lrs, momenta = [], []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for k in range(10):
            loss = model(x).square().mean()
            loss.backward()
            for opt in opts:
                opt.step()
            opts[1].observe(loss.detach() if k % 2 else 0.5 + k)
            opts[0].zero_grad()
            lrs.append(opts[0].last_lr())
            momenta.append(scaled_opt.last_momentum())
            norm = opts[1].last_grad_norm()
            with torch.autocast("cuda", dtype=torch.float16):
                scaled_loss = scaler.scale(model(x).square().mean())
            scaled_loss.backward()
            scaler.step(scaled_opt)
            scaler.update()
            scaled_opt.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert opts[0].schedule_steps().tolist() == [10] and opts[1].schedule_steps().tolist() == [10]
    assert len({float(lr[0]) for lr in lrs}) == 10
    assert len({float(m[0]) for m in momenta}) > 1  # CyclicLR cycles the momentum
    assert math.isfinite(float(norm))
    assert scaled_opt.schedule_steps().tolist() == [10]


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 1)).to(device=CUDA, dtype=torch.float64)


@pytest.mark.parametrize("options", [{}, dict(max_grad_norm=0.05, skip_nonfinite=True)])
def test_cuda_graph_capture_and_replay(options):
    """Forward, backward and opt.step() captured once and replayed 100 times: the schedule follows
    the device step counter, and the parameters equal an eager run's (with clipping too)."""
    schedule = S.SequentialLR([S.LinearLR(start_factor=0.01, total_iters=20),
                               S.CosineAnnealingLR(T_max=100, eta_min=1e-5)], milestones=[20])
    lr, warmup, replays = 1e-3, 3, 100
    model, eager_model = mlp(), mlp()
    opt = fusedlr.AdamW(model.parameters(), lr=lr, weight_decay=0.01, schedule=schedule, **options)
    eager_opt = fusedlr.AdamW(eager_model.parameters(), lr=lr, weight_decay=0.01, schedule=schedule, **options)
    gen = torch.Generator().manual_seed(1)
    static_x = torch.randn(32, 16, generator=gen, dtype=torch.float64).to(CUDA)
    static_y = torch.randn(32, 1, generator=gen, dtype=torch.float64).to(CUDA)

    def train_step(m, o):
        o.zero_grad(set_to_none=False)
        torch.nn.functional.mse_loss(m(static_x), static_y).backward()
        o.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            train_step(model, opt)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step(model, opt)
    assert opt.schedule_steps().tolist() == [warmup]  # capture runs nothing
    for r in range(replays):
        graph.replay()
        if (r + 1) % 10 == 0:
            t = warmup + r + 1
            assert float(opt.last_lr()[0]) == pytest.approx(schedule(t, lr), rel=1e-12), t
    torch.cuda.synchronize()
    for _ in range(warmup + replays):
        train_step(eager_model, eager_opt)
    assert opt.schedule_steps().tolist() == [warmup + replays]
    for p, q in zip(model.parameters(), eager_model.parameters()):
        assert int(opt.state[p]["step"]) == warmup + replays
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-9)
    if options:
        torch.testing.assert_close(opt.last_grad_norm(), eager_opt.last_grad_norm(), rtol=1e-9, atol=0)


def test_torch_compile_fullgraph_without_recompiles():
    """opt.step() in a fullgraph compiled function: one graph, reused for 100 steps while the lr
    changes on the device; the result equals eager steps."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    schedule = S.OneCycleLR(max_lr=0.01, total_steps=200)
    model, eager_model = mlp(), mlp()
    opt = fusedlr.AdamW(model.parameters(), lr=0.01, schedule=schedule)
    eager_opt = fusedlr.AdamW(eager_model.parameters(), lr=0.01, schedule=schedule)
    x = torch.randn(32, 16, dtype=torch.float64, device=CUDA)

    @torch.compile(fullgraph=True, dynamic=False)
    def compiled_step():
        opt.step()

    lrs = []
    for k in range(101):
        for m in (model, eager_model):
            m.zero_grad(set_to_none=False)
            m(x).square().mean().backward()
        if k == 0:
            opt.step()  # the first step creates the state, in Python
        else:
            compiled_step()
        eager_opt.step()
        lrs.append(float(opt.last_lr()[0]))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert lrs == pytest.approx([schedule(t + 1, 0.01) for t in range(101)], rel=1e-12)
    for p, q in zip(model.parameters(), eager_model.parameters()):
        assert torch.equal(p, q)


PLATEAU = S.ReduceLROnPlateau(patience=1, factor=0.5, cooldown=1)
RESUME_OPTIMIZERS = {
    "sgd": lambda params, s: fusedlr.SGD(params, lr=0.05, momentum=0.9, nesterov=True, schedule=s),
    "adam": lambda params, s: fusedlr.Adam(params, lr=0.01, amsgrad=True, schedule=s),
    "adamw": lambda params, s: fusedlr.AdamW(params, lr=0.01, weight_decay=0.1, schedule=s),
}


@pytest.mark.parametrize("schedule", ["OneCycleLR", "CyclicLR-triangular2", "SequentialLR", "ReduceLROnPlateau"])
@pytest.mark.parametrize("optimizer", list(RESUME_OPTIMIZERS))
def test_resume_is_bitwise_identical(optimizer, schedule):
    s = PLATEAU if schedule == "ReduceLROnPlateau" else SCHEDULES[schedule]
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(5, 3, generator=gen).to(CUDA), torch.randn(70_001, generator=gen).to(CUDA)]
             for _ in range(60)]
    start = [torch.randn(5, 3, device=CUDA), torch.randn(70_001, device=CUDA)]

    def train(opt, params, ks):
        for k in ks:
            for p, g in zip(params, grads[k]):
                p.grad = g.clone()
            opt.step()
            if s is PLATEAU:
                opt.observe(torch.tensor(float(10 - k % 4 + k // 9), device=CUDA))

    straight = [p.clone().requires_grad_() for p in start]
    straight_opt = RESUME_OPTIMIZERS[optimizer](straight, s)
    train(straight_opt, straight, range(60))

    first = [p.clone().requires_grad_() for p in start]
    first_opt = RESUME_OPTIMIZERS[optimizer](first, s)
    train(first_opt, first, range(23))
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "opt": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed = [p.clone().requires_grad_() for p in checkpoint["params"]]
    resumed_opt = RESUME_OPTIMIZERS[optimizer](resumed, S.StepLR(step_size=1000))
    resumed_opt.load_state_dict(checkpoint["opt"])
    train(resumed_opt, resumed, range(23, 60))

    for p, q in zip(straight, resumed):
        assert q.device.type == CUDA.type and torch.equal(p, q)
        for key, value in straight_opt.state[p].items():
            assert torch.equal(value, resumed_opt.state[q][key]), key
    assert torch.equal(straight_opt.last_lr(), resumed_opt.last_lr())
    assert torch.equal(straight_opt.schedule_steps(), resumed_opt.schedule_steps())


def trained(optimizer="adamw", groups=1):
    params = [torch.nn.Parameter(torch.randn(5, 3, device=CUDA)), torch.nn.Parameter(torch.randn(11, device=CUDA))]
    cls = fusedlr.AdamW if optimizer == "adamw" else fusedlr.SGD
    opt = cls([dict(params=params)] + [dict(params=[]) for _ in range(groups - 1)], lr=0.01,
              schedule=S.StepLR(step_size=2))
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return params, opt


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("fresh", [False, True], ids=["trained", "new-parameter"])
def test_sparse_gradient_raises_and_changes_nothing(optimizer, fresh):
    params, opt = trained(optimizer)
    extra = torch.nn.Parameter(torch.randn(4, device=CUDA))
    opt.add_param_group({"params": [extra]})
    all_params = params + [extra]
    for p in all_params:
        p.grad = torch.randn_like(p)
    target = extra if fresh else params[1]
    target.grad = torch.zeros_like(target).to_sparse()
    before = snapshot(opt, all_params)
    with pytest.raises(RuntimeError, match="sparse|dense"):
        opt.step()
    assert_unchanged(before, opt, all_params)
    target.grad = torch.randn_like(target)
    opt.step()
    assert int(opt.state[target]["step"]) == (1 if fresh else 4)


def test_over_capacity_raises_and_changes_nothing():
    """More groups, or a longer schedule program, than a launch takes: a clear error before any change
    (last_lr() would refuse too, so the snapshot leaves it out)."""
    for optimizer, extra_groups, message in [
        ("adamw", [{"params": []} for _ in range(40)], "param groups"),
        ("sgd", [{"params": [], "schedule": S.MultiStepLR(milestones=list(range(g + 1, g + 41)))}
                 for g in range(20)], "programs"),
    ]:
        params, opt = trained(optimizer)
        for group in extra_groups:
            opt.add_param_group(group)
        for p in params:
            p.grad = torch.randn_like(p)
        values = [p.detach().clone() for p in params]
        state = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in params}
        steps = opt.schedule_steps().clone()
        with pytest.raises(RuntimeError, match=message):
            opt.step()
        with pytest.raises(RuntimeError, match=message):
            opt.last_lr()
        for p, v in zip(params, values):
            assert torch.equal(p.detach(), v)
            assert all(torch.equal(opt.state[p][k], state[p][k]) for k in state[p])
        assert torch.equal(opt.schedule_steps(), steps)


def test_deepcopy_and_group_without_gradients_on_cuda():
    params, opt = trained("sgd", groups=2)
    clone = copy.deepcopy(opt)
    assert clone.schedule_steps().device.type == CUDA.type and clone.schedule_steps().tolist() == [3, 3]
    for p in params:
        p.grad = None
    opt.step()  # no gradient anywhere: only the group counters advance
    assert opt.schedule_steps().tolist() == [4, 4]
    assert math.isclose(float(opt.last_lr()[0]), 0.01 * 0.1 ** 2)
