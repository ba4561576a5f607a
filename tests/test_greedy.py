"""GreedyLR (HF transformers' get_scheduler("greedy")) on the device, against HF's own GreedyLR.

The reference is HF's scheduler stepping a torch SGD; fusedlr's state lives in the optimizer and
is fed by ``opt.observe(metric)``. Both compute each lr in float64 with the same operations in the
same order (old / factor, old * factor, the window's running sum), so the lrs are compared
exactly, observation by observation; each case also checks that the events it is about happened
(increases, reductions, resets), so that a trace with nothing in it cannot pass.
"""

import dataclasses
import io
import math
import random

import pytest
import torch

import fusedlr
from fusedlr import schedules as S

transformers = pytest.importorskip("transformers")
HFGreedyLR = transformers.optimization.GreedyLR

BASE_LRS = (0.1, 0.02, 0.5)


def metrics(n, seed, spread=1.0):
    """A loss-like sequence: stretches of improvement, plateaus and noise, some values repeated."""
    rng = random.Random(seed)
    value, out = 5.0, []
    while len(out) < n:
        kind, length = rng.choice(("down", "flat", "noise", "up")), rng.randint(2, 12)
        for _ in range(length):
            if kind == "down":
                value -= rng.uniform(0.01, 0.2) * spread
            elif kind == "up":
                value += rng.uniform(0.0, 0.1) * spread
            elif kind == "noise":
                value += rng.gauss(0.0, 0.05) * spread
            out.append(value if rng.random() > 0.1 or not out else out[-1])
    return out[:n]


def make_pair(kwargs, groups=1, per_group=None):
    """An HF GreedyLR over a torch SGD and the fusedlr SGD scheduled alike; per_group[g] overrides
    kwargs for group g (HF takes min_lr and max_lr as lists)."""
    per_group = per_group or [{} for _ in range(groups)]
    ref_params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(groups)]
    ref_opt = torch.optim.SGD([{"params": [p], "lr": BASE_LRS[g]} for g, p in enumerate(ref_params)])
    hf_kwargs = dict(kwargs)
    for key in ("min_lr", "max_lr"):
        if any(key in o for o in per_group):
            hf_kwargs[key] = [o.get(key, kwargs.get(key, S.GreedyLR.__dataclass_fields__[key].default))
                              for o in per_group]
    ref = HFGreedyLR(ref_opt, **hf_kwargs)
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(groups)]
    opt = fusedlr.SGD([{"params": [p], "lr": BASE_LRS[g], "schedule": S.GreedyLR(**{**kwargs, **per_group[g]})}
                       for g, p in enumerate(params)])
    return ref, ref_opt, opt


def lrs(opt):
    return [float(g["lr"]) for g in opt.param_groups]


def events(trace):
    """How often one group's lr rose and fell between observations."""
    ups = sum(b > a for a, b in zip(trace, trace[1:]))
    downs = sum(b < a for a, b in zip(trace, trace[1:]))
    return ups, downs


def count_resets(ref):
    """Counts the HF scheduler's resets (its _reset calls)."""
    calls = []
    reset = ref._reset
    ref._reset = lambda: (calls.append(1), reset())
    return calls


CASES = {
    "defaults": dict(factor=0.8, patience=2, min_lr=1e-3),
    "max-rel-cooldown-warmup": dict(mode="max", factor=0.7, patience=1, threshold=1e-3, threshold_mode="rel",
                                    cooldown=2, warmup=1, min_lr=1e-4, max_lr=0.3),
    "smooth": dict(factor=0.5, patience=1, smooth=True, window_size=5, min_lr=1e-4, max_lr=0.4),
    "patience-0-eps": dict(factor=0.9, patience=0, eps=1e-3, min_lr=0.05, max_lr=0.15),
    "reset": dict(factor=0.5, patience=0, min_lr=0.01, max_lr=0.2, reset_start=2, cooldown=1),
    "smooth-reset": dict(factor=0.5, patience=0, min_lr=0.01, smooth=True, window_size=3, reset_start=1),
    "uncapped": dict(factor=0.8, patience=1, min_lr=1e-3, max_lr=float("inf")),
    # as HF takes them: a max_lr below min_lr, a negative threshold
    "odd-bounds": dict(factor=0.7, patience=0, min_lr=0.05, max_lr=0.02, threshold=-0.02),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_lrs_equal_hf_observation_by_observation(case):
    kwargs = CASES[case]
    seq = metrics(300, seed=sum(map(ord, case)))
    if kwargs.get("mode") == "max":
        seq = [-v for v in seq]
    ref, ref_opt, opt = make_pair(kwargs)
    resets = count_resets(ref)
    ours_trace, ref_trace = [lrs(opt)[0]], [ref_opt.param_groups[0]["lr"]]
    for k, m in enumerate(seq):
        opt.observe(m if k % 2 else torch.tensor(m, dtype=torch.float64))
        ref.step(m)
        ours_trace.append(lrs(opt)[0])
        ref_trace.append(ref_opt.param_groups[0]["lr"])
        assert ours_trace[-1] == ref_trace[-1], (k, ours_trace[-5:], ref_trace[-5:])
    ups, downs = events(ref_trace)
    # with a max_lr below min_lr the lr falls to max_lr at the first improvement and stays there
    assert downs > 0 and (ups > 0 or case == "odd-bounds"), (ups, downs)
    assert bool(resets) == ("reset" in case), len(resets)


def test_greedy_groups_reset_together_when_all_are_at_their_min():
    """One HF GreedyLR drives every group: it resets only once every group sits at its own min_lr."""
    kwargs = dict(factor=0.5, patience=0, reset_start=2)
    per_group = [dict(min_lr=0.01), dict(min_lr=0.015), dict(min_lr=0.001, max_lr=0.6)]
    ref, ref_opt, opt = make_pair(kwargs, groups=3, per_group=per_group)
    resets = count_resets(ref)
    at_min_apart = 0  # observations with some groups at their min_lr and others not
    for k, m in enumerate(metrics(250, seed=7)):
        opt.observe(m)
        ref.step(m)
        expected = [g["lr"] for g in ref_opt.param_groups]
        assert lrs(opt) == expected, k
        at_min = [lr <= o["min_lr"] for lr, o in zip(expected, per_group)]
        at_min_apart += any(at_min) and not all(at_min)
    assert resets and at_min_apart, (len(resets), at_min_apart)


def test_greedy_state_round_trips_checkpoints_mid_run():
    kwargs = CASES["smooth-reset"]
    seq = metrics(120, seed=3)
    _, _, straight = make_pair(kwargs, groups=2)
    _, _, first = make_pair(kwargs, groups=2)
    for m in seq[:57]:
        straight.observe(m)
        first.observe(m)
    saved = first.state_dict()
    assert len(saved["param_groups"][0]["plateau_state"]) == 10 + kwargs["window_size"]
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    _, _, resumed = make_pair(kwargs, groups=2)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for m in seq[57:]:
        straight.observe(m)
        resumed.observe(m)
        assert lrs(resumed) == lrs(straight)
    assert torch.equal(resumed._plateau_state, straight._plateau_state)


def test_greedy_steps_use_the_observed_lr():
    """The step reads the greedy lr from the device state: parameters move by it."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(50, dtype=torch.float64))
    q = torch.nn.Parameter(p.detach().clone())
    opt = fusedlr.SGD([p], lr=0.1, schedule=S.GreedyLR(factor=0.5, patience=0, min_lr=1e-3))
    ref_opt = torch.optim.SGD([q], lr=0.1)
    ref = HFGreedyLR(ref_opt, factor=0.5, patience=0, min_lr=1e-3)
    seq, used = metrics(60, seed=11), set()
    for m in seq:
        g = torch.randn(50, dtype=torch.float64)
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
        opt.observe(m)
        ref.step(m)
        torch.testing.assert_close(p, q, rtol=1e-14, atol=1e-15)
        used.add(ref_opt.param_groups[0]["lr"])
    assert len(used) > 3, used


def stepped_sgd(groups):
    """A torch SGD with momentum that has taken a step (so from_torch loads its state too)."""
    params = [torch.nn.Parameter(torch.ones(3)) for _ in range(groups)]
    opt = torch.optim.SGD([{"params": [p], "lr": BASE_LRS[g]} for g, p in enumerate(params)], momentum=0.9)
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    opt.step()
    return opt


def test_from_torch_carries_a_greedy_scheduler_on_mid_run():
    """Converted in the middle of a cooldown, with a full smoothing window and reductions at the
    minimum counted: the state carried over decides what follows, a reset included."""
    kwargs = dict(factor=0.5, patience=0, smooth=True, window_size=8, cooldown=1, warmup=1, reset_start=3)
    ref_opt = stepped_sgd(2)
    ref = HFGreedyLR(ref_opt, **kwargs, min_lr=[0.02, 0.004])
    seq = metrics(400, seed=5)
    for k, m in enumerate(seq):
        ref.step(m)
        if (ref.cooldown_counter > 0 and len(ref._streaming_avg.values) == 8
                and 0 < ref.reset_start < ref.reset_start_original):
            break
    else:
        pytest.fail("no observation mid-cooldown with reductions at the minimum counted")
    opt = fusedlr.from_torch(ref_opt, ref)
    assert [float(g["initial_lr"]) for g in opt.param_groups] == list(BASE_LRS[:2])
    names = fusedlr._C.schedule_state_slots()["GreedyLR"]
    for g in range(2):  # the row holds HF's state, slot by slot
        row = dict(zip(names, opt._plateau_state[g].tolist()))
        assert (row["best"], row["num_bad"], row["num_good"]) == (ref.best, ref.num_bad_epochs, ref.num_good_epochs)
        assert (row["cooldown_counter"], row["warmup_counter"]) == (ref.cooldown_counter, ref.warmup_counter)
        assert row["at_min_reductions"] == ref.reset_start_original - ref.reset_start
        assert (row["window_count"], row["window_sum"], row["window_head"]) == (8, ref._streaming_avg.sum, 0)
        assert opt._plateau_state[g, names.index("window_values"):].tolist() == ref._streaming_avg.values
    assert lrs(opt) == [g["lr"] for g in ref_opt.param_groups]
    resets = count_resets(ref)
    for n, m in enumerate(seq[k + 1:]):
        opt.observe(m)
        ref.step(m)
        assert lrs(opt) == [g["lr"] for g in ref_opt.param_groups], n
    assert resets


def test_from_torch_carries_a_plateau_scheduler_on_mid_run():
    ref_opt = stepped_sgd(1)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(ref_opt, patience=3, factor=0.5, cooldown=2)
    seq = metrics(150, seed=9)
    for k, m in enumerate(seq):
        ref.step(m)
        if k > 20 and ref.num_bad_epochs >= 2:
            break
    else:
        pytest.fail("no observation with bad epochs counted")
    opt = fusedlr.from_torch(ref_opt, ref)
    changes = 0
    for n, m in enumerate(seq[k + 1:]):
        before = ref_opt.param_groups[0]["lr"]
        opt.observe(m)
        ref.step(m)
        assert lrs(opt)[0] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-15), n
        changes += ref_opt.param_groups[0]["lr"] != before
    assert changes


def test_from_hf_greedy_equals_get_scheduler():
    kwargs = dict(factor=0.6, patience=1, smooth=True, window_size=4, min_lr=1e-4)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    ref = transformers.get_scheduler("greedy", ref_opt, scheduler_specific_kwargs=kwargs)
    opt = fusedlr.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, schedule=S.from_hf("greedy", **kwargs))
    for m in metrics(100, seed=2):
        opt.observe(m)
        ref.step(m)
        assert lrs(opt)[0] == ref_opt.param_groups[0]["lr"]
    assert S.torch_scheduler(S.from_hf("greedy", **kwargs), ref_opt).__class__ is HFGreedyLR


@pytest.mark.parametrize("make, match", [
    (lambda: S.GreedyLR(factor=1.0), "factor"),
    (lambda: S.GreedyLR(factor=0.0), "factor"),
    (lambda: S.GreedyLR(mode="median"), "mode"),
    (lambda: S.GreedyLR(patience=-1), "patience"),
    (lambda: S.GreedyLR(window_size=0), "window_size"),
    (lambda: S.GreedyLR(window_size=1 << 30), "window_size"),
    (lambda: S.GreedyLR(smooth=1), "smooth"),
    (lambda: S.GreedyLR(max_lr=-0.1), "max_lr"),
    (lambda: S.GreedyLR(max_lr=float("nan")), "max_lr"),
    (lambda: S.GreedyLR(reset_start=-1), "reset_start"),
    (lambda: S.GreedyLR(threshold_mode="log"), "threshold_mode"),
    (lambda: S.Warmup(S.GreedyLR(), 3), "GreedyLR"),
    (lambda: S.SequentialLR([S.ConstantLR(), S.GreedyLR()], milestones=[4]), "GreedyLR"),
    (lambda: S.Product([S.GreedyLR()]), "GreedyLR"),
    (lambda: S.from_hf("greedy", verbose=True), "verbose"),
    (lambda: S.from_hf("greedy", min_lr=[1e-3, 1e-4]), "min_lr"),
    (lambda: S.from_hf("greedy", patience_steps=3), "unsupported"),
])
def test_bad_greedy_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_greedy_state_is_refused_and_changes_nothing():
    _, _, opt = make_pair(CASES["smooth"], groups=2)
    for m in metrics(30, seed=4):
        opt.observe(m)
    good = opt.state_dict()
    before = opt._plateau_state.clone()
    names = fusedlr._C.schedule_state_slots()["GreedyLR"]
    for slot, value, match in [("window_head", 5.0, "window_head"), ("window_count", 6.0, "window_count"),
                               ("num_bad", -1.0, "num_bad"), ("at_min_reductions", 0.5, "at_min_reductions"),
                               ("lr", -0.1, "lr")]:
        bad = opt.state_dict()
        bad["param_groups"][1]["plateau_state"][names.index(slot)] = value
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(bad)
        assert torch.equal(opt._plateau_state, before)
    short = opt.state_dict()
    short["param_groups"][0]["plateau_state"] = short["param_groups"][0]["plateau_state"][:4]
    with pytest.raises(ValueError, match="keeps 15"):
        opt.load_state_dict(short)
    opt.load_state_dict(good)
    assert torch.equal(opt._plateau_state, before)


def test_a_group_that_gains_a_greedy_schedule_gets_its_window():
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(2)]
    opt = fusedlr.SGD([{"params": [params[0]], "schedule": S.ReduceLROnPlateau(patience=0)},
                       {"params": [params[1]]}], lr=0.1)
    assert opt._plateau_state.shape == (2, 4)
    opt.param_groups[1]["schedule"] = S.GreedyLR(smooth=True, window_size=7, patience=0, factor=0.5)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    ref = HFGreedyLR(ref_opt, smooth=True, window_size=7, patience=0, factor=0.5)
    for m in metrics(40, seed=8):
        opt.observe(m)
        ref.step(m)
        assert float(opt.last_lr()[1]) == ref_opt.param_groups[0]["lr"]
    assert opt._plateau_state.shape == (2, 17)


def test_as_lr_scheduler_is_a_plateau_scheduler_for_the_frameworks():
    opt = fusedlr.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, schedule=S.GreedyLR(patience=0, factor=0.5))
    sched = opt.as_lr_scheduler()
    assert isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    ref = HFGreedyLR(ref_opt, patience=0, factor=0.5)
    for m in metrics(30, seed=1):
        sched.step(m)
        ref.step(m)
        assert [float(v) for v in sched.get_last_lr()] == [ref_opt.param_groups[0]["lr"]]
    plain = fusedlr.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, schedule=S.CosineAnnealingLR(T_max=5))
    assert not isinstance(plain.as_lr_scheduler(), torch.optim.lr_scheduler.ReduceLROnPlateau)


def test_a_metric_schedule_of_another_layout_starts_a_fresh_row():
    """A group whose ReduceLROnPlateau becomes a GreedyLR starts the GreedyLR afresh, as a new HF
    scheduler would; a GreedyLR replaced by one of the same layout (another patience) carries on."""
    p = torch.nn.Parameter(torch.zeros(2))
    opt = fusedlr.SGD([p], lr=0.1, schedule=S.ReduceLROnPlateau(patience=0, factor=0.5, cooldown=3))
    seq = metrics(120, seed=6)
    for m in seq[:12]:
        opt.observe(m)
    assert float(opt.last_lr()[0]) < 0.1
    opt.param_groups[0]["schedule"] = S.GreedyLR(patience=3, factor=0.5, smooth=True, window_size=3)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    ref = HFGreedyLR(ref_opt, patience=3, factor=0.5, smooth=True, window_size=3)
    trace = []
    for m in seq[12:60]:
        opt.observe(m)
        ref.step(m)
        trace.append(ref_opt.param_groups[0]["lr"])
        assert float(opt.last_lr()[0]) == trace[-1]
    opt.param_groups[0]["schedule"] = S.GreedyLR(patience=1, factor=0.5, smooth=True, window_size=3)
    ref.patience = 1
    for m in seq[60:]:
        opt.observe(m)
        ref.step(m)
        trace.append(ref_opt.param_groups[0]["lr"])
        assert float(opt.last_lr()[0]) == trace[-1]
    assert all(events(part) != (0, 0) for part in (trace[:48], trace[48:])), events(trace)


def test_a_hand_built_program_with_an_unbounded_window_is_refused():
    programs = S.compile_programs([S.GreedyLR(smooth=True, window_size=3)])
    window_arg = int(programs[0]) + 2 + [f.name for f in dataclasses.fields(S.GreedyLR)].index("window_size")
    state = fusedlr._ops.initial_plateau_state(1, torch.device("cpu"), 13)
    for bad in (math.inf, 2.0 ** 40):
        programs[window_arg] = bad
        with pytest.raises(RuntimeError, match="window|2\\^53"):
            torch.ops.fusedlr.plateau_observe_(torch.tensor(1.0, dtype=torch.float64), [0.1], programs, state)
    fresh = fusedlr._ops.initial_plateau_state(1, torch.device("cpu"), 13)
    assert torch.equal(state.nan_to_num(7.0), fresh.nan_to_num(7.0))  # untouched (NaN: unset)
