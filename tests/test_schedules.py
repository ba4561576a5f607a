"""Schedule values on the host (the same C++ formula the kernels run) against torch's schedulers."""

import math
import warnings

import pytest
import torch
from torch.optim import lr_scheduler as L

import fusedlr
from fusedlr import schedules as S
from twins import SCHEDULES, time_unit, torch_values

# torch steps its recursive forms (lr *= ratio each step); ours is closed-form. Over a few hundred
# steps the recursion drifts by some 1e-13 relative; 1e-9 leaves room and still catches any real slip.
RTOL = 1e-9

warnings.filterwarnings("ignore", message=".*lr_scheduler.step\\(\\)")


def fused_values(s, n, base_lr):
    lr, momentum = s.values(range(n), base_lr=base_lr)
    return lr.tolist(), (momentum.tolist() if s.cycles_momentum else None)


@pytest.mark.parametrize("name", [k for k in SCHEDULES if SCHEDULES[k] is not None])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_values_match_torch(name, optimizer):
    s = SCHEDULES[name]
    unit = time_unit(s)
    n = 260 if not isinstance(s, S.OneCycleLR) else s.n_steps
    if isinstance(s, S.CosineAnnealingLR):
        n = s.T_max + 1  # past T_max torch's recursive form swings back up (README, Differences)
    expected_lr, expected_momentum = torch_values(s, (n - 1) // unit + 1, base_lr=0.05, optimizer=optimizer)
    lr, momentum = fused_values(s, n, base_lr=0.05)
    expected_lr = [expected_lr[t // unit] for t in range(n)]
    assert lr == pytest.approx(expected_lr, rel=RTOL, abs=1e-15)
    if s.cycles_momentum:
        expected_momentum = [expected_momentum[t // unit] for t in range(n)]
        assert momentum == pytest.approx(expected_momentum, rel=RTOL)
    else:
        assert all(math.isnan(m) for m in s.values(range(4))[1].tolist())


def test_boundaries_switch_at_t_equal_b():
    s = S.StepLR(step_size=10, gamma=0.5)
    assert s(9, 1.0) == 1.0 and s(10, 1.0) == 0.5 and s(19, 1.0) == 0.5 and s(20, 1.0) == 0.25
    m = S.MultiStepLR(milestones=[7, 3, 7], gamma=0.1)
    assert [m(t, 1.0) for t in (2, 3, 6, 7)] == pytest.approx([1.0, 0.1, 0.1, 0.001])
    seq = S.SequentialLR([S.ConstantLR(factor=0.5, total_iters=100), S.ExponentialLR(gamma=0.5)], milestones=[4])
    assert [seq(t, 1.0) for t in range(7)] == [0.5, 0.5, 0.5, 0.5, 1.0, 0.5, 0.25]


def test_one_cycle_peak_at_pct_start_times_n_minus_one():
    s = S.OneCycleLR(max_lr=1.0, total_steps=100, pct_start=0.3)
    lrs = s.values(range(100))[0]
    assert int(lrs.argmax()) == 29 and float(lrs[29]) == 1.0
    assert s.momentum(29) == pytest.approx(0.85)
    assert float(lrs[99]) == pytest.approx(1.0 / 25 / 1e4)


def test_one_cycle_holds_final_value_past_total_steps():
    s = S.OneCycleLR(max_lr=1.0, total_steps=50)
    assert s(49) == s(50) == s(10_000) == pytest.approx(1.0 / 25 / 1e4)


def test_cosine_holds_eta_min_past_t_max():
    s = S.CosineAnnealingLR(T_max=10, eta_min=0.01)
    assert s(10, 1.0) == pytest.approx(0.01) and s(11, 1.0) == pytest.approx(0.01) and s(25, 1.0) == 0.01


def test_warm_restarts_cycle_lengths():
    s = S.CosineAnnealingWarmRestarts(T_0=4, T_mult=3)
    restarts = [t for t in range(1, 200) if s(t, 1.0) == 1.0]
    assert restarts == [4, 16, 52, 160]


def test_aliases():
    assert S.StepDecay(step_size=5, decay_factor=0.3)(12, 2.0) == S.StepLR(step_size=5, gamma=0.3)(12, 2.0)
    assert S.CosineAnnealing is S.CosineAnnealingLR
    assert S.ExponentialDecay(decay_rate=0.1)(7, 2.0) == pytest.approx(2.0 * math.exp(-0.7), rel=1e-15)


def test_step_and_lr_exact_near_2_pow_40():
    """The schedule sees the exact int64 step count at 2**40 (a float32 counter is off by thousands)."""
    big = 2 ** 40
    for t in (big - 1, big, big + 1, big + 12345):
        assert S.StepLR(step_size=2 ** 38, gamma=0.5)(t, 1.0) == 0.5 ** (t // 2 ** 38)  # switches at 2**40
        assert S.MultiStepLR(milestones=[big], gamma=0.5)(t, 1.0) == (0.5 if t >= big else 1.0)
        period, start = 3, 0
        while start + period <= t:
            start, period = start + period, period * 2
        expected = (1 + math.cos(math.pi * (t - start) / period)) / 2
        assert S.CosineAnnealingWarmRestarts(T_0=3, T_mult=2)(t, 1.0) == pytest.approx(expected, abs=1e-12)
        assert S.StepLR(step_size=1, gamma=0.5, steps_per_epoch=big)(t, 1.0) == 0.5 ** (t // big)


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("threshold_mode", ["rel", "abs"])
@pytest.mark.parametrize("cooldown", [0, 2])
def test_plateau_matches_torch(mode, threshold_mode, cooldown):
    gen = torch.Generator().manual_seed(hash((mode, threshold_mode, cooldown)) % 2 ** 31)
    # A metric that improves, stalls, improves by less than the threshold, then worsens.
    sign = 1.0 if mode == "min" else -1.0
    metrics = [sign * v for v in [10, 9, 8, 8, 8, 8, 7.9995, 8, 8, 8, 8, 8, 7, 7, 7, 7, 7, 7, 7, 7, 7, 9, 9, 9]]
    metrics += (torch.rand(60, generator=gen) * 10).tolist()
    kwargs = dict(mode=mode, factor=0.5, patience=2, threshold=1e-3 if threshold_mode == "rel" else 0.05,
                  threshold_mode=threshold_mode, cooldown=cooldown, min_lr=0.004, eps=1e-8)
    p = torch.nn.Parameter(torch.zeros(3))
    ref_opt = torch.optim.SGD([p], lr=0.1)
    ref = L.ReduceLROnPlateau(ref_opt, **kwargs)
    q = torch.nn.Parameter(torch.zeros(3))
    opt = fusedlr.SGD([q], lr=0.1, schedule=S.ReduceLROnPlateau(**kwargs))
    fired = []
    for i, metric in enumerate(metrics):
        before = ref_opt.param_groups[0]["lr"]
        ref.step(metric)
        opt.observe(torch.tensor(metric))
        assert float(opt.last_lr()[0]) == ref_opt.param_groups[0]["lr"], f"metric {i}"
        if ref_opt.param_groups[0]["lr"] != before:
            fired.append(i)
    assert fired, "the scripted metrics must make the plateau fire"
    assert ref_opt.param_groups[0]["lr"] == pytest.approx(0.004) or len(fired) >= 2


def test_plateau_fires_when_bad_exceeds_patience():
    opt = fusedlr.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0,
                      schedule=S.ReduceLROnPlateau(patience=3, factor=0.5))
    lrs = []
    for metric in [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]:
        opt.observe(metric)
        lrs.append(float(opt.last_lr()[0]))
    # bad epochs 1, 2, 3 are within patience; the 4th (> patience) reduces.
    assert lrs == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5]


BAD_SCHEDULES = [
    (lambda: S.StepLR(step_size=0), "step_size"),
    (lambda: S.StepLR(step_size=-3), "step_size"),
    (lambda: S.StepLR(step_size=2.5), "step_size"),
    (lambda: S.StepLR(step_size=3, steps_per_epoch=0), "steps_per_epoch"),
    (lambda: S.ExponentialLR(gamma=-0.5), "gamma"),
    (lambda: S.ExponentialLR(gamma=float("nan")), "gamma"),
    (lambda: S.ConstantLR(factor=1.5), "factor"),
    (lambda: S.LinearLR(start_factor=-0.1), "start_factor"),
    (lambda: S.LinearLR(total_iters=0), "total_iters"),
    (lambda: S.MultiStepLR(milestones=[3, -1]), "milestones"),
    (lambda: S.CosineAnnealingLR(T_max=0), "T_max"),
    (lambda: S.CosineAnnealingWarmRestarts(T_0=0), "T_0"),
    (lambda: S.CosineAnnealingWarmRestarts(T_0=5, T_mult=0), "T_mult"),
    (lambda: S.PolynomialLR(total_iters=0), "total_iters"),
    (lambda: S.InverseSqrt(warmup_steps=0), "warmup_steps"),
    (lambda: S.WarmupStableDecay(10, 10, 0), "decay_steps"),
    (lambda: S.WarmupStableDecay(10, 10, 10, decay="exp"), "decay"),
    (lambda: S.OneCycleLR(max_lr=0.1), "total_steps"),
    (lambda: S.OneCycleLR(max_lr=0.1, total_steps=0), "total_steps"),
    (lambda: S.OneCycleLR(max_lr=0.1, total_steps=100, pct_start=1.5), "pct_start"),
    (lambda: S.OneCycleLR(max_lr=0.1, total_steps=100, anneal_strategy="exp"), "anneal_strategy"),
    (lambda: S.OneCycleLR(max_lr=0.1, total_steps=3, pct_start=0.1), "pct_start"),
    (lambda: S.CyclicLR(base_lr=0.1, max_lr=1.0, mode="sine"), "mode"),
    (lambda: S.CyclicLR(base_lr=0.1, max_lr=1.0, step_size_up=0), "step_size_up"),
    (lambda: S.CyclicLR(base_lr=0.1, max_lr=1.0, scale_fn=lambda x: 1.0), "scale_fn"),
    (lambda: S.CyclicLR(base_lr=0.1, max_lr=1.0, scale_mode="epoch"), "scale_mode"),
    (lambda: S.ReduceLROnPlateau(mode="median"), "mode"),
    (lambda: S.ReduceLROnPlateau(factor=1.0), "factor"),
    (lambda: S.ReduceLROnPlateau(threshold_mode="log"), "threshold_mode"),
    (lambda: S.ReduceLROnPlateau(patience=-1), "patience"),
    (lambda: S.SequentialLR([S.StepLR(step_size=3), S.StepLR(step_size=4)], milestones=[]), "milestones"),
    (lambda: S.SequentialLR([S.StepLR(step_size=3)] * 3, milestones=[20, 10]), "milestones"),
    (lambda: S.SequentialLR([S.StepLR(step_size=3)] * 2, milestones=[0]), "milestones"),
    (lambda: S.SequentialLR([S.StepLR(step_size=3), S.ReduceLROnPlateau()], milestones=[5]), "ReduceLROnPlateau"),
    (lambda: S.SequentialLR([S.StepLR(step_size=3), L.StepLR], milestones=[5]), "schedulers"),
]


@pytest.mark.parametrize("build,argument", BAD_SCHEDULES)
def test_invalid_arguments_raise_value_error_naming_them(build, argument):
    with pytest.raises(ValueError, match=argument):
        build()


def test_multistep_accepts_unsorted_milestones():
    assert S.MultiStepLR(milestones=[30, 10, 20], gamma=0.5)(25, 1.0) == 0.25


def test_schedules_are_immutable_and_round_trip_through_spec():
    for s in SCHEDULES.values():
        if s is None:
            continue
        with pytest.raises(Exception):
            s.gamma = 3.0
        again = S.from_spec(s.spec())
        assert again == s
        assert again.values(range(50), 0.1)[0].tolist() == s.values(range(50), 0.1)[0].tolist()
