"""Fewer bytes per parameter (csrc/storage_math.h, fusedlr/_state.py): bfloat16 optimizer state,
stochastic rounding, and float32 master weights kept as int16 remainders of bfloat16 parameters.

The statistical tests check a count against its expectation under unbiased rounding with a bound
of 6 standard deviations: for a rounding that is unbiased, the chance that a fresh seed fails one
is below 2e-9 (normal tail; every count is a sum of at least 2^14 independent indicators, where
the normal approximation is close). The seeds are fixed, so a run is deterministic.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import fusedlr
from fusedlr import _state
from fusedlr import schedules as S
from registry import OPTIMIZERS

Z_BOUND = 6.0


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
                   torch.int16: torch.int16, torch.float64: torch.int64, torch.int64: torch.int64}[t.dtype])


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype, f"{what}: {a.dtype} and {b.dtype}"
    assert torch.equal(bits(a), bits(b)), f"{what}: {(bits(a) != bits(b)).sum().item()} elements differ"


def z_score(count: float, expected: float, variance: float) -> float:
    return (count - expected) / math.sqrt(variance)


# -- the remainder split ------------------------------------------------------------------------

def special_floats() -> torch.Tensor:
    values = [0.0, -0.0, math.inf, -math.inf, 3.4028234663852886e38, -3.4028234663852886e38, 1e-45, -1e-45,
              1.1754943508222875e-38, 1.0, -1.0, 65504.0]
    t = torch.tensor(values, dtype=torch.float32)
    # exact ties: the low half 0x8000, above even and odd top halves, both signs
    tops = torch.tensor([0x3f80, 0x3f81, 0x4000, 0x4001, 0x7f7e, 0x0001], dtype=torch.int32)
    ties = ((tops << 16) | 0x8000).view(torch.float32)
    return torch.cat([t, ties, -ties])


def test_a_bfloat16_and_its_remainder_are_the_float32_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(1 << 16, generator=g) * torch.logspace(-30, 30, 1 << 16).float(),
                   torch.randint(-2 ** 31, 2 ** 31 - 1, (1 << 16,), generator=g, dtype=torch.int32).view(torch.float32),
                   special_floats()])
    nan = torch.isnan(x)
    assert int(nan.sum()) > 100  # the random bit patterns hold NaNs of every payload and sign
    param, remainder = _state.split_master(x)
    assert param.dtype == torch.bfloat16 and remainder.dtype == torch.int16
    joined = _state.join_master(param, remainder)
    # a NaN stays a NaN of its sign in the parameter and the master (its low payload bits aside)
    assert bool(torch.isnan(param[nan]).all()) and bool(torch.isnan(joined[nan]).all())
    assert torch.equal(torch.signbit(param[nan].float()), torch.signbit(x[nan]))
    x, param, remainder, joined = x[~nan], param[~nan], remainder[~nan], joined[~nan]
    assert_bits_equal(joined, x, "join(split(x))")
    # the parameter is the nearest bfloat16, ties away from zero: it differs from torch's
    # round-to-nearest-even on exact ties above an even top half only
    nearest_even = x.to(torch.bfloat16)
    differs = bits(param) != bits(nearest_even)
    low = x.view(torch.int32) & 0xFFFF
    top_even = ((x.view(torch.int32) >> 16) & 1) == 0
    assert torch.equal(differs, (low == 0x8000) & top_even)
    assert bool((param[differs].float().abs() > x[differs].abs()).all())


# -- remainders: the run of master_weights=True, bit for bit ------------------------------------

def bf16_problem(seed: int, shapes=((64, 33), (7,), (5, 1, 3), (1000,))):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape, generator=g).to(torch.bfloat16)) for shape in shapes]
    targets = [torch.randn(shape, generator=g) for shape in shapes]
    return params, targets


def set_gradients(params, targets, step: int) -> None:
    """Gradients that depend on the parameters (a quadratic loss) and on the step's noise: a
    trajectory that differs anywhere stays different."""
    g = torch.Generator().manual_seed(1000 + step)
    for p, t in zip(params, targets):
        noise = torch.randn(p.shape, generator=g)
        p.grad = ((p.detach().float() - t) * 0.5 + noise).to(p.dtype)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
def test_remainders_run_as_float32_masters(name, state_dtype):
    entry = OPTIMIZERS[name]
    runs = {}
    for mode in (True, "remainder"):
        params, targets = bf16_problem(1)
        opt = entry.fused(params, **entry.kwargs, master_weights=mode, state_dtype=state_dtype,
                          schedule=S.CosineAnnealingLR(T_max=200), max_grad_norm=5.0)
        snapshots = []
        for step in range(200):
            set_gradients(params, targets, step)
            opt.step()
            if step % 40 == 39:
                snapshots.append([p.detach().clone() for p in params])
        runs[mode] = params, opt, snapshots
    (p_master, opt_master, snaps_master), (p_rem, opt_rem, snaps_rem) = runs[True], runs["remainder"]
    for k, (a, b) in enumerate(zip(snaps_master, snaps_rem)):
        for n, (x, y) in enumerate(zip(a, b)):
            assert_bits_equal(y, x, f"parameter {n} at snapshot {k}")
    for n, (x, y) in enumerate(zip(p_master, p_rem)):
        master = opt_master.state[x]["master_weight"]
        remainder = opt_rem.state[y]["master_remainder"]
        assert remainder.dtype == torch.int16 and "master_weight" not in opt_rem.state[y]
        assert_bits_equal(_state.join_master(y.detach(), remainder), master, f"master of parameter {n}")
        for key, value in opt_master.state[x].items():
            if key not in ("master_weight", "step"):
                assert_bits_equal(opt_rem.state[y][key], value, f"{key} of parameter {n}")


def test_float16_parameters_need_float32_masters():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))
    with pytest.raises(ValueError, match="float16 parameters need master_weights=True"):
        fusedlr.AdamW([p], master_weights="remainder")
    opt = fusedlr.AdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))], master_weights="remainder")
    with pytest.raises(ValueError, match="float16 parameters need master_weights=True"):
        opt.add_param_group({"params": [p]})
    assert len(opt.param_groups) == 1


def test_a_mode_change_converts_the_master():
    """Switching master_weights between True and "remainder" keeps the master exactly (the
    conversion sets the parameter to the master's rounding, as the next step would)."""
    params, targets = bf16_problem(2)
    opt = fusedlr.AdamW(params, lr=0.01, master_weights=True)
    reference_params, _ = bf16_problem(2)
    reference = fusedlr.AdamW(reference_params, lr=0.01, master_weights=True)
    for step in range(30):
        for ps, o in ((params, opt), (reference_params, reference)):
            set_gradients(ps, targets, step)
            o.step()
        if step == 9:
            opt.master_weights = "remainder"
        if step == 19:
            opt.master_weights = True
    for p, q in zip(params, reference_params):
        assert_bits_equal(p.detach(), q.detach(), "parameter")
        assert_bits_equal(opt.state[p]["master_weight"], reference.state[q]["master_weight"], "master")


# -- bfloat16 state: numerics ------------------------------------------------------------------

def regression_losses(state_dtype, stochastic: bool, steps: int = 1000) -> list[float]:
    """Linear least squares, 64 features, float32 parameters, AdamW with a cosine schedule."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 64, generator=g)
    w_true = torch.randn(64, 1, generator=g)
    y = x @ w_true + 0.1 * torch.randn(512, 1, generator=g)
    w = torch.nn.Parameter(torch.zeros(64, 1))
    b = torch.nn.Parameter(torch.zeros(1))
    opt = fusedlr.AdamW([w, b], lr=0.05, weight_decay=0.0, schedule=S.CosineAnnealingLR(T_max=steps),
                        state_dtype=state_dtype, stochastic_rounding=stochastic, rounding_seed=11)
    return trained_losses(opt, lambda: ((x @ w + b - y) ** 2).mean(), steps)


def trained_losses(opt, loss_of, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = loss_of()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_bfloat16_moments_train_a_regression_as_float32_moments_do():
    """The noise floor of this problem is 0.01 (the label noise's variance). bfloat16 keeps 8 bits
    of each moment, a relative error of at most 2^-9 per store; Adam's step m / sqrt(v) then errs
    by about 2^-9 relative, which moves the iterate by far less than the optimization does, so the
    loss curves agree within 10% (plus 2e-3, a fifth of the noise floor) while the loss falls by
    three orders of magnitude, and all end at the noise floor. (To nearest, v cannot fall by the
    factor beta2 = 0.999 per step, a change below half a bfloat16 ulp: it stagnates and the steps
    come out smaller; stochastic rounding keeps it unbiased. Both still converge here.)"""
    reference = regression_losses(None, False)
    for stochastic in (False, True):
        losses = regression_losses(torch.bfloat16, stochastic)
        assert losses[-1] < 0.0125 and reference[-1] < 0.0125  # the noise floor, 0.01, and a little
        for k in (50, 200, 500, 999):
            assert abs(losses[k] - reference[k]) <= 0.1 * reference[k] + 2e-3, (stochastic, k, losses[k], reference[k])


def tiny_model_losses(state_dtype, stochastic: bool, steps: int = 1000) -> list[float]:
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
                                torch.nn.Linear(64, 4))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(256, 16, generator=g)
    labels = (x[:, :4] * torch.tensor([1.0, -2.0, 0.5, 1.5])).argmax(dim=1)
    opt = fusedlr.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01,
                        schedule=S.Warmup(S.Decay(steps, "cosine"), 50), state_dtype=state_dtype,
                        stochastic_rounding=stochastic, rounding_seed=12)
    return trained_losses(opt, lambda: torch.nn.functional.cross_entropy(model(x), labels), steps)


def test_bfloat16_moments_train_a_tiny_model_as_float32_moments_do():
    """A 3-layer MLP on a separable 4-class problem: the training loss, averaged over windows of 100
    steps, stays within 10% of the float32-state run's plus 0.01 (which matters once both are near
    zero), and all three runs fit the data (the loss falls from 1.4 below 0.05)."""
    reference = tiny_model_losses(None, False)
    window = lambda losses, k: sum(losses[k:k + 100]) / 100  # noqa: E731
    for stochastic in (False, True):
        losses = tiny_model_losses(torch.bfloat16, stochastic)
        assert losses[-1] < 0.05 and reference[-1] < 0.05
        for k in range(0, 1000, 100):
            a, b = window(losses, k), window(reference, k)
            assert abs(a - b) <= 0.1 * b + 0.01, (stochastic, k, a, b)


# -- stochastic rounding: unbiased ----------------------------------------------------------------

def sgd_single_step(param: torch.Tensor, grad: torch.Tensor, seed: int, lr: float = 1.0, **kwargs):
    p = torch.nn.Parameter(param.clone())
    opt = fusedlr.SGD([p], lr=lr, stochastic_rounding=True, rounding_seed=seed, **kwargs)
    p.grad = grad.clone()
    opt.step()
    return p.detach(), opt


def assert_unbiased(rounded_up: torch.Tensor, probability: torch.Tensor) -> None:
    """rounded_up[i] is 1 where element i took its upper neighbour, which unbiased rounding does
    with probability[i]: over all elements, and over each quarter of the probabilities."""
    p, up = probability.double(), rounded_up.double()
    for lo, hi in [(0, 1), (0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1)]:
        sel = (p > lo) & (p <= hi)
        z = z_score(up[sel].sum().item(), p[sel].sum().item(), (p[sel] * (1 - p[sel])).sum().item())
        assert abs(z) < Z_BOUND, (lo, hi, z)


@pytest.mark.parametrize("dtype,low,high", [(torch.bfloat16, 1.0, 2.0), (torch.bfloat16, -2.0 ** -100, -2.0 ** -101),
                                            (torch.float16, 1.0, 2.0), (torch.float16, -3000.0, -60000.0),
                                            (torch.float16, 2.0 ** -15, 2.0 ** -14)])
def test_stochastic_rounding_of_parameters_is_unbiased(dtype, low, high):
    """p - lr * g with an update of k/128 of the parameter's ulp (exact in float32) moves |p| to its
    upper neighbour with probability k/128, over 2^16 elements of random k; the last case lies in
    float16's subnormal range."""
    n = 1 << 16
    g = torch.Generator().manual_seed(6)
    lo, hi = sorted((low, high))
    param = (lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)).to(dtype)
    magnitude = param.abs()
    above = (magnitude.view(torch.int16) + 1).view(dtype).double()  # the next value away from zero
    ulp = above - magnitude.double()
    k = torch.randint(1, 128, (n,), generator=g).double()
    lr = 2.0 ** -10
    exact_grad = -torch.sign(param.double()) * ulp * k / 128 / lr
    grad = exact_grad.to(dtype)
    assert torch.equal(grad.double(), exact_grad)
    stepped, _ = sgd_single_step(param, grad, seed=7, lr=lr)
    assert bool(((stepped.abs().double() == magnitude.double()) | (stepped.abs().double() == above)).all())
    assert bool((torch.sign(stepped.double()) == torch.sign(param.double())).all())
    assert_unbiased(stepped.abs().double() == above, k / 128)


def test_stochastic_rounding_of_bfloat16_state_is_unbiased():
    """SGD's first momentum buffer is the (float32) gradient: stored in bfloat16 it takes the
    neighbour away from zero with the probability of its position between the two."""
    n = 1 << 16
    g = torch.Generator().manual_seed(8)
    grad = torch.randn(n, generator=g)
    _, opt = sgd_single_step(torch.zeros(n), grad, seed=9, momentum=0.9, state_dtype=torch.bfloat16)
    (param,) = opt.param_groups[0]["params"]
    stored = opt.state[param]["momentum_buffer"]
    assert stored.dtype == torch.bfloat16
    below = (grad.view(torch.int32) & -0x10000).view(torch.float32)  # toward zero
    above = ((grad.view(torch.int32) & -0x10000) + 0x10000).view(torch.float32)
    assert bool(((stored.float() == below) | (stored.float() == above)).all())
    inexact = grad != below
    assert_unbiased((stored.float() == above)[inexact], ((grad - below) / (above - below))[inexact])


def test_stochastic_rounding_lets_a_bfloat16_second_moment_decay():
    """With zero gradients Adam's v decays by beta2 = 0.999 per step, a change below half a
    bfloat16 ulp: to nearest, v never moves; stochastically, its mean follows 0.999^k."""
    n = 1 << 14
    g = torch.Generator().manual_seed(10)
    grad = torch.randn(n, generator=g)
    results = {}
    for stochastic in (False, True):
        p = torch.nn.Parameter(torch.zeros(n))
        opt = fusedlr.Adam([p], lr=1e-3, state_dtype=torch.bfloat16, stochastic_rounding=stochastic, rounding_seed=3)
        p.grad = grad.clone()
        opt.step()
        v0 = opt.state[p]["exp_avg_sq"].float().clone()
        p.grad = torch.zeros(n)
        for _ in range(500):
            opt.step()
        results[stochastic] = v0, opt.state[p]["exp_avg_sq"].float()
    v0, v = results[False]
    assert torch.equal(v, v0), "to nearest, v stagnates"
    v0, v = results[True]
    ratio = (v.double().sum() / (v0.double().sum() * 0.999 ** 500)).item()
    # each stored value errs by at most an ulp (2^-7 relative) per step, unbiased: the sum's
    # relative standard deviation is below 2^-7 * sqrt(500 / n) = 0.0014
    assert abs(ratio - 1) < 6 * 2 ** -7 * math.sqrt(500 / n), ratio


# -- stochastic rounding: reproducible ---------------------------------------------------------

def stochastic_run(seed: int, steps: int, threads: int | None = None, split_at: int | None = None,
                   name: str = "adamw"):
    entry = OPTIMIZERS[name]
    params, targets = bf16_problem(13, shapes=((300, 301), (17,), (70000,)))
    make = lambda ps, seed: entry.fused(ps, **entry.kwargs, state_dtype=torch.bfloat16,  # noqa: E731
                                        stochastic_rounding=True, rounding_seed=seed,
                                        schedule=S.CosineAnnealingLR(T_max=40))
    opt = make(params, seed)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for step in range(steps):
            if step == split_at:
                buffer = io.BytesIO()
                torch.save(opt.state_dict(), buffer)
                buffer.seek(0)
                opt = make(params, seed + 1)  # the checkpoint's seed, not this one, must hold
                opt.load_state_dict(torch.load(buffer))
                assert opt.param_groups[0]["rounding_seed"] == seed
            set_gradients(params, targets, step)
            opt.step()
    finally:
        torch.set_num_threads(before)
    return params, opt


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_stochastic_rounding_is_reproducible(name):
    base, base_opt = stochastic_run(21, 12, name=name)
    again, _ = stochastic_run(21, 12, threads=1, name=name)
    resumed, resumed_opt = stochastic_run(21, 12, threads=2, split_at=5, name=name)
    other, _ = stochastic_run(22, 12, name=name)
    for n, (a, b, c, d) in enumerate(zip(base, again, resumed, other)):
        assert_bits_equal(b.detach(), a.detach(), f"parameter {n}, one thread")
        assert_bits_equal(c.detach(), a.detach(), f"parameter {n}, resumed on two threads")
        for key, value in base_opt.state[a].items():
            assert_bits_equal(resumed_opt.state[c][key], value, f"{key} of parameter {n}, resumed")
        if a.numel() > 1000:
            assert not torch.equal(bits(d.detach()), bits(a.detach())), "another seed, other roundings"


# -- state dtypes through checkpoints ---------------------------------------------------------

def trained(opt_factory, steps: int = 3):
    params, targets = bf16_problem(14, shapes=((40, 3), (9,)))
    params = [torch.nn.Parameter(p.detach().float()) for p in params]
    opt = opt_factory(params)
    for step in range(steps):
        set_gradients(params, targets, step)
        for p in params:
            p.grad = p.grad.float()
        opt.step()
    return params, opt


def test_bfloat16_state_survives_a_checkpoint():
    params, opt = trained(lambda ps: fusedlr.AdamW(ps, lr=0.01, amsgrad=True, state_dtype=torch.bfloat16))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer)  # weights_only: the dtype setting loads
    assert saved["param_groups"][0]["state_dtype"] == torch.bfloat16
    fresh = fusedlr.AdamW(params, lr=0.01, amsgrad=True)  # no state_dtype of its own: the checkpoint's
    fresh.load_state_dict(saved)
    for p in params:
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert fresh.state[p][key].dtype == torch.bfloat16
            assert_bits_equal(fresh.state[p][key], opt.state[p][key], key)
    # torch's AdamW takes it (casting the state to the parameters' float32) and steps on
    twin = torch.optim.AdamW(params, lr=0.01, amsgrad=True)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p in params:
        assert twin.state[p]["exp_avg"].dtype == torch.float32
        assert torch.equal(twin.state[p]["exp_avg"], opt.state[p]["exp_avg"].float())
    twin.step()


def test_a_torch_checkpoint_loads_into_bfloat16_state():
    params, torch_opt = trained(lambda ps: torch.optim.AdamW(ps, lr=0.01))
    opt = fusedlr.AdamW(params, lr=0.01, state_dtype=torch.bfloat16)
    opt.load_state_dict(torch_opt.state_dict())
    for p in params:
        assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
        assert torch.equal(opt.state[p]["exp_avg"], torch_opt.state[p]["exp_avg"].to(torch.bfloat16))
    opt.step()


def test_changing_a_groups_state_dtype_casts_its_state():
    params, opt = trained(lambda ps: fusedlr.AdamW(ps, lr=0.01))
    before = {p: {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")} for p in params}
    opt.param_groups[0]["state_dtype"] = torch.bfloat16
    opt._prepare()  # the step's preparation casts the state; the update would then move it on
    for p in params:
        for key, value in before[p].items():
            assert_bits_equal(opt.state[p][key], value.to(torch.bfloat16), key)
    opt.step()
    cast = {p: opt.state[p]["exp_avg"].clone() for p in params}
    opt.param_groups[0]["state_dtype"] = None
    opt._prepare()
    for p in params:
        assert_bits_equal(opt.state[p]["exp_avg"], cast[p].float(), "exp_avg back in float32")
    opt.step()


@pytest.mark.parametrize("saved_mode,loaded_mode", [(True, "remainder"), ("remainder", True),
                                                    ("remainder", "remainder")])
def test_master_weights_load_across_modes(saved_mode, loaded_mode):
    params, targets = bf16_problem(15)
    opt = fusedlr.AdamW(params, lr=0.01, master_weights=saved_mode)
    for step in range(5):
        set_gradients(params, targets, step)
        opt.step()
    state_dict = copy.deepcopy(opt.state_dict())
    masters = {n: (opt.state[p]["master_weight"] if saved_mode is True
                   else _state.join_master(p.detach(), opt.state[p]["master_remainder"]))
               for n, p in enumerate(params)}
    loaded = fusedlr.AdamW(params, lr=0.01, master_weights=loaded_mode)
    loaded.load_state_dict(state_dict)
    for n, p in enumerate(params):
        state = loaded.state[p]
        master = state["master_weight"] if loaded_mode is True else _state.join_master(p.detach(),
                                                                                         state["master_remainder"])
        assert_bits_equal(master, masters[n], f"master of parameter {n}")
        assert set(state) == {"step", "exp_avg", "exp_avg_sq", _state.state_key("master_weight", loaded_mode)}


# -- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(state_dtype=torch.float16), "Invalid state_dtype"),
    (dict(state_dtype="bfloat16"), "Invalid state_dtype"),
    (dict(stochastic_rounding=1), "Invalid stochastic_rounding"),
    (dict(rounding_seed=-1), "Invalid rounding_seed"),
    (dict(rounding_seed=2 ** 53), "Invalid rounding_seed"),
    (dict(rounding_seed=1.5), "Invalid rounding_seed"),
    (dict(rounding_seed=True), "Invalid rounding_seed"),
    (dict(master_weights="fp32"), "Invalid master_weights"),
])
def test_bad_storage_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fusedlr.AdamW([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_bfloat16_state_of_float64_parameters_is_refused():
    with pytest.raises(ValueError, match="float64"):
        fusedlr.SGD([torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))], momentum=0.9,
                    state_dtype=torch.bfloat16)


def test_a_bad_group_setting_changes_nothing():
    params, opt = trained(lambda ps: fusedlr.AdamW(ps, lr=0.01, stochastic_rounding=True, rounding_seed=1))
    snapshot = [p.detach().clone() for p in params], {p: {k: v.clone() for k, v in opt.state[p].items()}
                                                      for p in params}
    opt.param_groups[0]["rounding_seed"] = -3
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="rounding_seed"):
        opt.step()
    for p, before in zip(params, snapshot[0]):
        assert torch.equal(p.detach(), before)
        for key, value in snapshot[1][p].items():
            assert torch.equal(opt.state[p][key], value)
    opt.param_groups[0]["rounding_seed"] = 1
    opt.step()


# -- groups, paths -----------------------------------------------------------------------------

def test_each_group_rounds_with_its_own_seed():
    """Changing one group's rounding_seed changes the roundings of its tensors only; the op path
    (one op call) and the prepared step agree bit for bit with stochastic rounding on."""
    def run(seeds, path="plan"):
        params, targets = bf16_problem(16, shapes=((50, 40), (300,), (30, 30), (64,)))
        groups = [{"params": params[:2], "rounding_seed": seeds[0]}, {"params": params[2:], "rounding_seed": seeds[1]}]
        opt = fusedlr.AdamW(groups, lr=0.01, stochastic_rounding=True, state_dtype=torch.bfloat16)
        for step in range(6):
            set_gradients(params, targets, step)
            if path == "plan":
                opt.step()
            else:  # the op, as under torch.compile
                lists, fresh = opt._prepare()
                opt._run_op(lists, [p.grad for p in lists.params], lists.hyper, lists.programs, None, None, None,
                            False, None)
        return [p.detach().clone() for p in params], [opt.state[p]["exp_avg"].clone() for p in params]
    base, base_state = run((5, 6))
    op, op_state = run((5, 6), path="op")
    changed, changed_state = run((5, 7))
    for n in range(4):
        assert_bits_equal(op[n], base[n], f"parameter {n}, the op path")
        assert_bits_equal(op_state[n], base_state[n], f"exp_avg {n}, the op path")
    for n in (0, 1):
        assert_bits_equal(changed[n], base[n], f"parameter {n} of the group whose seed stayed")
    for n in (2, 3):
        assert not torch.equal(bits(changed_state[n]), bits(base_state[n])), f"exp_avg {n}: its group's new seed"


def test_a_bfloat16_model_rounds_stochastically_only_when_asked():
    """Round to nearest by default: bf16 parameters under tiny updates stagnate (torch's behaviour);
    with stochastic_rounding they move by the updates on average."""
    n = 1 << 14
    moved = {}
    for stochastic in (False, True):
        p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
        opt = fusedlr.SGD([p], lr=1e-4, stochastic_rounding=stochastic, rounding_seed=2)
        for _ in range(100):
            p.grad = torch.full((n,), -1.0, dtype=torch.bfloat16)  # each step adds 1e-4, an ulp is 2^-7
            opt.step()
        moved[stochastic] = (p.detach().double() - 1).mean().item()
    assert moved[False] == 0.0
    # 100 steps of 1e-4, each rounding up by an ulp (2^-7) with p = 1e-4 / 2^-7 independently:
    # the mean move's standard deviation is 2^-7 sqrt(100 p (1 - p) / n)
    ulp, p = 2.0 ** -7, 1e-4 / 2.0 ** -7
    assert abs(moved[True] - 0.01) < Z_BOUND * ulp * math.sqrt(100 * p * (1 - p) / n)


def test_master_weights_switched_at_run_time():
    """Off drops the master (the parameter is the value again); an invalid mode, or remainders for
    a float16 parameter, raise at the next step and change nothing."""
    params, targets = bf16_problem(17)
    opt = fusedlr.AdamW(params, lr=0.01, master_weights=True)
    set_gradients(params, targets, 0)
    opt.step()
    opt.master_weights = False
    set_gradients(params, targets, 1)
    opt.step()
    assert all("master_weight" not in opt.state[p] for p in params)
    opt.master_weights = "fp32"
    with pytest.raises(ValueError, match="Invalid master_weights"):
        opt.step()
    half = torch.nn.Parameter(torch.ones(5, dtype=torch.float16))
    opt = fusedlr.AdamW([half], lr=0.01, master_weights=True)
    half.grad = torch.ones(5, dtype=torch.float16)
    opt.step()
    before = half.detach().clone(), {k: v.clone() for k, v in opt.state[half].items()}
    opt.master_weights = "remainder"
    with pytest.raises(ValueError, match="float16 parameters need master_weights=True"):
        opt.step()
    assert torch.equal(half.detach(), before[0])
    assert set(opt.state[half]) == set(before[1])
    for key, value in before[1].items():
        assert torch.equal(opt.state[half][key], value)
    opt.master_weights = True
    opt.step()


def test_the_op_refuses_a_bad_seed():
    p = torch.zeros(4)
    for seed, stochastic in [(-1.0, 1.0), (2.0 ** 53, 1.0), (0.5, 1.0), (math.nan, 1.0), (0.0, 0.5)]:
        hyper = OPTIMIZERS["sgd"].hyper(dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=0.0,
                                             maximize=0.0, stochastic_rounding=stochastic, rounding_seed=seed))
        with pytest.raises(RuntimeError, match="rounding seed|stochastic_rounding slot"):
            torch.ops.fusedlr.sgd_step_([p], [torch.ones(4)], [torch.empty(0)], [torch.empty(0)],
                                        [torch.zeros((), dtype=torch.int64)], [0], hyper, S.compile_programs([None]),
                                        torch.zeros(1, dtype=torch.int64), fusedlr._ops.initial_plateau_state(
                                            1, torch.device("cpu")))
        assert torch.equal(p, torch.zeros(4))


@pytest.mark.parametrize("mode", [True, "remainder"])
def test_a_nan_master_makes_a_nan_parameter(mode):
    """A NaN master of any payload (a GPU's canonical NaN is 0x7fffffff, whose rounding carry would
    reach the sign) gives a NaN bf16 parameter, never a zero or an infinity."""
    p = torch.nn.Parameter(torch.ones(6, dtype=torch.bfloat16))
    opt = fusedlr.SGD([p], lr=0.1, master_weights=mode)
    p.grad = torch.zeros(6, dtype=torch.bfloat16)
    opt.step()
    payloads = torch.tensor([0x7fffffff, -1, 0x7f800001, 0x7fc00000, 0x7f807fff, -0x7fffff], dtype=torch.int32)
    if mode is True:
        opt.state[p]["master_weight"].copy_(payloads.view(torch.float32))
    else:  # the same NaNs, as a parameter and its remainder
        high, low = payloads >> 16, payloads & 0xFFFF
        with torch.no_grad():
            p.copy_(high.to(torch.int16).view(torch.bfloat16))
        opt.state[p]["master_remainder"].copy_(low.to(torch.int16))
    opt.step()
    assert bool(torch.isnan(p.detach()).all()), p.detach().view(torch.int16)


def test_a_bfloat16_state_group_takes_the_common_step():
    """state_dtype is a torch.dtype, which cannot change in place: the common step does not read
    the groups' settings by value for it (fusedlr/_step_cache.py, changes_in_place)."""
    p = torch.nn.Parameter(torch.zeros(8))
    opt = fusedlr.AdamW([p], lr=0.01, state_dtype=torch.bfloat16)
    p.grad = torch.ones(8)
    opt.step()
    opt.step()
    assert opt._lists.seen_hyper is None
