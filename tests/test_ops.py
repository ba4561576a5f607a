"""The ops themselves: torch.library.opcheck (schemas, aliasing, fake kernels), and the checks in C++."""

import random

import pytest
import torch

import fusedlr  # noqa: F401
from fusedlr import _ops
from fusedlr import schedules as S
from registry import OPS

ops = torch.ops.fusedlr
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def group_hyper(entry, schedule, r, optional):
    """A group's `hyper` slots drawn for `entry`, needing no optional state unless `optional`."""
    while True:
        values, needs_optional = entry.random_hyper(r, schedule)
        if optional or not needs_optional:
            return entry.hyper(values), values


def step_args(device, dtype, optimizer, with_optional):
    entry, descriptor = OPS[optimizer], _ops.OPTIMIZERS[optimizer]
    gen = torch.Generator().manual_seed(0)
    r = random.Random(0)
    shapes = [(3, 4), (17,), (2, 2, 2)]
    params = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    grads[1] = None  # a parameter without a gradient is skipped
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    state = lambda: [torch.rand(s, generator=gen).to(device=device, dtype=state_dtype) for s in shapes]  # noqa: E731
    empty = lambda: [torch.empty(0, device=device, dtype=state_dtype) for _ in shapes]  # noqa: E731
    # master weights for low-precision parameters, with the gradient options
    low_precision = dtype in (torch.bfloat16, torch.float16)
    lists = []
    for key in descriptor.states:
        if key == "master_weight":
            lists.append([p.float() for p in params] if with_optional and low_precision else empty())
        else:
            lists.append(state() if with_optional or key in descriptor.required else empty())
    options = {}
    if with_optional:
        options = dict(max_grad_norm=1.0, skip_nonfinite=True,
                       grad_norm=torch.zeros((), dtype=torch.float64, device=device))
    steps = [torch.tensor(k, dtype=torch.int64, device=device) for k in (0, 3, 9)]
    # Without optional state, a momentum buffer must not be needed: no cycling.
    schedules = [S.OneCycleLR(max_lr=0.1, total_steps=50, cycle_momentum=with_optional), S.StepLR(step_size=2)]
    programs = S.compile_programs(schedules)
    group_steps = torch.tensor([4, 7], dtype=torch.int64, device=device)
    plateau = _ops.initial_plateau_state(2, torch.device(device))
    hyper = [value for schedule in schedules for value in group_hyper(entry, schedule, r, with_optional)[0]]
    op = getattr(ops, descriptor.op).default
    return op, (params, grads, *lists, steps, [0, 1, 1], hyper, programs, group_steps, plateau), options


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("optimizer", list(OPS))
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
    sgd = OPS["sgd"]
    hyper = sgd.hyper(dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=0.0, maximize=0.0)) + \
        sgd.hyper(dict(lr=0.05, momentum=0.0, dampening=0.1, weight_decay=0.0, nesterov=0.0, maximize=1.0))
    before = [p.clone() for p in params]
    op(params, grads, buffers, masters, steps, tensor_group, hyper, programs, group_steps, plateau)
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


def bits(t):
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]) if t.numel() else t


@pytest.mark.parametrize("optimizer", list(OPS))
def test_groups_keep_their_own_settings_on_every_path(optimizer):
    """Three groups of different settings and schedules, stepped by the op in one call, by a plan's
    prepared step (csrc/cpu/prepared_step.h) and by the op one group at a time: bitwise the same
    after every step. A step that gave a group another group's settings or schedule (each group's
    lr differs) on any of the paths would fail it."""
    entry, descriptor = OPS[optimizer], _ops.OPTIMIZERS[optimizer]
    r = random.Random(1)
    gen = torch.Generator().manual_seed(1)
    schedules = [S.OneCycleLR(max_lr=0.05, total_steps=20), S.StepLR(step_size=2, gamma=0.5), None]
    hyper = []
    for g, schedule in enumerate(schedules):
        slots, values = group_hyper(entry, schedule, r, optional=True)
        slots[descriptor.slots.index("lr")] = [0.01, 0.02, 0.005][g]
        hyper.append(slots)
    tensor_group = [0, 1, 2, 1, 0, 2]
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float32, torch.float64, torch.float32]
    start = [torch.randn(5 + 7 * i, generator=gen).to(dtype) for i, dtype in enumerate(dtypes)]

    def state_of(p, key):
        if key == "master_weight":
            return p.float() if p.dtype == torch.bfloat16 else torch.empty(0)
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        return torch.rand(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(dtype)

    def fresh():
        params = [p.clone() for p in start]
        return dict(params=params, states=[[state_of(p, key) for p in params] for key in descriptor.states],
                    steps=[torch.tensor(i % 3, dtype=torch.int64) for i in range(len(params))],
                    group_steps=torch.tensor([3, 0, 5], dtype=torch.int64),
                    plateau=_ops.initial_plateau_state(3, torch.device("cpu")))

    whole, prepared, alone = fresh(), fresh(), fresh()
    programs = S.compile_programs(schedules)
    flat_hyper = [v for slots in hyper for v in slots]
    plan = descriptor.plan(prepared["params"], prepared["states"], prepared["steps"], tensor_group)
    plan.configure(flat_hyper, programs, prepared["group_steps"], prepared["plateau"], None, False, None, None)
    for k in range(4):
        grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in start]
        _ops.step_(optimizer, whole["params"], grads, whole["states"], whole["steps"], tensor_group, flat_hyper,
                   programs, whole["group_steps"], whole["plateau"])
        plan.step(None, None, grads)
        for g, schedule in enumerate(schedules):
            members = [i for i, group in enumerate(tensor_group) if group == g]
            group_steps = alone["group_steps"][g:g + 1].clone()
            _ops.step_(optimizer, [alone["params"][i] for i in members], [grads[i] for i in members],
                       [[states[i] for i in members] for states in alone["states"]],
                       [alone["steps"][i] for i in members], [0] * len(members), hyper[g],
                       S.compile_programs([schedule]), group_steps, alone["plateau"][g:g + 1].clone())
            alone["group_steps"][g] = group_steps[0]
        for name, run in (("prepared step", prepared), ("one group at a time", alone)):
            for i in range(len(start)):
                for what, a, b in [("param", whole["params"][i], run["params"][i]),
                                   ("step", whole["steps"][i], run["steps"][i])] + [
                        (key, whole["states"][s][i], run["states"][s][i]) for s, key in enumerate(descriptor.states)]:
                    assert torch.equal(bits(a), bits(b)), f"step {k}, {name}: {what} of tensor {i} differs"
            assert torch.equal(whole["group_steps"], run["group_steps"]), f"step {k}, {name}: group steps"
