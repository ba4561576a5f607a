"""The CUDA kernels, run on the CPU (tests/cuda_emulation.py), against fusedlr's CPU kernels, bitwise.

Both round every operation alike (no fused multiply-adds; one header of update and schedule math),
so a step of the emulated CUDA kernels must leave the same bits as the CPU op's, over random inputs:
tails, views misaligned by one element, several launches per step (more tensors than a table
holds, several dtypes), many groups, grids of 1 to 7 blocks, clipping, skipped steps, GradScaler
inputs and master weights. The one difference by design is the order in which the gradient norm
is summed: where a step clips, its gradients lie on a grid of multiples of 2^-6 small enough that
every sum of their squares is exact in any order, so the norm too must agree bitwise.
"""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

import cuda_emulation
import fusedlr  # noqa: F401  (the CPU ops)
from fusedlr import _ops
from fusedlr import schedules as S
from registry import OPS

emulated = cuda_emulation.load()
cpu = torch.ops.fusedlr

SCHEDULE_POOL = [
    None,
    S.OneCycleLR(max_lr=0.02, total_steps=60),
    S.CosineAnnealingWarmRestarts(T_0=5, T_mult=2, eta_min=1e-4),
    S.CyclicLR(base_lr=1e-3, max_lr=0.02, step_size_up=4, mode="exp_range", gamma=0.99),
    S.SequentialLR([S.LinearLR(start_factor=0.1, total_iters=6), S.StepLR(step_size=3, gamma=0.5)], milestones=[6]),
    S.ReduceLROnPlateau(patience=0, factor=0.5),
    S.GreedyLR(patience=0, factor=0.5, min_lr=0.02, smooth=True, window_size=2, reset_start=1, cooldown=1),
    S.Warmup(S.Cycles(t_initial=7, shape="tanh", cycle_mul=1.5, cycle_decay=0.8, cycle_limit=3), 4, start_lr=1e-3,
             prefix=False, target="schedule"),
    S.Warmup(S.Decay(20, "cosine_restarts", num_cycles=3, min_factor=0.1), 5, shape="1-sqrt", offset=1, span=6),
    S.SequentialLR([S.Decay(9, "inverse_sqrt", after="continue"), S.Cycles(5, shape="poly", k_decay=0.7)],
                   milestones=[12]),
    S.Product([S.ExponentialLR(gamma=0.97), S.Warmup(S.Decay(30, "polynomial", power=2.0, min_factor=0.1), 3)]),
]
SIZES = [0, 1, 3, 7, 17, 64, 255, 1000, 4097, 65536 + 3, 131073]
STATE_DTYPE = {torch.float64: torch.float64, torch.float32: torch.float32, torch.bfloat16: torch.float32,
               torch.float16: torch.float32}
BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
        torch.float16: torch.int16, torch.int64: torch.int64, torch.int16: torch.int16, torch.uint8: torch.uint8}


@dataclasses.dataclass
class Case:
    optimizer: str = "adam"
    dtypes: tuple = (torch.float32,)
    tensors: int = 6
    sizes: tuple = tuple(SIZES)
    groups: int = 2
    steps: int = 4
    misaligned: float = 0.5  # the share of tensors that are views one element off their storage's start
    shared_counters: bool = False  # tensors of different dtypes, so of different launches, share counters
    master_weights: bool = True
    clip: bool = False
    skip_nonfinite: bool = False
    grad_scale: torch.dtype | None = None  # GradScaler's inputs, in this dtype
    multiprocessors: int = 2
    seed: int = 0
    # storage (csrc/storage_math.h): bfloat16 state where the math is float32, the master weights of
    # bfloat16 parameters as int16 remainders, stochastic rounding in every group
    bfloat16_state: bool = False
    mx_state: bool = False  # 8-bit state ([note: 8-bit state]) where the math is float32
    remainders: bool = False
    stochastic: bool = False
    equal_steps: bool = False  # every tensor at one step count (a block then meets many with one group's scalars)


def placed(values: torch.Tensor, misaligned: bool) -> torch.Tensor:
    """values in a storage of their own, one element past its start when misaligned."""
    if not misaligned:
        return values.clone()
    storage = torch.zeros(values.numel() + 1, dtype=values.dtype)
    view = storage[1:].view(values.shape)
    view.copy_(values)
    return view


def gradient(rng: torch.Generator, numel: int, dtype: torch.dtype, on_grid: bool) -> torch.Tensor:
    if on_grid:  # multiples of 2^-6 up to 1: their squares and every sum of them are exact
        return (torch.randint(-64, 65, (numel,), generator=rng).double() / 64).to(dtype)
    return torch.randn(numel, generator=rng, dtype=torch.float64).to(dtype)


def group_settings(case: Case, r: random.Random):
    """Each group's schedule and hyperparameters, drawn by the registry (tests/registry.py), and
    whether the group needs the optimizer's optional state."""
    entry = OPS[case.optimizer]
    hyper, schedules, needs_optional = [], [], []
    for _ in range(case.groups):
        schedule = r.choice(SCHEDULE_POOL)
        schedules.append(schedule)
        values, needs = entry.random_hyper(r, schedule)
        if case.stochastic:
            values.update(stochastic_rounding=1.0, rounding_seed=float(r.randrange(2 ** 53)))
        hyper += entry.hyper(values)
        needs_optional.append(needs)
    return hyper, S.compile_programs(schedules), needs_optional


def build(case: Case):
    """The op's arguments; the same tensors every call with the same case (seeded)."""
    r = random.Random(case.seed)
    rng = torch.Generator().manual_seed(case.seed)
    hyper, programs, needs_optional = group_settings(case, r)
    tensors = []
    for i in range(case.tensors):
        dtype = case.dtypes[i % len(case.dtypes)]
        numel = r.choice(case.sizes)
        group = r.randrange(case.groups)
        misaligned = r.random() < case.misaligned
        low_precision = dtype in (torch.bfloat16, torch.float16)
        state_dtype = torch.bfloat16 if case.bfloat16_state and dtype != torch.float64 else STATE_DTYPE[dtype]
        param = placed(torch.randn(numel, generator=rng, dtype=torch.float64).to(dtype), misaligned)
        master = None
        if low_precision and case.master_weights and case.remainders and dtype == torch.bfloat16:
            master = placed(torch.randint(-2 ** 15, 2 ** 15, (numel,), generator=rng, dtype=torch.int16), misaligned)
        elif low_precision and case.master_weights:
            master = placed(param.to(torch.float32), misaligned)
            master.add_(torch.randn(numel, generator=rng, dtype=torch.float64).to(torch.float32) * 1e-3)
        states = []
        descriptor = _ops.OPTIMIZERS[case.optimizer]
        for kind in descriptor.states[:-1]:  # the master weight is apart
            if kind not in descriptor.required and not needs_optional[group]:
                states.append(torch.empty(0, dtype=state_dtype))
                continue
            values = torch.randn(numel, generator=rng, dtype=torch.float64)
            values = values.abs() if kind.endswith("_sq") else values  # second moments
            if case.mx_state and dtype != torch.float64:  # codes and scales, a byte off where misaligned
                states.append(placed(fusedlr._C.mx_encode(values.float()), misaligned))
                continue
            states.append(placed(values.to(state_dtype), misaligned))
        if master is None:
            master = torch.empty(0, dtype=torch.float32)
        tensors.append(dict(param=param, states=states, master=master, group=group, misaligned=misaligned,
                            step=torch.tensor(5 if case.equal_steps else r.randrange(0, 12), dtype=torch.int64)))
    if case.shared_counters:  # the j-th tensor of each dtype shares the counter of the j-th of the first
        by_dtype = {}
        for t in tensors:
            by_dtype.setdefault(t["param"].dtype, []).append(t)
        first, *others = by_dtype.values()
        for same_dtype in others:
            for t, owner in zip(same_dtype, first):
                t["step"] = owner["step"]
    group_steps = torch.tensor([r.randrange(0, 12) for _ in range(case.groups)], dtype=torch.int64)
    plateau = _ops.initial_plateau_state(case.groups, torch.device("cpu"), _ops.schedule_state_width(programs, case.groups))
    return dict(tensors=tensors, hyper=hyper, programs=programs, group_steps=group_steps, plateau=plateau,
                grad_norm=torch.zeros((), dtype=torch.float64))


def step_inputs(case: Case, k: int, tensors):
    """The gradients and options of step k, the same every call."""
    r = random.Random(case.seed * 1000 + k)
    rng = torch.Generator().manual_seed(case.seed * 1000 + k)
    grads = []
    on_grid = case.clip or case.skip_nonfinite  # the step computes the norm
    for t in tensors:
        param = t["param"]
        if r.random() < 0.15:
            grads.append(None)
            continue
        grads.append(placed(gradient(rng, param.numel(), param.dtype, on_grid), t["misaligned"]))
    options = {}
    if case.grad_scale is not None:
        # not a power of two (read in double, as on the CPU), but where the norm must be exact
        scale = r.choice([2.0 ** 10, 2.0 ** -3] if on_grid else [2.0 ** 10, 1000.3, 1 / 3])
        options["grad_scale"] = torch.tensor(scale, dtype=case.grad_scale)
        options["found_inf"] = torch.tensor(float(r.random() < 0.25), dtype=case.grad_scale)
        grads = [None if g is None else placed(g * scale, t["misaligned"]) for g, t in zip(grads, tensors)]
    if case.clip:
        options["max_grad_norm"] = r.choice([0.5, 30.0, math.inf])
    if case.skip_nonfinite:
        with_grads = [g for g in grads if g is not None and g.numel() > 0]
        if with_grads and r.random() < 0.3:
            g = r.choice(with_grads)
            g.view(-1)[r.randrange(g.numel())] = r.choice([math.inf, -math.inf, math.nan])
        options["skip_nonfinite"] = True
    return grads, options


def run_step(ops, case: Case, built, grads, options):
    tensors = built["tensors"]
    params = [t["param"] for t in tensors]
    states = list(zip(*[t["states"] for t in tensors]))
    masters = [t["master"] for t in tensors]
    steps = [t["step"] for t in tensors]
    groups = [t["group"] for t in tensors]
    if case.clip or case.skip_nonfinite:
        options = dict(options, grad_norm=built["grad_norm"])
    common = (steps, groups, built["hyper"], built["programs"], built["group_steps"], built["plateau"])
    op = getattr(ops, _ops.OPTIMIZERS[case.optimizer].op)
    op(params, grads, *[list(s) for s in states], masters, *common, **options)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(BITS[t.dtype]) if t.numel() else t


def assert_same_bits(emulated_run, cpu_run, where: str):
    for n, (a, b) in enumerate(zip(emulated_run["tensors"], cpu_run["tensors"])):
        for name, x, y in [("param", a["param"], b["param"]), ("master", a["master"], b["master"]),
                           ("step", a["step"], b["step"])] + [
                              (f"state {s}", x, y) for s, (x, y) in enumerate(zip(a["states"], b["states"]))]:
            assert torch.equal(bits(x), bits(y)), f"{where}: {name} of tensor {n} ({a['param'].dtype}, " \
                                                  f"{a['param'].numel()} elements) differs"
        assert a["param"]._version == b["param"]._version, f"{where}: version of tensor {n}"
    for key in ("group_steps", "plateau", "grad_norm"):
        assert torch.equal(bits(emulated_run[key]), bits(cpu_run[key])), f"{where}: {key} differs"


def run_case(case: Case):
    emulated.set_multiprocessors(case.multiprocessors)
    on_emulated, on_cpu = build(case), build(case)
    launched = 0  # by the steps
    for k in range(case.steps):
        emulated_grads, options = step_inputs(case, k, on_emulated["tensors"])
        cpu_grads, cpu_options = step_inputs(case, k, on_cpu["tensors"])
        before = emulated.kernels_launched()
        run_step(emulated, case, on_emulated, emulated_grads, options)
        launched += emulated.kernels_launched() - before
        run_step(cpu, case, on_cpu, cpu_grads, cpu_options)
        assert_same_bits(on_emulated, on_cpu, f"step {k}")
        if any(s is not None and s.observes_metric for s in SCHEDULE_POOL):
            metric = torch.tensor(1.0 / (k % 3 + 1) + 0.1 * (k % 7), dtype=torch.float64)
            base_lrs = on_cpu["hyper"][::len(on_cpu["hyper"]) // case.groups]
            emulated.plateau_observe_(metric, base_lrs, on_emulated["programs"], on_emulated["plateau"])
            cpu.plateau_observe_(metric, base_lrs, on_cpu["programs"], on_cpu["plateau"])
            assert torch.equal(bits(on_emulated["plateau"]), bits(on_cpu["plateau"]))
    return launched, on_cpu


DTYPE_SETS = {"f32": (torch.float32,), "f64": (torch.float64,), "bf16": (torch.bfloat16,), "fp16": (torch.float16,),
              "mixed": (torch.float32, torch.bfloat16, torch.float64, torch.float16)}


@pytest.mark.parametrize("dtypes", list(DTYPE_SETS))
@pytest.mark.parametrize("optimizer", list(OPS))
def test_random_steps_match_the_cpu(optimizer, dtypes):
    for seed in range(3):
        run_case(Case(optimizer=optimizer, dtypes=DTYPE_SETS[dtypes], seed=seed, groups=1 + seed * 2,
                      master_weights=seed != 1, multiprocessors=[1, 3, 7][seed]))


@pytest.mark.parametrize("optimizer", list(OPS))
@pytest.mark.parametrize("options", ["clip", "clip+amp32", "clip+amp64", "skip_nonfinite", "amp64"])
def test_gradient_options_match_the_cpu(optimizer, options):
    for seed in range(2):
        run_case(Case(optimizer=optimizer, dtypes=DTYPE_SETS["mixed"], seed=10 + seed, groups=3,
                      clip="clip" in options, skip_nonfinite=options == "skip_nonfinite",
                      grad_scale={"amp32": torch.float32, "amp64": torch.float64}.get(options.split("+")[-1])))


@pytest.mark.parametrize("optimizer", list(OPS))
def test_more_tensors_than_one_launch_holds(optimizer):
    """Many small tensors in every dtype: several tables per dtype, 32 groups, one counter shared
    across the launches of two dtypes (each count is read before any advances, as on the CPU)."""
    capacity = emulated.launch_capacity(optimizer)
    case = Case(optimizer=optimizer, dtypes=(torch.float32, torch.float64), tensors=3 * capacity,
                sizes=(0, 1, 5, 33, 300), groups=32, steps=3, shared_counters=True, clip=True, seed=20)
    launched, _ = run_case(case)
    main, sums, norm, counters = 4, 4, 1, 4  # per step: two tables of each dtype
    assert launched == case.steps * (main + sums + norm + counters)


@pytest.mark.parametrize("optimizer", list(OPS))
@pytest.mark.parametrize("storage", ["bf16-state", "remainders", "stochastic", "bf16-state+stochastic+remainders",
                                     "mx-state", "mx-state+stochastic+remainders"])
def test_storage_matches_the_cpu(optimizer, storage):
    """bfloat16 or 8-bit state, int16 remainders and stochastic rounding (csrc/storage_math.h): the
    same bits as on the CPU, the random bits of every element included, over every dtype and grid."""
    for seed in range(3):
        run_case(Case(optimizer=optimizer, dtypes=DTYPE_SETS["mixed"], seed=40 + seed, groups=1 + seed,
                      multiprocessors=[1, 3, 7][seed], bfloat16_state="bf16-state" in storage,
                      mx_state="mx-state" in storage,
                      remainders="remainders" in storage, stochastic="stochastic" in storage,
                      clip=seed == 2))


@pytest.mark.parametrize("optimizer", list(OPS))
def test_each_tensor_rounds_with_its_own_keys(optimizer):
    """Many tensors of one group and step count in one launch of few blocks: each block meets
    several tensors with the same scalars, and each must still round with its own random bits."""
    run_case(Case(optimizer=optimizer, dtypes=(torch.bfloat16,), tensors=24, sizes=(1, 7, 300, 70000), groups=1,
                  multiprocessors=1, stochastic=True, bfloat16_state=True, master_weights=False, equal_steps=True,
                  seed=50))


def test_a_skipped_step_changes_nothing_but_versions():
    case = Case(optimizer="adam", dtypes=DTYPE_SETS["mixed"], grad_scale=torch.float32, steps=1, seed=30)
    built = build(case)
    grads, options = step_inputs(case, 0, built["tensors"])
    options["found_inf"] = torch.tensor(1.0)
    before = {n: (t["param"].clone(), [s.clone() for s in t["states"]], t["step"].clone(), t["param"]._version)
              for n, t in enumerate(built["tensors"])}
    run_step(emulated, case, built, grads, options)
    for n, t in enumerate(built["tensors"]):
        param, states, step, version = before[n]
        assert torch.equal(bits(t["param"]), bits(param)) and torch.equal(t["step"], step)
        assert all(torch.equal(bits(a), bits(b)) for a, b in zip(t["states"], states))
        assert t["param"]._version == version + (grads[n] is not None)


def test_schedules_evaluate_as_on_the_cpu():
    programs = S.compile_programs(SCHEDULE_POOL)
    base_lrs = [0.1 * (g + 1) for g in range(len(SCHEDULE_POOL))]
    plateau = _ops.initial_plateau_state(len(SCHEDULE_POOL), torch.device("cpu"),
                                         _ops.schedule_state_width(programs, len(SCHEDULE_POOL)))
    for t in [0, 1, 5, 17, 59, 60, 1000, 2 ** 40]:
        steps = torch.full((len(SCHEDULE_POOL),), t, dtype=torch.int64)
        assert torch.equal(bits(emulated.evaluate_schedules(programs, base_lrs, steps, plateau)),
                           bits(cpu.evaluate_schedules(programs, base_lrs, steps, plateau)))


def test_the_emulation_is_built_without_contraction():
    """The bitwise claim rests on the emulation rounding as the kernels do: no fused multiply-adds."""
    ninja = (cuda_emulation.BUILD_DIR / "build.ninja").read_text()
    assert "-ffp-contract=off" in ninja
