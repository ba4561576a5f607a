"""Checkpoint and resume: bitwise identical to an uninterrupted run; torch checkpoints in and out."""

import copy
import io
import warnings

import pytest
import torch

import fusedlr
from fusedlr import schedules as S
from registry import OPTIMIZERS as REGISTRY
from twins import SCHEDULES, torch_twin

warnings.filterwarnings("ignore", message=".*lr_scheduler.step\\(\\)")

PLATEAU = S.ReduceLROnPlateau(patience=1, factor=0.5, cooldown=1)
OPTIMIZERS = {name: (lambda params, s, entry=entry: entry.fused(params, schedule=s, **entry.alike))
              for name, entry in REGISTRY.items()}


def gradients(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(5, 3, generator=gen), torch.randn(11, generator=gen)] for _ in range(n)]


def metric(k):
    return torch.tensor(float(10 - k % 4 + (k // 9)))  # stalls and worsens: the plateau fires


def train(opt, params, grads, observe):
    for k, gs in enumerate(grads):
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        if observe:
            opt.observe(metric(k))


def save_load(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer)  # weights_only=True: the state_dict holds plain data only


@pytest.mark.parametrize("schedule", list(SCHEDULES) + ["ReduceLROnPlateau"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_resume_is_bitwise_identical(optimizer, schedule):
    s = PLATEAU if schedule == "ReduceLROnPlateau" else SCHEDULES[schedule]
    observe = schedule == "ReduceLROnPlateau"
    grads = gradients(60, seed=1)
    start = [torch.randn(5, 3, generator=torch.Generator().manual_seed(2)), torch.randn(11)]

    straight = [p.clone().requires_grad_() for p in start]
    straight_opt = OPTIMIZERS[optimizer](straight, s)
    train(straight_opt, straight, grads, observe)

    first = [p.clone().requires_grad_() for p in start]
    first_opt = OPTIMIZERS[optimizer](first, s)
    train(first_opt, first, grads[:23], observe)
    checkpoint = save_load({"params": [p.detach() for p in first], "opt": first_opt.state_dict()})

    resumed = [p.clone().requires_grad_() for p in checkpoint["params"]]
    resumed_opt = OPTIMIZERS[optimizer](resumed, S.StepLR(step_size=1000))  # the checkpoint's schedule wins
    resumed_opt.load_state_dict(checkpoint["opt"])
    for k in range(23, 60):
        for p, g in zip(resumed, grads[k]):
            p.grad = g.clone()
        resumed_opt.step()
        if observe:
            resumed_opt.observe(metric(k))

    for p, q in zip(straight, resumed):
        assert torch.equal(p, q)
    for p, q in zip(straight, resumed):
        for key, value in straight_opt.state[p].items():
            assert torch.equal(value, resumed_opt.state[q][key]), key
    assert torch.equal(straight_opt.last_lr(), resumed_opt.last_lr())
    assert torch.equal(straight_opt.schedule_steps(), resumed_opt.schedule_steps())


def test_torch_checkpoint_into_fusedlr_and_back():
    """torch AdamW + OneCycleLR for 40 steps -> fusedlr for 40 -> torch for 40 matches torch for 120."""
    grads = gradients(120, seed=7)
    schedule = S.OneCycleLR(max_lr=0.02, total_steps=120)
    start = [torch.randn(5, 3, dtype=torch.float64), torch.randn(11, dtype=torch.float64)]

    def torch_run(params, opt, sched, ks):
        for k in ks:
            for p, g in zip(params, grads[k]):
                p.grad = g.double()
            opt.step()
            if k < 119:
                sched.step()

    ref = [p.clone().requires_grad_() for p in start]
    ref_opt = torch.optim.AdamW(ref, lr=0.02, weight_decay=0.1, foreach=False)
    ref_sched = torch_twin(schedule, ref_opt)
    torch_run(ref, ref_opt, ref_sched, range(120))

    a = [p.clone().requires_grad_() for p in start]
    a_opt = torch.optim.AdamW(a, lr=0.02, weight_decay=0.1, foreach=False)
    a_sched = torch_twin(schedule, a_opt)
    torch_run(a, a_opt, a_sched, range(40))

    b = [p.detach().clone().requires_grad_() for p in a]
    b_opt = fusedlr.AdamW(b, lr=0.02, weight_decay=0.1, schedule=schedule)
    b_opt.load_state_dict(save_load(a_opt.state_dict()))
    assert b_opt.schedule_steps().tolist() == [40]
    assert float(b_opt.last_lr()[0]) == pytest.approx(a_sched.get_last_lr()[0], rel=1e-12)
    for k in range(40, 80):
        for p, g in zip(b, grads[k]):
            p.grad = g.double()
        b_opt.step()

    c = [p.detach().clone().requires_grad_() for p in b]
    c_opt = torch.optim.AdamW(c, lr=0.02, weight_decay=0.1, foreach=False)
    c_sched = torch_twin(schedule, c_opt)
    c_opt.load_state_dict(save_load(b_opt.state_dict()))
    c_sched.load_state_dict({**c_sched.state_dict(), "last_epoch": 80, "_step_count": 81})
    c_sched._update_lr(80)  # put torch's scheduler at step 80 as its own checkpoint would
    torch_run(c, c_opt, c_sched, range(80, 120))

    for p, q in zip(ref, c):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)
    for p, q in zip(ref, c):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ref_opt.state[p][key], c_opt.state[q][key], rtol=1e-9, atol=1e-11)


def snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            {p: {k: v.clone() for k, v in opt.state[p].items()} for p in params if p in opt.state},
            opt.schedule_steps().clone(), opt.last_lr().clone())


def assert_unchanged(before, opt, params):
    values, state, steps, lr = before
    for p, v in zip(params, values):
        assert torch.equal(p.detach(), v)
    assert set(opt.state.keys()) == set(state.keys())
    for p in state:
        for k, v in state[p].items():
            assert torch.equal(opt.state[p][k], v)
    assert torch.equal(opt.schedule_steps(), steps)
    assert torch.equal(opt.last_lr(), lr)


def trained(optimizer="adamw", **settings):
    """Two parameters and an optimizer of the registry (its settings updated by `settings`) after
    three steps."""
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(11))]
    entry = REGISTRY[optimizer]
    opt = entry.fused(params, schedule=S.StepLR(step_size=2), **dict(entry.alike, **settings))
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return params, opt


def trained_adam():
    """AdamW with state exp_avg and exp_avg_sq."""
    return trained("adamw", amsgrad=False)


@pytest.mark.parametrize("optimizer", list(REGISTRY))
def test_state_dict_of_another_layout_raises_and_changes_nothing(optimizer):
    params, opt = trained(optimizer)
    before = snapshot(opt, params)
    other_params = [torch.nn.Parameter(torch.randn(3, 5)), torch.nn.Parameter(torch.randn(11))]
    other = REGISTRY[optimizer].fused(other_params, **REGISTRY[optimizer].alike)
    for p in other_params:
        p.grad = torch.randn_like(p)
    other.step()
    with pytest.raises(ValueError, match="different parameter layout"):
        opt.load_state_dict(other.state_dict())
    assert_unchanged(before, opt, params)

    fewer = REGISTRY[optimizer].fused([torch.nn.Parameter(torch.randn(5, 3))])
    with pytest.raises(ValueError, match="parameters"):
        opt.load_state_dict(fewer.state_dict())
    assert_unchanged(before, opt, params)

    two_groups = REGISTRY[optimizer].fused([{"params": [torch.nn.Parameter(torch.randn(5, 3))]},
                                            {"params": [torch.nn.Parameter(torch.randn(11))]}])
    with pytest.raises(ValueError, match="groups"):
        opt.load_state_dict(two_groups.state_dict())
    assert_unchanged(before, opt, params)

    bad_schedule = opt.state_dict()
    bad_schedule["param_groups"][0]["schedule"] = {"name": "StepLR", "args": {"step_size": 0}}
    with pytest.raises(ValueError, match="step_size"):
        opt.load_state_dict(bad_schedule)
    assert_unchanged(before, opt, params)


def test_optimizer_counter_exact_near_2_pow_40():
    """Resume at step 2**40 - 2: the int64 device counters count on exactly, and the lr is the
    schedule's at the exact step (a float32 counter would be thousands of steps off)."""
    big = 2 ** 40
    schedule = S.StepLR(step_size=2 ** 38, gamma=0.5)  # its fourth decay falls on step 2**40 exactly
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = fusedlr.Adam([p], lr=0.1, schedule=schedule)
    p.grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    state = opt.state_dict()
    state["param_groups"][0]["schedule_step"] = big - 2
    state["state"][0]["step"].fill_(big - 2)
    opt.load_state_dict(state)
    for k in range(big - 2, big + 3):
        assert int(opt.schedule_steps()[0]) == k
        assert float(opt.last_lr()[0]) == 0.1 * 0.5 ** (k // 2 ** 38)
        opt.step()
    assert int(opt.state[p]["step"]) == big + 3


def write_like_zero(opt, params, saved):
    """What torch's ZeroRedundancyOptimizer.load_state_dict does to the optimizer it wraps: each
    parameter's saved state put into opt.state, the saved groups' values into opt.param_groups."""
    for group, saved_group in zip(opt.param_groups, saved["param_groups"]):
        for index, p in zip(saved_group["params"], group["params"]):
            if index in saved["state"]:
                opt.state[p] = {k: v.clone() if isinstance(v, torch.Tensor) else v
                                for k, v in saved["state"][index].items()}
        for key, value in saved_group.items():
            if key != "params":
                group[key] = value


@pytest.mark.parametrize("optimizer", list(REGISTRY))
def test_state_written_into_opt_state_is_taken_as_loaded(optimizer):
    """A trained optimizer whose state and groups a wrapper overwrote with an earlier checkpoint's
    (ZeRO's load_state_dict) continues from that checkpoint, bitwise as an optimizer that never went
    further, its schedule resumed at its parameters' step counts."""
    params, opt = trained(optimizer)
    saved = opt.state_dict()
    # ZeRO saves its own groups, copies of the optimizer's live ones: no schedule state in them
    saved = {"state": {i: {k: v.clone() for k, v in s.items()} for i, s in saved["state"].items()},
             "param_groups": [dict({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in g.items()
                                    if k != "params"}, params=s["params"])
                              for g, s in zip(opt.param_groups, saved["param_groups"])]}
    twin_params, twin = copy.deepcopy((params, opt))
    values = [p.detach().clone() for p in params]
    grads = [[torch.randn_like(p) for p in params] for _ in range(5)]
    for step_grads in grads[:3]:  # further than the checkpoint
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    write_like_zero(opt, params, saved)
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
    assert torch.equal(opt.schedule_steps(), twin.schedule_steps())
    for step_grads in grads:
        for ps, o in ((params, opt), (twin_params, twin)):
            for p, g in zip(ps, step_grads):
                p.grad = g.clone()
            o.step()
        for p, q in zip(params, twin_params):
            assert torch.equal(p, q)
    assert torch.equal(opt.last_lr(), twin.last_lr())


def test_bad_state_written_into_opt_state_raises_and_changes_nothing():
    params, opt = trained_adam()
    values = [p.detach().clone() for p in params]
    steps = opt._group_steps.clone()
    kept = {k: v.clone() for k, v in opt.state[params[1]].items()}
    opt.state[params[0]] = {"step": torch.tensor(3), "exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)}
    for p in params:
        p.grad = torch.randn_like(p)
    for _ in range(2):  # and again: the written entry is still to take
        with pytest.raises(ValueError, match="exp_avg of parameter 0 has shape"):
            opt.step()
        assert all(torch.equal(p, v) for p, v in zip(params, values))
        assert torch.equal(opt._group_steps, steps)
        assert all(torch.equal(opt.state[params[1]][k], v) for k, v in kept.items())
    opt.state[params[0]] = {}  # an empty entry is no state: the parameter starts afresh
    opt.step()
    assert not any(torch.equal(p, v) for p, v in zip(params, values))


def test_a_replaced_lr_equal_to_the_schedules_is_no_conflict():
    params, opt = trained_adam()
    expected = float(opt.last_lr()[0])
    opt.param_groups[0]["lr"] = expected  # as ZeRO copies its groups back, once after a load
    opt.step()
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)  # the optimizer's own view again
    opt.param_groups[0]["lr"] = float(opt.last_lr()[0]) * 2
    with pytest.raises(fusedlr.lr.LRConflictError, match="was replaced"):
        opt.step()


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_saved_groups_hold_every_key_of_torchs_groups(name):
    """torch.distributed.checkpoint loads every key of the state_dict it loads into: a fusedlr
    checkpoint resumes torch's optimizer only if its groups hold all of torch's keys."""
    params = [torch.nn.Parameter(torch.randn(3))]
    ours = getattr(fusedlr, name)(params, lr=0.1).state_dict()["param_groups"][0]
    theirs = getattr(torch.optim, name)(params, lr=0.1).param_groups[0]
    assert set(theirs) <= set(ours)
    for key in ("foreach", "fused", "capturable", "differentiable"):
        if key in theirs:
            assert ours[key] == theirs[key], key  # torch's defaults
