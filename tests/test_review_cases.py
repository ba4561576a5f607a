"""Edge cases: the step's cached lists follow the optimizer's state, torch checkpoints of every
optimizer, zero-size parameters, groups without parameters, malformed input."""

import collections
import copy
import io
import math
import warnings

import numpy as np
import pytest
import torch

import fusedlr
from fusedlr import _ops
from fusedlr import schedules as S

warnings.filterwarnings("ignore", message=".*lr_scheduler.step\\(\\)")


def pair(values):
    return torch.nn.Parameter(torch.tensor(values)), torch.nn.Parameter(torch.tensor(values))


def test_replacing_or_clearing_state_and_editing_groups_is_followed():
    (a, ta), (b, tb) = pair([1.0]), pair([1.0])
    opt = fusedlr.SGD([a, b], lr=1.0, momentum=0.9)
    ref = torch.optim.SGD([ta, tb], lr=1.0, momentum=0.9, foreach=False)
    for p in (a, b, ta, tb):
        p.grad = torch.ones(1)
    opt.step(), ref.step()
    opt.state.clear(), ref.state.clear()
    opt.step(), ref.step()
    assert a.item() == ta.item() and b.item() == tb.item()
    opt.param_groups[0]["params"] = [a]
    ref.param_groups[0]["params"] = [ta]
    opt.step(), ref.step()
    assert (a.item(), b.item()) == (ta.item(), tb.item())


def test_torch_sgd_checkpoints_load():
    for momentum in (0.0, 0.9):
        (p, q) = pair([1.0, 2.0])
        ref = torch.optim.SGD([q], lr=0.1, momentum=momentum, foreach=False)
        sched = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.5)
        for _ in range(5):
            q.grad = torch.ones(2)
            ref.step()
            sched.step()
        opt = fusedlr.SGD([p], lr=0.1, momentum=momentum, schedule=S.StepLR(step_size=2, gamma=0.5))
        opt.load_state_dict(ref.state_dict())
        opt.set_schedule_steps(5)  # torch's SGD state carries no step count
        assert float(opt.last_lr()[0]) == pytest.approx(sched.get_last_lr()[0])
        p.data.copy_(q.detach())
        for _ in range(4):
            p.grad, q.grad = torch.ones(2), torch.ones(2)
            opt.step()
            ref.step()
            sched.step()
        torch.testing.assert_close(p, q)


def test_fusedlr_checkpoint_gives_torch_the_scheduled_lr():
    p = torch.nn.Parameter(torch.ones(2))
    opt = fusedlr.Adam([p], lr=0.1, schedule=S.ExponentialLR(gamma=0.5))
    for _ in range(4):
        p.grad = torch.ones(2)
        opt.step()
    saved = opt.state_dict()
    assert saved["param_groups"][0]["lr"] == pytest.approx(0.1 * 0.5 ** 4)
    assert saved["param_groups"][0]["initial_lr"] == 0.1
    q = torch.nn.Parameter(torch.ones(2))
    ref = torch.optim.Adam([q], lr=0.1)
    ref.load_state_dict(saved)
    assert ref.param_groups[0]["lr"] == pytest.approx(0.00625)
    again = fusedlr.Adam([torch.nn.Parameter(torch.ones(2))], lr=0.3)
    again.load_state_dict(saved)
    group = again.param_groups[0]
    assert group["initial_lr"] == 0.1 and float(group["lr"]) == float(again.last_lr()[0]) == pytest.approx(0.00625)


@pytest.mark.parametrize("optimizer", [lambda p: fusedlr.SGD(p, lr=0.1, momentum=0.9),
                                       lambda p: fusedlr.Adam(p, amsgrad=True)])
def test_zero_size_parameters(optimizer):
    empty, full = torch.nn.Parameter(torch.zeros(0, 5)), torch.nn.Parameter(torch.ones(3))
    opt = optimizer([empty, full])
    for _ in range(2):
        empty.grad, full.grad = torch.zeros(0, 5), torch.ones(3)
        opt.step()
    assert int(opt.state[full]["step"]) == 2 and not torch.equal(full.detach(), torch.ones(3))


def test_group_without_parameters_first():
    opt = fusedlr.AdamW([{"params": []}, {"params": [torch.nn.Parameter(torch.ones(2))]}], lr=0.1)
    assert opt.schedule_steps().tolist() == [0, 0]
    with pytest.raises(ValueError, match="mixed devices"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2, device="meta"))]})
    assert len(opt.param_groups) == 2 and opt.schedule_steps().shape == (2,)
    assert opt.last_lr().tolist() == [0.1, 0.1]


def test_loaded_state_must_be_runnable():
    p = torch.nn.Parameter(torch.ones(2))
    opt = fusedlr.Adam([p], lr=0.1, schedule=S.StepLR(step_size=2))
    p.grad = torch.ones(2)
    opt.step()
    good = copy.deepcopy(opt.state_dict())  # a state_dict shares the optimizer's state dicts, as torch's
    cases = []
    bad = copy.deepcopy(good)
    bad["state"][0] = {"step": torch.tensor(3.0)}
    cases.append((bad, "exp_avg"))
    for step in (-7, 2.9, True, "3"):
        bad = copy.deepcopy(good)
        bad["param_groups"][0]["schedule_step"] = step
        cases.append((bad, "schedule_step"))
    for plateau in ([0.0] * 3, None, ["a"] * 4):
        bad = copy.deepcopy(good)
        bad["param_groups"][0]["plateau_state"] = plateau
        cases.append((bad, "plateau_state"))
    bad = copy.deepcopy(good)
    bad["state"][0]["step"] = True
    cases.append((bad, "step"))
    bad = copy.deepcopy(good)
    bad["param_groups"][0]["schedule"] = {"name": "StepLR", "args": {"gamma": 0.5}}
    cases.append((bad, "StepLR"))
    for state_dict, message in cases:
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(state_dict)
    opt.load_state_dict(good)


def test_equal_schedules_share_one_program_after_a_resume():
    shared = S.SequentialLR([S.LinearLR(start_factor=0.1, total_iters=10), S.OneCycleLR(max_lr=0.1, total_steps=90)],
                            milestones=[10])
    params = [torch.nn.Parameter(torch.ones(1)) for _ in range(24)]
    opt = fusedlr.SGD([{"params": [p]} for p in params], lr=0.1, momentum=0.9, schedule=shared)
    before = len(opt._programs_now())
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    opt.load_state_dict(torch.load(buffer))
    assert len(opt._programs_now()) == before


def test_integer_arguments_stay_exact_in_a_program():
    with pytest.raises(ValueError, match="total_iters"):
        S.LinearLR(total_iters=2 ** 63)
    with pytest.raises(ValueError, match="milestones"):
        S.MultiStepLR(milestones=[2 ** 53 + 1])


def test_numpy_arguments_become_python_numbers():
    s = S.OneCycleLR(max_lr=np.float32(0.1), total_steps=np.int64(100))
    assert type(s.max_lr) is float and type(s.total_steps) is int
    buffer = io.BytesIO()
    torch.save(s.spec(), buffer)
    buffer.seek(0)
    assert S.from_spec(torch.load(buffer)) == s


@pytest.mark.parametrize("corrupt", ["steps_per_epoch", "child"])
def test_malformed_programs_raise_instead_of_crashing(corrupt):
    program = S.compile_programs([S.SequentialLR([S.StepLR(step_size=2), S.ExponentialLR(gamma=0.9)],
                                                 milestones=[3])])
    root = int(program[0])
    if corrupt == "steps_per_epoch":
        program[root + 1] = 0.0
    else:
        program[root + 2 + 1 + 1] = 1e8  # the first child's offset
    with pytest.raises(RuntimeError, match="program"):
        _ops.evaluate_schedules(program, [0.1], torch.tensor([5]), _ops.initial_plateau_state(1, "cpu"))
    assert math.isfinite(S.StepLR(step_size=2)(5, 0.1))


def test_inference_tensors_update_in_inference_mode_only():
    """Inference tensors (no version counter) are updated in inference mode, by every thread of the
    step; outside it the step refuses them before anything changes."""
    with torch.inference_mode():
        params = [torch.randn(40_000) for _ in range(4)]
        for p in params:
            p.grad = torch.ones(40_000)
        opt = fusedlr.SGD(params, lr=0.1)
        before = [p.clone() for p in params]
        opt.step()
        assert all(torch.equal(p, b - 0.1) for p, b in zip(params, before))
    counters = opt.schedule_steps().clone()
    with pytest.raises(RuntimeError, match="inference"):
        opt.step()
    with torch.inference_mode():
        assert all(torch.equal(p, b - 0.1) for p, b in zip(params, before))
    assert torch.equal(opt.schedule_steps(), counters)


def test_tensor_hyperparameter_changed_in_place_is_seen():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = fusedlr.SGD([p], lr=0.1)
    opt.param_groups[0]["lr"] = lr = torch.tensor(0.1)
    p.grad = torch.ones(3)
    opt.step()
    lr.fill_(0.0)
    opt.step()
    assert torch.allclose(p.detach(), torch.full((3,), -0.1))


def close(p, q):
    # values of order 1 after eight steps, each rounded within an ulp (1.2e-7) of torch's
    torch.testing.assert_close(p, q, rtol=1e-6, atol=2e-7)


def test_hyperparameter_changes_are_seen_between_steps():
    """Each kind of change to a group: a new float, a list (then edited in place), a new params
    list holding the same tensors (never compared by value), a new state dict.

    Compared with torch within a few float32 ulps, not bitwise: torch's own float32 Adam rounds by
    the machine. Its float32 sqrt (MKL's) is off by an ulp for about 1 value in 200, differently on
    Intel and AMD CPUs, and its vectorized lerp and addcmul fuse multiply-adds on AVX2 and AVX-512
    only. fusedlr rounds every operation once, the same on every CPU (tests/test_cpu_isa.py). An
    edit the step missed would move the parameters by 1e-5 or more, far outside the tolerance."""
    (a, ta), (b, tb) = pair([1.0, -2.0]), pair([0.5, 3.0])
    opt = fusedlr.Adam([a, b], lr=0.1)
    ref = torch.optim.Adam([ta, tb], lr=0.1, foreach=False)
    edits = [
        lambda g: g.__setitem__("lr", 0.05),
        lambda g: g.__setitem__("betas", [0.8, 0.99]),
        lambda g: g["betas"].__setitem__(0, 0.5),  # the same list, edited in place
        lambda g: g.__setitem__("params", list(g["params"])),
        lambda g: g.__setitem__("eps", 1e-3),
        lambda g: g.__setitem__("weight_decay", 0.1),
    ]
    gen = torch.Generator().manual_seed(0)
    for edit in [None] + edits + [None]:
        if edit is not None:
            edit(opt.param_groups[0])
            edit(ref.param_groups[0])
        for p, q in ((a, ta), (b, tb)):
            p.grad = torch.randn(2, generator=gen)
            q.grad = p.grad.clone()
        opt.step(), ref.step()
        close(a, ta), close(b, tb)
    opt.state = collections.defaultdict(dict, opt.state)  # another dict: its tensors are read again
    opt.state[a] = {key: value.clone() for key, value in opt.state[a].items()}
    opt.state[a]["exp_avg"].zero_()
    ref.state[ta]["exp_avg"].zero_()
    a.grad = torch.ones(2)
    ta.grad = torch.ones(2)
    opt.step(), ref.step()
    close(a, ta)


def test_negative_view_gradient_is_applied_with_its_sign():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = fusedlr.SGD([p], lr=0.1)
    p.grad = torch.ones(3)._neg_view()  # reads as -1
    opt.step()
    assert torch.allclose(p.detach(), torch.full((3,), 0.1))


def test_parameter_with_a_late_first_gradient_gets_its_state():
    """A parameter without a gradient for the first steps (frozen, then unfrozen) joins the step the
    first time it has one, as in torch."""
    params = [torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))]
    ref = [p.detach().clone().requires_grad_() for p in params]
    opt = fusedlr.AdamW(params, lr=0.1)
    ref_opt = torch.optim.AdamW(ref, lr=0.1, foreach=False)
    for k in range(6):
        for p, q in zip(params, ref):
            p.grad = q.grad = None
        for p, q in list(zip(params, ref))[: 1 if k < 3 else 2]:
            p.grad = torch.full((4,), float(k + 1))
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    assert int(opt.state[params[1]]["step"]) == 3 and int(opt.state[params[0]]["step"]) == 6
    for p, q in zip(params, ref):
        torch.testing.assert_close(p, q)
