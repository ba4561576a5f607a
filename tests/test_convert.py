"""fusedlr.from_torch and fusedlr.schedules.from_hf: a torch optimizer + scheduler, mid-run, becomes
one fusedlr optimizer that continues as torch would; HF get_scheduler's names exact to HF's lrs."""

import warnings

import pytest
import torch
from torch.optim import lr_scheduler as L

import fusedlr
from fusedlr import schedules as S
from twins import SCHEDULES, torch_twin

warnings.filterwarnings("ignore", message=".*lr_scheduler.step\\(\\)")

# float64 Adam from equal inputs: only the last bits of each operation differ (see test_lr_convention).
RTOL, ATOL = 1e-11, 1e-13
TWINNED = [n for n, s in SCHEDULES.items()
           if s is not None and not isinstance(s, (S.InverseSqrt, S.WarmupStableDecay, S.ExponentialDecay))]


def pair(seed):
    gen = torch.Generator().manual_seed(seed)
    start = [torch.randn(5, 4, generator=gen, dtype=torch.float64), torch.randn(9, generator=gen, dtype=torch.float64)]
    return [p.clone().requires_grad_() for p in start], [p.clone().requires_grad_() for p in start]


@pytest.mark.parametrize("name", TWINNED)
def test_mid_run_conversion_continues_as_torch(name):
    schedule = SCHEDULES[name]
    unit = 1 if isinstance(schedule, S.OneCycleLR) else schedule.steps_per_epoch
    ours, ref = pair(1)
    ref_opt = torch.optim.AdamW(ref, lr=0.01, weight_decay=0.1, foreach=False)
    ref_sched = torch_twin(schedule, ref_opt)
    gen = torch.Generator().manual_seed(2)

    def torch_step(k):
        for p in ref:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        ref_opt.step()
        if (k + 1) % unit == 0:
            ref_sched.step()

    for k in range(30):  # a whole number of epochs for the per-epoch schedule
        torch_step(k)
    with torch.no_grad():
        for p, q in zip(ours, ref):
            p.copy_(q)
    copy = torch.optim.AdamW(ours, lr=0.01, weight_decay=0.1, foreach=False)
    copy.load_state_dict(ref_opt.state_dict())
    twin_copy = torch_twin(schedule, copy)
    twin_copy.load_state_dict(ref_sched.state_dict())
    opt = fusedlr.from_torch(copy, twin_copy, steps_per_epoch=unit if unit > 1 else 1)
    assert isinstance(opt, fusedlr.AdamW) and opt.param_groups[0]["weight_decay"] == 0.1
    for k in range(30, 110):
        assert float(opt.param_groups[0]["lr"]) == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-12)
        torch_step(k)
        for p, q in zip(ours, ref):
            p.grad = q.grad.clone()
        opt.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL)


def test_a_lambda_of_ones_own_raises_naming_it():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)

    def my_warmup(t):
        return min(1.0, t / 10)

    with pytest.raises(ValueError, match="my_warmup"):
        fusedlr.from_torch(opt, L.LambdaLR(opt, my_warmup))
    with pytest.raises(ValueError, match="ChainedScheduler"):
        fusedlr.from_torch(opt, L.ChainedScheduler([L.StepLR(opt, 3)]))


HF_CASES = [
    ("linear", 0, {}), ("linear", 7, {}), ("cosine", 5, {}), ("cosine_with_restarts", 4, {"num_cycles": 4}),
    ("constant", 0, {}), ("constant_with_warmup", 6, {}), ("cosine_with_min_lr", 5, {"min_lr_rate": 0.1}),
    ("cosine_with_min_lr", 3, {"min_lr": 1e-4}), ("inverse_sqrt", 6, {}),
    ("warmup_stable_decay", 5, {"num_decay_steps": 20, "decay_type": "1-sqrt", "min_lr_ratio": 0.05}),
    ("warmup_stable_decay", 0, {"num_decay_steps": 14, "num_stable_steps": 10, "decay_type": "cosine"}),
    ("warmup_stable_decay", 4, {"num_decay_steps": 30, "decay_type": "linear", "min_lr_ratio": 0.2}),
]


@pytest.mark.parametrize("name,warmup,kwargs", HF_CASES)
def test_hf_get_scheduler_converts_exactly(name, warmup, kwargs):
    transformers = pytest.importorskip("transformers")
    total = 44
    params = [torch.nn.Parameter(torch.zeros(2))]
    hf_opt = torch.optim.AdamW(params, lr=3e-3)
    hf_sched = transformers.get_scheduler(name, hf_opt, num_warmup_steps=warmup, num_training_steps=total,
                                          scheduler_specific_kwargs=kwargs)
    expected = []
    for _ in range(total):
        expected.append(hf_opt.param_groups[0]["lr"])
        hf_opt.step()
        hf_sched.step()
    converted = fusedlr.from_torch(torch.optim.AdamW(params, lr=3e-3), None)
    direct = S.from_hf(name, warmup, total, base_lr=3e-3, **kwargs)
    fresh_opt = torch.optim.AdamW(params, lr=3e-3)
    from_sched = fusedlr.convert.schedule_of(transformers.get_scheduler(
        name, fresh_opt, num_warmup_steps=warmup, num_training_steps=total, scheduler_specific_kwargs=kwargs))
    assert converted.param_groups[0]["schedule"] is None
    for schedule in (direct, from_sched):
        assert [schedule(t, 3e-3) for t in range(total)] == pytest.approx(expected, rel=1e-12, abs=1e-18)


def test_from_hf_refuses_what_it_cannot_express():
    for name, kwargs in [("polynomial", {}), ("cosine", {"num_cycles": 1.5}), ("inverse_sqrt", {"timescale": 9}),
                         ("cosine_with_restarts", {"num_cycles": 3}),
                         ("warmup_stable_decay", {"num_decay_steps": 9, "warmup_type": "cosine"})]:
        with pytest.raises(ValueError, match=name if name != "cosine" else "num_cycles"):
            S.from_hf(name, 4, 44, **kwargs)
