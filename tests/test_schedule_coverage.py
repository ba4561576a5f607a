"""The general schedule nodes (Warmup, Decay, Cycles) against the schedulers they stand in for:
HF transformers' get_scheduler, timm's cosine / tanh / poly schedulers, torchtitan's warmup-stable-
decay, each run as its own library runs it; and the kind table both sides read."""

import math
import random
import warnings

import pytest
import torch

import fusedlr
from fusedlr import _C, _ops
from fusedlr import schedules as S

warnings.filterwarnings("ignore", message=".*lr_scheduler.step\\(\\)")

# The references compute the same formulas in Python floats; the order of a few operations differs
# (a floor applied as f * (1 - r) + r or r + (1 - r) * f), which moves the last bits of an lr. 1e-12
# relative is some 4,500 ulps of room and still far below any slip of a step or a shape (>= 1e-4).
REL, ABS = 1e-12, 1e-18


# ---------------------------------------------------------------------------------------------
# HF transformers

HF_CASES = [
    ("constant", 0, {}), ("constant_with_warmup", 6, {}),
    ("linear", 0, {}), ("linear", 7, {}),
    ("cosine", 5, {}), ("cosine", 4, {"num_cycles": 1.5}), ("cosine", 0, {"num_cycles": 0.3}),
    ("cosine_with_restarts", 4, {"num_cycles": 4}), ("cosine_with_restarts", 3, {"num_cycles": 3}),
    ("cosine_with_restarts", 0, {"num_cycles": 2.5}),
    ("polynomial", 5, {}), ("polynomial", 3, {"lr_end": 1e-4, "power": 2.0}),
    ("polynomial", 0, {"lr_end": 0.0, "power": 0.5}),
    ("inverse_sqrt", 6, {}), ("inverse_sqrt", 4, {"timescale": 9}), ("inverse_sqrt", 0, {"timescale": 3}),
    ("cosine_with_min_lr", 5, {"min_lr_rate": 0.1}), ("cosine_with_min_lr", 3, {"min_lr": 1e-4}),
    ("cosine_with_min_lr", 2, {"min_lr_rate": 0.2, "num_cycles": 1.0}),
    ("cosine_warmup_with_min_lr", 5, {"min_lr_rate": 0.1}),
    ("cosine_warmup_with_min_lr", 6, {"min_lr": 2e-4, "warmup_lr_rate": 0.05}),
    ("cosine_warmup_with_min_lr", 0, {"min_lr_rate": 0.3, "num_cycles": 0.75}),
    ("warmup_stable_decay", 5, {"num_decay_steps": 20, "decay_type": "1-sqrt", "min_lr_ratio": 0.05}),
    ("warmup_stable_decay", 0, {"num_decay_steps": 14, "num_stable_steps": 10, "decay_type": "cosine"}),
    ("warmup_stable_decay", 4, {"num_decay_steps": 30, "decay_type": "linear", "min_lr_ratio": 0.2}),
    ("warmup_stable_decay", 8, {"num_decay_steps": 12, "warmup_type": "cosine", "min_lr_ratio": 0.1}),
    ("warmup_stable_decay", 8, {"num_decay_steps": 12, "warmup_type": "1-sqrt", "decay_type": "cosine",
                                "num_cycles": 0.8}),
    ("warmup_stable_decay", 6, {"num_decay_steps": 38, "warmup_type": "cosine", "decay_type": "1-sqrt"}),
]
TOTAL = 44
LRS = (3e-3, 7e-4)  # the optimizer's default lr, and a second group's


def hf_lrs(transformers, name, warmup, kwargs, steps):
    """Each group's lr at every step, from HF's own scheduler on a torch optimizer."""
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    opt = torch.optim.AdamW([{"params": [params[0]]}, {"params": [params[1]], "lr": LRS[1]}], lr=LRS[0])
    sched = transformers.get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=TOTAL,
                                       scheduler_specific_kwargs=kwargs)
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out, opt, sched


@pytest.mark.parametrize("name,warmup,kwargs", HF_CASES)
def test_every_hf_schedule_exact(name, warmup, kwargs):
    """from_hf and from_torch's reading of the LambdaLR both give HF's lr for each group at every
    step, six steps past num_training_steps too."""
    transformers = pytest.importorskip("transformers")
    steps = TOTAL + 6
    expected, _, _ = hf_lrs(transformers, name, warmup, kwargs, steps)
    direct = S.from_hf(name, warmup, TOTAL, base_lr=LRS[0], **kwargs)
    _, fresh, fresh_sched = hf_lrs(transformers, name, warmup, kwargs, 0)
    converted = [fusedlr.convert.schedule_of(fresh_sched, g) for g in range(2)]
    for g, base in enumerate(LRS):
        want = [row[g] for row in expected]
        for schedule in (direct, converted[g]):
            got = schedule.values(range(steps), base_lr=base)[0].tolist()
            assert got == pytest.approx(want, rel=REL, abs=ABS), (schedule, g)


@pytest.mark.parametrize("name,warmup,kwargs", [HF_CASES[i] for i in (5, 11, 14, 20, 26)])
def test_hf_schedule_through_the_optimizer(name, warmup, kwargs):
    """The converted optimizer's group lrs, kept by the step itself, follow HF's from the start."""
    transformers = pytest.importorskip("transformers")
    expected, _, _ = hf_lrs(transformers, name, warmup, kwargs, TOTAL)
    _, torch_opt, sched = hf_lrs(transformers, name, warmup, kwargs, 0)
    opt = fusedlr.from_torch(torch_opt, sched)
    for k in range(TOTAL):
        assert [float(g["lr"]) for g in opt.param_groups] == pytest.approx(expected[k], rel=REL, abs=ABS), k
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.ones_like(p)
        opt.step()


def test_hf_names_that_cannot_be_expressed_raise():
    with pytest.raises(ValueError, match="unknown scheduler name"):
        S.from_hf("greedy_plus", 4, 44)
    with pytest.raises(ValueError, match="base_lr"):
        S.from_hf("polynomial", 4, 44, lr_end=1e-7)
    with pytest.raises(ValueError, match="min_lr"):
        S.from_hf("cosine_with_min_lr", 4, 44)
    with pytest.raises(ValueError, match="unsupported"):
        S.from_hf("linear", 4, 44, power=2.0)
    with pytest.raises(ValueError, match="num_decay_steps"):
        S.from_hf("warmup_stable_decay", 4, 44)
    with pytest.raises(ValueError, match="warmup_type"):
        S.from_hf("warmup_stable_decay", 4, 44, num_decay_steps=9, warmup_type="exp")


# ---------------------------------------------------------------------------------------------
# timm


def timm_cases():
    rng = random.Random(5)
    cases = []
    for kind in ("CosineLRScheduler", "TanhLRScheduler", "PolyLRScheduler"):
        for mul in (1.0, 1.5, 2.0):
            for prefix in (False, True):
                args = {"t_initial": rng.choice([7, 10, 13]), "lr_min": rng.choice([0.0, 1e-5]),
                        "cycle_mul": mul, "cycle_decay": rng.choice([1.0, 0.5, 0.8]),
                        "cycle_limit": rng.choice([1, 3, 4]), "warmup_t": rng.choice([0, 3, 5]),
                        "warmup_lr_init": rng.choice([0.0, 1e-4]), "warmup_prefix": prefix}
                if kind != "TanhLRScheduler":
                    args["k_decay"] = rng.choice([1.0, 0.7, 1.3])
                if kind == "PolyLRScheduler":
                    args["power"] = rng.choice([0.5, 2.0])
                if kind == "TanhLRScheduler":
                    args.update(lb=rng.choice([-7.0, -5.0]), ub=rng.choice([3.0, 4.0]))
                cases.append((kind, args))
    return cases


@pytest.mark.parametrize("kind,args", timm_cases(), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("per_epoch", [False, True])
def test_timm_schedulers_exact(kind, args, per_epoch):
    """timm's scheduler stepped as timm's train loop steps it (step_update after every update, or
    step(epoch) after every epoch), on layer-decay groups with lr_scale; the fusedlr optimizer with
    from_timm's schedule gives every group the same lr at every step."""
    timm_scheduler = pytest.importorskip("timm.scheduler")
    updates_per_epoch = 3
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(3)]
    groups = [{"params": [p], "lr_scale": scale} for p, scale in zip(params, (0.25, 0.5, 1.0))]
    torch_opt = torch.optim.SGD(groups, lr=0.1)
    sched = getattr(timm_scheduler, kind)(torch_opt, t_in_epochs=per_epoch, **args)
    schedule = S.from_timm(sched, updates_per_epoch=updates_per_epoch if per_epoch else None)
    opt = fusedlr.SGD([{"params": [p], "lr_scale": g["lr_scale"]} for p, g in zip(params, groups)], lr=0.1,
                      schedule=schedule)
    steps = 60 * (updates_per_epoch if per_epoch else 1)
    for k in range(steps):
        want = [g["lr"] for g in torch_opt.param_groups]
        assert [float(g["lr"]) for g in opt.param_groups] == pytest.approx(want, rel=REL, abs=ABS), k
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        if per_epoch:
            if (k + 1) % updates_per_epoch == 0:
                sched.step((k + 1) // updates_per_epoch)
        else:
            sched.step_update(k + 1)


def test_from_timm_refuses_what_it_cannot_express():
    timm_scheduler = pytest.importorskip("timm.scheduler")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match="noise"):
        S.from_timm(timm_scheduler.CosineLRScheduler(opt, t_initial=10, noise_range_t=5, t_in_epochs=False))
    with pytest.raises(ValueError, match="updates_per_epoch"):
        S.from_timm(timm_scheduler.CosineLRScheduler(opt, t_initial=10))
    with pytest.raises(ValueError, match="StepLRScheduler"):
        S.from_timm(timm_scheduler.StepLRScheduler(opt, decay_t=3))


# ---------------------------------------------------------------------------------------------
# torchtitan: its formula, written out from its documentation (the package is not installed here)


def torchtitan_factor(step, warmup, stable, decay, decay_type, min_lr_factor):
    if step >= warmup + stable + decay:
        step = warmup + stable + decay
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if step < warmup + stable or decay == 0:
        return 1.0
    progress = ((step + 1) - (warmup + stable)) / (decay + 1)
    adjustment = {"linear": 1 - progress, "sqrt": 1 - math.sqrt(progress),
                  "cosine": 0.5 * (1.0 + math.cos(math.pi * progress))}[decay_type]
    return min_lr_factor + (1 - min_lr_factor) * adjustment


@pytest.mark.parametrize("decay_type", ["linear", "sqrt", "cosine"])
@pytest.mark.parametrize("warmup,training,decay_ratio,min_lr_factor",
                         [(10, 100, None, 0.0), (5, 80, 0.3, 0.1), (0, 50, 0.5, 0.2), (7, 60, 1 - 7 / 60, 0.0)])
def test_torchtitan_schedule(decay_type, warmup, training, decay_ratio, min_lr_factor):
    schedule = S.from_torchtitan(warmup, training, decay_ratio=decay_ratio, decay_type=decay_type,
                                 min_lr_factor=min_lr_factor)
    decay = training - warmup if decay_ratio is None else round(training * decay_ratio)
    stable = training - warmup - decay
    want = [2e-3 * torchtitan_factor(t, warmup, stable, decay, decay_type, min_lr_factor) for t in range(training + 5)]
    got = schedule.values(range(training + 5), base_lr=2e-3)[0].tolist()
    assert got == pytest.approx(want, rel=REL, abs=ABS)


# ---------------------------------------------------------------------------------------------
# The nodes themselves


def test_warmup_prefix_both_ways_and_absolute_start():
    inner = S.CosineAnnealingLR(T_max=20)
    shifted = S.Warmup(inner, 4, start_lr=0.01)
    unshifted = S.Warmup(inner, 4, start_lr=0.01, prefix=False)
    for t in range(4):
        assert shifted(t, 1.0) == pytest.approx(0.01 + t * (1.0 - 0.01) / 4, rel=1e-15)
        assert unshifted(t, 1.0) == shifted(t, 1.0)
    for t in range(4, 30):
        assert shifted(t, 1.0) == inner(t - 4, 1.0)
        assert unshifted(t, 1.0) == inner(t, 1.0)


def test_nested_warmups_and_round_trips():
    schedule = S.Warmup(S.SequentialLR([S.Decay(10, "cosine", min_factor=0.1),
                                        S.Warmup(S.Cycles(5, cycle_limit=2, lr_min=1e-4), 3, shape="cosine")],
                                       milestones=[10]), 5, start_factor=0.1, steps_per_epoch=2)
    assert S.from_spec(schedule.spec()) == schedule
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = fusedlr.AdamW(params, lr=1e-3, schedule=schedule)
    for _ in range(7):
        params[0].grad = torch.ones(3)
        opt.step()
    state = opt.state_dict()
    again = fusedlr.AdamW([torch.nn.Parameter(params[0].detach().clone())], lr=1e-3)
    again.load_state_dict(state)
    assert again.param_groups[0]["schedule"] == schedule
    assert float(again.param_groups[0]["lr"]) == float(opt.param_groups[0]["lr"]) == schedule(7, 1e-3)


@pytest.mark.parametrize("build,argument", [
    (lambda: S.Warmup(S.ConstantLR(), 0), "warmup_steps"),
    (lambda: S.Warmup(S.ConstantLR(), 4, start_factor=1.5), "start_factor"),
    (lambda: S.Warmup(S.ConstantLR(), 4, start_factor=0.1, start_lr=0.1), "start_lr"),
    (lambda: S.Warmup(S.ConstantLR(), 4, shape="exp"), "shape"),
    (lambda: S.Warmup(S.ConstantLR(), 4, offset=2), "passes its end"),
    (lambda: S.Warmup(S.ReduceLROnPlateau(), 4), "ReduceLROnPlateau"),
    (lambda: S.Warmup("cosine", 4), "schedule"),
    (lambda: S.Decay(0), "decay_steps"),
    (lambda: S.Decay(10, "cosine", min_factor=-0.1), "min_factor"),
    (lambda: S.Decay(10, "linear", power=2.0), "power"),
    (lambda: S.Decay(10, "polynomial", power=0.0), "power"),
    (lambda: S.Decay(10, "linear", after="continue"), "after"),
    (lambda: S.Decay(10, "inverse_sqrt"), "inverse_sqrt"),
    (lambda: S.Decay(10, offset=10), "offset"),
    (lambda: S.Cycles(0), "t_initial"),
    (lambda: S.Cycles(10, cycle_mul=0.5), "cycle_mul"),
    (lambda: S.Cycles(10, cycle_limit=0), "cycle_limit"),
    (lambda: S.Cycles(10, lb=-5.0), "lb"),
    (lambda: S.Cycles(10, shape="tanh", k_decay=2.0), "k_decay"),
    (lambda: S.Cycles(10, lr_min=math.nan), "lr_min"),
])
def test_invalid_node_arguments_raise_naming_them(build, argument):
    with pytest.raises(ValueError, match=argument):
        build()


def test_malformed_programs_of_the_new_kinds_raise_before_any_kernel():
    kinds = _C.schedule_kinds()
    plateau = _ops.initial_plateau_state(1, torch.device("cpu"))
    steps = torch.zeros(1, dtype=torch.int64)
    warmup = [1.0, float(kinds["Warmup"]["id"]), 1.0]
    bad_child = warmup + [99.0, 4, 0, 4, 0, 0, 0, 1, 0]
    with pytest.raises(RuntimeError, match="Warmup schedule program names a child outside"):
        _ops.evaluate_schedules(bad_child, [1.0], steps, plateau)
    zero_span = warmup + [12.0, 4, 0, 0, 0, 0, 0, 1, 0, 0.0, 1.0]
    with pytest.raises(RuntimeError, match=r"Warmup schedule program has arg 3 outside \[1, 2\^53\]"):
        _ops.evaluate_schedules(zero_span, [1.0], steps, plateau)
    short_decay = [1.0, float(kinds["Decay"]["id"]), 1.0, 10.0]
    with pytest.raises(RuntimeError, match="runs past the programs array"):
        _ops.evaluate_schedules(short_decay, [1.0], steps, plateau)
    with pytest.raises(RuntimeError, match="unknown node kind"):
        _ops.evaluate_schedules([1.0, float(len(kinds)), 1.0], [1.0], steps, plateau)


def test_the_kind_table_names_every_schedule_class():
    """Every schedule class encodes to a kind of the C++ table, with the arg count the table gives
    (the encoder checks it), and every kind of the table has its class."""
    kinds = _C.schedule_kinds()
    assert [kinds[n]["id"] for n in kinds] == list(range(len(kinds)))
    classes = {cls.__name__: cls for cls in S._BY_NAME.values()}
    assert set(kinds) == set(classes) | {"Constant"}
    examples = [S.ConstantLR(), S.LinearLR(), S.StepLR(3), S.MultiStepLR([2, 5]), S.ExponentialLR(0.9),
                S.ExponentialDecay(0.1), S.CosineAnnealingLR(10), S.CosineAnnealingWarmRestarts(5),
                S.PolynomialLR(), S.InverseSqrt(4), S.WarmupStableDecay(2, 3, 4), S.OneCycleLR(0.1, total_steps=20),
                S.CyclicLR(0.01, 0.1), S.ReduceLROnPlateau(), S.GreedyLR(), S.SequentialLR([S.ConstantLR()], []),
                S.Warmup(S.ConstantLR(), 3), S.Decay(5), S.Cycles(5), S.Product([S.ConstantLR()])]
    assert {type(e).__name__ for e in examples} == set(classes)
    for e in examples:
        program = S.compile_programs([e])
        assert program[1] == kinds[type(e).__name__]["id"]


def test_product_is_the_product_of_the_factors():
    parts = [S.ConstantLR(factor=0.5, total_iters=7), S.ExponentialLR(gamma=0.97), S.StepLR(4, 0.8, steps_per_epoch=2),
             S.Warmup(S.Decay(30, "cosine"), 5)]
    product = S.Product(parts)
    for t in range(60):
        want = 3e-3 * math.prod(p(t, 1.0) for p in parts)
        assert product(t, 3e-3) == pytest.approx(want, rel=REL)
    assert S.from_spec(product.spec()) == product
    for bad in (S.OneCycleLR(0.1, total_steps=10), S.CosineAnnealingLR(10, eta_min=1e-4), S.Product([S.ConstantLR()]),
                S.ReduceLROnPlateau(), S.Warmup(S.ConstantLR(), 3, start_lr=1e-3)):
        with pytest.raises(ValueError, match="does not scale with the base lr"):
            S.Product([S.ConstantLR(), bad])
    with pytest.raises(ValueError, match="Product"):
        S.Warmup(product, 4, target="schedule")
