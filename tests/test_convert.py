"""fusedlr.from_torch and fusedlr.schedules.from_hf: a torch optimizer + scheduler, mid-run, becomes
one fusedlr optimizer that continues as torch would. (HF's get_scheduler names: test_schedule_coverage.)"""

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
@pytest.mark.parametrize("at", [30, 31])  # 31: mid-epoch for the schedules stepped per epoch
def test_mid_run_conversion_continues_as_torch(name, at):
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

    for k in range(at):  # 30: a whole number of epochs for the per-epoch schedules
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
    for k in range(at, 110):
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
    with pytest.raises(ValueError, match="CosineAnnealingWarmRestarts"):
        fusedlr.from_torch(opt, L.ChainedScheduler([L.StepLR(opt, 3), L.CosineAnnealingWarmRestarts(opt, 5)]))


def test_chained_scheduler_mid_run_continues_as_torch():
    """A ChainedScheduler of schedulers that multiply the lr in turn becomes their Product."""
    ours, ref = pair(3)
    ref_opt = torch.optim.AdamW(ref, lr=0.01, foreach=False)

    def chain(opt):
        return L.ChainedScheduler([L.ConstantLR(opt, factor=0.2, total_iters=20), L.ExponentialLR(opt, gamma=0.98),
                                   L.MultiStepLR(opt, milestones=[15, 40], gamma=0.5),
                                   L.CosineAnnealingLR(opt, T_max=90)])

    ref_sched = chain(ref_opt)
    gen = torch.Generator().manual_seed(4)
    for _ in range(12):
        for p in ref:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        ref_opt.step()
        ref_sched.step()
    with torch.no_grad():
        for p, q in zip(ours, ref):
            p.copy_(q)
    copy = torch.optim.AdamW(ours, lr=0.01, foreach=False)
    copy.load_state_dict(ref_opt.state_dict())
    copy_sched = chain(copy)
    copy_sched.load_state_dict(ref_sched.state_dict())
    opt = fusedlr.from_torch(copy, copy_sched)
    assert isinstance(opt.param_groups[0]["schedule"], S.Product)
    for k in range(12, 80):
        # torch's chain multiplies recursively: its drift is some 1e-14 relative over these steps
        assert float(opt.param_groups[0]["lr"]) == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-11), k
        for p, q in zip(ours, ref):
            q.grad = torch.randn(q.shape, generator=gen, dtype=q.dtype)
            p.grad = q.grad.clone()
        ref_opt.step()
        ref_sched.step()
        opt.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL)
