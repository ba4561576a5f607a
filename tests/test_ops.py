"""The ops themselves: torch.library.opcheck (schemas, aliasing, fake kernels), and the checks in C++."""

import pytest
import torch

import fusedlr  # noqa: F401
from fusedlr import _ops
from fusedlr import schedules as S

ops = torch.ops.fusedlr
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def step_args(device, dtype, optimizer, with_optional):
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (17,), (2, 2, 2)]
    params = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    grads[1] = None  # a parameter without a gradient is skipped
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    state = lambda: [torch.rand(s, generator=gen).to(device=device, dtype=state_dtype) for s in shapes]  # noqa: E731
    empty = lambda: [torch.empty(0, device=device, dtype=state_dtype) for _ in shapes]  # noqa: E731
    optional = state() if with_optional else empty()
    # master weights for low-precision parameters, with the gradient options
    low_precision = dtype in (torch.bfloat16, torch.float16)
    masters = [p.float() for p in params] if with_optional and low_precision else empty()
    options = {}
    if with_optional:
        options = dict(max_grad_norm=1.0, skip_nonfinite=True,
                       grad_norm=torch.zeros((), dtype=torch.float64, device=device))
    steps = [torch.tensor(k, dtype=torch.int64, device=device) for k in (0, 3, 9)]
    # Without optional state, SGD must not use momentum: no cycling, momentum 0.
    cycle = optimizer == "adam" or with_optional
    schedules = [S.OneCycleLR(max_lr=0.1, total_steps=50, cycle_momentum=cycle), S.StepLR(step_size=2)]
    programs = S.compile_programs(schedules)
    group_steps = torch.tensor([4, 7], dtype=torch.int64, device=device)
    plateau = _ops.initial_plateau_state(2, torch.device(device))
    if optimizer == "sgd":
        hyper = [0.1, 0.9 if cycle else 0.0, 0.0, 0.01, 0.0, 0.0, 0.05, 0.0, 0.1, 0.0, 0.0, 1.0]
        return ops.sgd_step_.default, (params, grads, optional, masters, steps, [0, 1, 1], hyper, programs,
                                       group_steps, plateau), options
    hyper = [0.1, 0.9, 0.999, 1e-8, 0.01, float(with_optional), 0.0, 1.0,
             0.05, 0.8, 0.99, 1e-6, 0.0, float(with_optional), 1.0, 0.0]
    return ops.adam_step_.default, (params, grads, state(), state(), optional, masters, steps, [0, 1, 1], hyper,
                                    programs, group_steps, plateau), options


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("with_optional", [False, True])
def test_opcheck_step_ops(device, dtype, optimizer, with_optional):
    op, args, kwargs = step_args(device, dtype, optimizer, with_optional)
    torch.library.opcheck(op, args, kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_schedule_ops(device):
    programs = S.compile_programs([S.ReduceLROnPlateau(patience=0), S.CyclicLR(base_lr=0.1, max_lr=1.0)])
    plateau = _ops.initial_plateau_state(2, torch.device(device))
    steps = torch.tensor([3, 5], dtype=torch.int64, device=device)
    torch.library.opcheck(ops.evaluate_schedules.default, (programs, [0.5, 0.5], steps, plateau))
    torch.library.opcheck(ops.plateau_observe_.default,
                          (torch.tensor(2.0, device=device), [0.5, 0.5], programs, plateau))


def test_step_op_applies_each_groups_schedule():
    op, args, _ = step_args("cpu", torch.float64, "sgd", with_optional=True)
    params, grads, buffers, masters, steps, tensor_group, hyper, programs, group_steps, plateau = args
    before = [p.clone() for p in params]
    op(*args)
    assert group_steps.tolist() == [5, 8]
    assert [int(s) for s in steps] == [1, 3, 10]  # parameter 1 had no gradient
    assert torch.equal(params[1], before[1])
    # group 1: StepLR(step_size=2) at step 7 on lr 0.05, no momentum, no weight decay, maximize
    lr = 0.05 * 0.1 ** (7 // 2)
    expected = before[2] + lr * grads[2]
    torch.testing.assert_close(params[2], expected, rtol=1e-12, atol=0)


def test_op_checks_run_before_any_change():
    op, args, _ = step_args("cpu", torch.float32, "adam", with_optional=False)
    params, grads, exp_avgs, exp_avg_sqs, optional, masters, steps, tensor_group, hyper, programs, group_steps, plateau = args
    snapshot = [t.clone() for t in params + exp_avgs + exp_avg_sqs + steps + [group_steps]]
    bad_cases = [
        dict(exp_avgs=exp_avgs[:2]),
        dict(tensor_group=[0, 1, 5]),
        dict(group_steps=group_steps.float()),
        dict(exp_avg_sqs=[exp_avg_sqs[0].double()] + exp_avg_sqs[1:]),
        dict(steps=steps[:2] + [torch.zeros(2, dtype=torch.int64)]),
        dict(programs=[1e9, 0.0] + programs[2:]),
        dict(hyper=hyper[:-1]),
        dict(masters=[p.clone() for p in params]),  # float32 parameters take no master weight
        dict(masters=masters[:1]),
    ]
    names = ["params", "grads", "exp_avgs", "exp_avg_sqs", "optional", "masters", "steps", "tensor_group", "hyper",
             "programs", "group_steps", "plateau"]
    for case in bad_cases:
        call = dict(zip(names, args), **case)
        with pytest.raises(RuntimeError, match="fusedlr"):
            op(*[call[n] for n in names])
        after = [t for t in params + exp_avgs + exp_avg_sqs + steps + [group_steps]]
        assert all(torch.equal(a, b) for a, b in zip(snapshot, after)), case


def test_evaluate_schedules_flags_cycled_momentum():
    programs = S.compile_programs([S.StepLR(step_size=2), S.OneCycleLR(max_lr=1.0, total_steps=10)])
    out = _ops.evaluate_schedules(programs, [0.3, 0.3], torch.tensor([3, 0]), _ops.initial_plateau_state(2, "cpu"))
    assert out[0].tolist() == pytest.approx([0.03, 0.0, 0.0])
    assert out[1].tolist() == pytest.approx([0.04, 0.95, 1.0])
