"""torch's lr convention (fusedlr/lr.py, [note: the lr convention]): a scheduled group's "lr" is the
lr of its next step, kept current on the device; its base lr is "initial_lr"; writes from outside
raise; groups without a schedule are torch's, and their settings change without a plan rebuild."""

import io
import math
import warnings

import pytest
import torch
from torch.optim import lr_scheduler as L

import fusedlr
from fusedlr import schedules as S
from fusedlr.lr import LRConflictError
from twins import SCHEDULES, torch_twin

warnings.filterwarnings("ignore", message=".*lr_scheduler.step\\(\\)")

# Adam's update in float64 from the same inputs: fusedlr and torch round differently only in the
# last bits of each operation (torch's sqrt, FMAs), so 1e-12 over a hundred steps is tight and
# a lr off by one step (a relative change of 1e-3 or more in these schedules) is far outside it.
RTOL, ATOL = 1e-11, 1e-13


def params_pair(seed=0, shapes=((6, 5), (7,))):
    gen = torch.Generator().manual_seed(seed)
    start = [torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes]
    return [p.clone().requires_grad_() for p in start], [p.clone().requires_grad_() for p in start]


def set_grads(params, gen):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            {p: {k: v.clone() for k, v in opt.state[p].items()} for p in params if p in opt.state},
            opt.schedule_steps().clone())


def assert_unchanged(before, opt, params):
    values, state, steps = before
    for p, v in zip(params, values):
        assert torch.equal(p.detach(), v)
    for p in state:
        for k, v in state[p].items():
            assert torch.equal(opt.state[p][k], v)
    assert torch.equal(opt.schedule_steps(), steps)


@pytest.mark.parametrize("name", [n for n in SCHEDULES if SCHEDULES[n] is not None])
def test_group_lr_is_the_next_lr_of_the_torch_twin(name):
    """group["lr"] after k steps equals torch's group["lr"] after k optimizer + scheduler steps, and
    the parameters follow torch's AdamW with that scheduler."""
    schedule = SCHEDULES[name]
    ours, ref = params_pair(seed=1)
    opt = fusedlr.AdamW(ours, lr=0.01, weight_decay=0.1, schedule=schedule)
    ref_opt = torch.optim.AdamW(ref, lr=0.01, weight_decay=0.1, foreach=False)
    twin = torch_twin(schedule, ref_opt)
    group = opt.param_groups[0]
    assert group["initial_lr"] == 0.01 or schedule.absolute
    gen = torch.Generator().manual_seed(2)
    unit = 1 if isinstance(schedule, S.OneCycleLR) else schedule.steps_per_epoch
    for k in range(100):
        lr = group["lr"]
        assert isinstance(lr, torch.Tensor) and lr.dim() == 0 and lr.dtype == torch.float64
        assert float(lr) == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-12)
        assert float(lr) == schedule(k, 0.01)  # the same C++ formula, exactly
        set_grads(ours, gen)
        for p, q in zip(ours, ref):
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
        if (k + 1) % unit == 0:
            twin.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL)


def test_a_torch_scheduler_on_a_scheduled_group_raises_and_changes_nothing():
    params = [torch.nn.Parameter(torch.randn(4, 3))]
    opt = fusedlr.AdamW(params, lr=0.01, schedule=S.CosineAnnealingLR(T_max=50))
    gen = torch.Generator().manual_seed(0)
    set_grads(params, gen)
    opt.step()
    L.CosineAnnealingLR(opt, T_max=50).step()  # fills group["lr"] with its own next lr
    before = snapshot(opt, params)
    set_grads(params, gen)
    with pytest.raises(LRConflictError, match="written in place.*as_lr_scheduler"):
        opt.step()
    assert_unchanged(before, opt, params)
    with pytest.raises(LRConflictError):  # and again: the conflict is not forgotten
        opt.step()
    assert_unchanged(before, opt, params)


def test_assigning_a_scheduled_groups_lr_raises_and_changes_nothing():
    params = [torch.nn.Parameter(torch.randn(4, 3))]
    opt = fusedlr.SGD(params, lr=0.1, momentum=0.9, schedule=S.StepLR(step_size=3))
    gen = torch.Generator().manual_seed(0)
    set_grads(params, gen)
    opt.step()
    before = snapshot(opt, params)
    opt.param_groups[0]["lr"] = 0.5  # as a framework's LambdaLR does on a float lr
    set_grads(params, gen)
    with pytest.raises(LRConflictError, match="replaced"):
        opt.step()
    assert_unchanged(before, opt, params)
    # the way out the message names: the group's own lr from now on
    opt.param_groups[0]["schedule"] = None
    opt.step()
    assert opt.param_groups[0]["lr"] == 0.5
    assert float(opt.last_lr()[0]) == 0.5


def test_writing_the_value_the_schedule_gives_is_harmless():
    """A scheduler that computes the same lrs (a twin on top) changes nothing: accepted, exact."""
    schedule = S.CosineAnnealingLR(T_max=30)
    ours, ref = params_pair(seed=3)
    opt = fusedlr.Adam(ours, lr=0.01, schedule=schedule)
    L.CosineAnnealingLR(opt, T_max=30)  # writes the lr of step 0, the schedule's own
    ref_opt = fusedlr.Adam(ref, lr=0.01, schedule=schedule)
    gen = torch.Generator().manual_seed(4)
    for _ in range(30):
        set_grads(ours, gen)
        for p, q in zip(ours, ref):
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
        opt.param_groups[0]["lr"].fill_(float(ref_opt.param_groups[0]["lr"]))
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)


def test_initial_lr_is_the_base_lr():
    schedule = S.LinearLR(start_factor=0.1, total_iters=10)
    params = [torch.nn.Parameter(torch.randn(3))]
    opt = fusedlr.SGD(params, lr=0.1, schedule=schedule)
    params[0].grad = torch.ones(3)
    for _ in range(4):
        opt.step()
    opt.param_groups[0]["initial_lr"] = 0.3  # a new base lr, from the next step on
    before = params[0].detach().clone()
    opt.step()
    assert torch.allclose(before - params[0].detach(), torch.full((3,), schedule(4, 0.3)), rtol=1e-6)
    assert float(opt.param_groups[0]["lr"]) == schedule(5, 0.3)


def unscheduled_runs(make_ours, make_ref, change, steps=60):
    ours, ref = params_pair(seed=5)
    opt, ref_opt = make_ours(ours), make_ref(ref)
    gen = torch.Generator().manual_seed(6)
    plans = set()
    for k in range(steps):
        for o in (opt, ref_opt):
            change(o, k)
        set_grads(ours, gen)
        for p, q in zip(ours, ref):
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
        plans.add(id(opt._lists.plan))
    return ours, ref, opt, plans


def test_unscheduled_group_follows_a_torch_scheduler_without_rebuilding():
    """HF Trainer's own LambdaLR on a fusedlr optimizer without a schedule: torch's behaviour, and
    one step plan for the whole run."""
    def with_warmup(opt):
        opt.sched = L.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 10) * (1 - t / 80))
        return opt

    def step_scheduler(opt, k):
        if k:
            opt.sched.step()

    ours, ref, opt, plans = unscheduled_runs(
        lambda ps: with_warmup(fusedlr.AdamW(ps, lr=0.01, weight_decay=0.1)),
        lambda ps: with_warmup(torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, foreach=False)), step_scheduler)
    assert len(plans) == 1
    assert isinstance(opt.param_groups[0]["lr"], float)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_every_scalar_hyperparameter_changes_without_rebuilding(optimizer):
    def change(opt, k):
        group = opt.param_groups[0]
        group["lr"] = 0.01 * (1 + math.sin(k))
        group["weight_decay"] = 0.05 * (k % 3)
        group["maximize"] = k % 7 == 3
        if optimizer == "sgd":
            group["momentum"] = 0.5 + 0.4 * math.cos(k)  # stays on: the same state
            group["dampening"] = 0.1 * (k % 2)
        else:
            group["betas"] = (0.8 + 0.1 * math.cos(k), 0.99 + 0.009 * math.sin(k))
            group["eps"] = 10.0 ** -(6 + k % 3)
            group["decoupled_weight_decay"] = k % 5 == 1

    if optimizer == "sgd":
        make_ours = lambda ps: fusedlr.SGD(ps, lr=0.01, momentum=0.9)  # noqa: E731
        make_ref = lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, foreach=False)  # noqa: E731
    else:
        make_ours = lambda ps: fusedlr.Adam(ps, lr=0.01)  # noqa: E731
        make_ref = lambda ps: torch.optim.Adam(ps, lr=0.01, foreach=False)  # noqa: E731
    ours, ref, _, plans = unscheduled_runs(make_ours, make_ref, change)
    assert len(plans) == 1
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL)


def test_a_state_changing_setting_still_rebuilds():
    params = [torch.nn.Parameter(torch.randn(3))]
    opt = fusedlr.SGD(params, lr=0.1)
    params[0].grad = torch.ones(3)
    opt.step()
    assert "momentum_buffer" not in opt.state[params[0]]
    opt.param_groups[0]["momentum"] = 0.9
    opt.step()
    assert "momentum_buffer" in opt.state[params[0]]


def test_lr_scale_scales_the_whole_schedule():
    """timm's layer decay: a group with lr_scale runs at lr_scale times its schedule, absolute lrs
    (eta_min, OneCycle's and CyclicLR's lrs) included, as timm's schedulers scale the value."""
    for schedule in (S.CosineAnnealingLR(T_max=40, eta_min=1e-3), S.OneCycleLR(max_lr=0.05, total_steps=40),
                     S.SequentialLR([S.LinearLR(start_factor=0.1, total_iters=5),
                                     S.CosineAnnealingWarmRestarts(T_0=7, eta_min=2e-3)], milestones=[5])):
        scales = [0.125, 0.5, 1.0]
        params = [torch.nn.Parameter(torch.randn(3)) for _ in scales]
        opt = fusedlr.SGD([{"params": [p], "lr_scale": s} for p, s in zip(params, scales)], lr=0.02,
                          schedule=schedule)
        for k in range(40):
            for group, scale in zip(opt.param_groups, scales):
                assert float(group["lr"]) == pytest.approx(scale * schedule(k, 0.02), rel=1e-14)
            for p in params:
                p.grad = torch.ones(3)
            opt.step()


def test_as_lr_scheduler():
    schedule = S.OneCycleLR(max_lr=0.05, total_steps=30)
    params = [torch.nn.Parameter(torch.randn(3))]
    opt = fusedlr.AdamW([{"params": params}, {"params": [torch.nn.Parameter(torch.randn(2))], "schedule": None}],
                        lr=0.01, schedule=schedule)
    sched = opt.as_lr_scheduler()
    assert isinstance(sched, L.LRScheduler)
    for k in range(10):
        last = sched.get_last_lr()
        assert float(last[0]) == schedule(k, 0.01) and last[1] == 0.01
        for p in params:
            p.grad = torch.ones(3)
        opt.step()
        assert float(sched.get_last_lr()[0]) == schedule(k, 0.01)  # as torch's: until its step()
        sched.get_last_lr()[0].fill_(1.0)  # a copy: the optimizer's lr is not touched
        assert float(opt.param_groups[0]["lr"]) == schedule(k + 1, 0.01)
        sched.step()
    assert sched.last_epoch == 10
    other = opt.as_lr_scheduler()
    other.load_state_dict(io_round_trip(sched.state_dict()))
    assert other.state_dict() == sched.state_dict()
    with pytest.raises(ValueError, match="epoch"):
        sched.step(epoch=3)


def io_round_trip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def test_as_lr_scheduler_hands_a_metric_to_the_plateau():
    params = [torch.nn.Parameter(torch.randn(3))]
    opt = fusedlr.SGD(params, lr=0.1, schedule=S.ReduceLROnPlateau(patience=0, factor=0.5))
    sched = opt.as_lr_scheduler()
    for metric in (1.0, 2.0, 3.0):
        sched.step(torch.tensor(metric))
    assert float(opt.param_groups[0]["lr"]) == 0.1 * 0.5 ** 2


@pytest.mark.parametrize("name", ["OneCycleLR", "CosineAnnealingLR", "CyclicLR-triangular2", "StepLR"])
def test_fusedlr_checkpoint_continues_in_torch_with_the_twin(name):
    """A fusedlr state_dict loads into torch's AdamW, its twin scheduler resumes from it
    (last_epoch), and both continue equal, the cycled beta1 included."""
    schedule = SCHEDULES[name]
    ours, ref = params_pair(seed=8)
    opt = fusedlr.AdamW(ours, lr=0.01, weight_decay=0.1, schedule=schedule)
    gen = torch.Generator().manual_seed(9)
    for _ in range(37):
        set_grads(ours, gen)
        opt.step()
    with torch.no_grad():
        for p, q in zip(ours, ref):
            q.copy_(p)
    ref_opt = torch.optim.AdamW(ref, lr=0.01, weight_decay=0.1, foreach=False)
    ref_opt.load_state_dict(io_round_trip(opt.state_dict()))
    twin = S.torch_scheduler(schedule, ref_opt, last_epoch=36)
    for _ in range(37, 100):
        assert float(opt.param_groups[0]["lr"]) == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-12)
        if schedule.cycles_momentum:
            assert float(opt.last_momentum()[0]) == pytest.approx(ref_opt.param_groups[0]["betas"][0], rel=1e-12)
        set_grads(ours, gen)
        for p, q in zip(ours, ref):
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
        twin.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL)


def test_unscheduled_group_round_trips_its_lr_as_torch():
    """No initial_lr is invented: an lr changed in torch after loading stays changed when the
    checkpoint comes back."""
    params = [torch.nn.Parameter(torch.randn(3))]
    opt = fusedlr.AdamW(params, lr=0.01)
    params[0].grad = torch.ones(3)
    opt.step()
    saved = opt.state_dict()
    assert "initial_lr" not in saved["param_groups"][0] and saved["param_groups"][0]["lr"] == 0.01
    torch_opt = torch.optim.AdamW([torch.nn.Parameter(params[0].detach().clone())], lr=0.5)
    torch_opt.load_state_dict(io_round_trip(saved))
    torch_opt.param_groups[0]["lr"] = 0.002
    opt.load_state_dict(io_round_trip(torch_opt.state_dict()))
    assert opt.param_groups[0]["lr"] == 0.002
    assert float(opt.last_lr()[0]) == 0.002


def test_scheduled_group_round_trips_through_fusedlr():
    schedule = S.CosineAnnealingLR(T_max=20, eta_min=1e-4)
    params = [torch.nn.Parameter(torch.randn(3))]
    opt = fusedlr.SGD([{"params": params, "lr_scale": 0.5}], lr=0.1, schedule=schedule)
    for _ in range(5):
        params[0].grad = torch.ones(3)
        opt.step()
    again = fusedlr.SGD([{"params": [torch.nn.Parameter(torch.randn(3))]}], lr=0.7)
    again.load_state_dict(io_round_trip(opt.state_dict()))
    group = again.param_groups[0]
    assert group["initial_lr"] == 0.1 and group["lr_scale"] == 0.5
    assert float(group["lr"]) == float(opt.param_groups[0]["lr"]) == pytest.approx(0.5 * schedule(5, 0.1))


def test_scheduled_optimizer_made_and_stepped_in_inference_mode():
    schedule = S.StepLR(step_size=2, gamma=0.5)
    with torch.inference_mode():
        params = [torch.randn(5)]
        params[0].grad = torch.ones(5)
        opt = fusedlr.SGD(params, lr=0.1, schedule=schedule)
        for k in range(5):
            before = params[0].clone()
            opt.step()
            assert torch.allclose(before - params[0], torch.full((5,), schedule(k, 0.1)))
            assert float(opt.param_groups[0]["lr"]) == schedule(k + 1, 0.1)


@pytest.mark.parametrize("copy_kind", ["deepcopy", "pickle"])
def test_a_copied_optimizer_keeps_its_lrs_current_and_guarded(copy_kind):
    """A deepcopy or an unpickled optimizer's scheduled lrs are views of its own next-lr vector:
    they follow its steps, and an outside write to them is seen."""
    import copy
    import pickle
    p = torch.nn.Parameter(torch.ones(3))
    opt = fusedlr.AdamW([p], lr=0.1, schedule=S.StepLR(step_size=1, gamma=0.5))
    p.grad = torch.ones(3)
    opt.step()
    twin = copy.deepcopy(opt) if copy_kind == "deepcopy" else pickle.loads(pickle.dumps(opt))
    q = twin.param_groups[0]["params"][0]
    q.grad = torch.ones(3)
    twin.step()
    assert float(twin.param_groups[0]["lr"]) == float(twin.last_lr()[0]) == 0.1 * 0.5 ** 2
    assert float(opt.param_groups[0]["lr"]) == 0.05  # the original is its own
    twin.param_groups[0]["lr"].fill_(0.7)
    with pytest.raises(LRConflictError):
        twin.step()


def test_a_torch_checkpoint_without_initial_lr_gives_its_lr_as_the_base():
    q = torch.nn.Parameter(torch.ones(2))
    ref = torch.optim.AdamW([q], lr=0.05)
    q.grad = torch.ones(2)
    ref.step()
    p = torch.nn.Parameter(torch.ones(2))
    opt = fusedlr.AdamW([p], lr=0.01, schedule=S.ExponentialLR(gamma=0.9))
    opt.load_state_dict(ref.state_dict())
    assert opt.param_groups[0]["initial_lr"] == 0.05
    assert float(opt.last_lr()[0]) == pytest.approx(0.05 * 0.9)  # resumed at torch's step 1


@pytest.mark.parametrize("bad", [float("nan"), -1.0, float("inf")])
def test_a_bad_initial_lr_raises_and_changes_nothing(bad):
    p = torch.nn.Parameter(torch.ones(3))
    opt = fusedlr.AdamW([p], lr=0.1, schedule=S.StepLR(step_size=1, gamma=0.5))
    p.grad = torch.ones(3)
    opt.step()
    before, steps = p.detach().clone(), opt.schedule_steps().clone()
    opt.param_groups[0]["initial_lr"] = bad
    with pytest.raises(ValueError, match="initial_lr"):
        opt.step()
    assert torch.equal(p.detach(), before) and torch.equal(opt.schedule_steps(), steps)


def _cadence_warnings(schedule, gaps):
    """The cadence warnings of opt.as_lr_scheduler() stepped after each gap's count of optimizer steps."""
    p = torch.nn.Parameter(torch.zeros(3))
    opt = fusedlr.AdamW([p], lr=0.1, schedule=schedule)
    scheduler = opt.as_lr_scheduler()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for gap in gaps:
            for _ in range(gap):
                p.grad = torch.ones(3)
                opt.step()
            scheduler.step()
    return [str(w.message) for w in caught if "as_lr_scheduler" in str(w.message)]


def test_a_scheduler_stepped_per_epoch_warns_once_where_the_schedule_counts_single_steps():
    """Lightning's interval="epoch" (or frequency=N) on opt.as_lr_scheduler() would go unread: the
    schedule moves with the optimizer's steps. Stepped every 4 steps, it says steps_per_epoch=4."""
    caught = _cadence_warnings(S.StepLR(step_size=1, gamma=0.5), [4, 4, 4, 4])
    assert len(caught) == 1 and "steps_per_epoch=4" in caught[0]
    assert _cadence_warnings(S.StepLR(step_size=1, gamma=0.5, steps_per_epoch=4), [4, 4, 4]) == []


def test_a_scheduler_stepped_per_step_does_not_warn_even_past_a_skipped_step():
    """HF Trainer steps its scheduler after each optimizer step and not after one a GradScaler
    skipped: one long gap is no cadence."""
    assert _cadence_warnings(S.CosineAnnealingLR(T_max=50), [1, 1, 3, 1, 1, 2, 1, 5, 1]) == []
    assert _cadence_warnings(None, [4, 4, 4]) == []  # no schedule: nothing to move


def test_the_on_device_scheduler_state_dict_resumes_a_torch_lambda_lr():
    """HF Trainer saves its scheduler's state_dict; a run resumed with torch's AdamW and Trainer's
    LambdaLR loads what opt.as_lr_scheduler() saved, at the same count and base lrs."""
    p = torch.nn.Parameter(torch.zeros(3))
    opt = fusedlr.AdamW([p], lr=0.1, schedule=S.from_hf("linear", num_warmup_steps=2, num_training_steps=10))
    scheduler = opt.as_lr_scheduler()
    for _ in range(4):
        p.grad = torch.ones(3)
        opt.step()
        scheduler.step()
    saved = torch.load(io.BytesIO(_saved(scheduler.state_dict())), weights_only=True)
    q = torch.nn.Parameter(torch.zeros(3))
    torch_opt = torch.optim.AdamW([q], lr=0.1)
    lam = L.LambdaLR(torch_opt, lambda t: min(1.0, t / 2) if t < 2 else max(0.0, (10 - t) / 8))
    lam.load_state_dict(saved)
    assert lam.last_epoch == 4 and lam.base_lrs == [0.1]
    assert lam.get_last_lr() == pytest.approx([float(opt.param_groups[0]["lr"])], rel=1e-12)


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()
