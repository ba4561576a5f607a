"""The roundings of csrc/storage_math.h against references of their own. Each rounding is fed exact
float32 values through a step whose float32 result is known (special values from
tests/isa_steps.py, ties, random bit patterns of every exponent), and its result is checked
against a definition spelled another way: rounding to nearest as the nearer of the value's two
neighbours by their distances in float64 (ties to even, or away from zero for a master's bf16
parameter) and numpy's float16 conversion; stochastic rounding as one of the two neighbours, up
as often as the value's distance from the one below says (a 6-sigma test). scripts/test.sh runs
this file under each version of the CPU loops.
"""

import numpy as np
import pytest
import torch

import fusedlr
from isa_steps import special_values

BF16_MAX_BITS = 0x7F7F  # the largest finite bfloat16
FP16_MAX = 65504.0


def bits32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().view(torch.int32).numpy().view(np.uint32).astype(np.int64)


def bits16(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().view(torch.int16).numpy().view(np.uint16).astype(np.int64)


def float32_of_bits(b: np.ndarray) -> np.ndarray:
    return (b & 0xFFFFFFFF).astype(np.uint32).view(np.float32)


def bf16_value(top: np.ndarray) -> np.ndarray:
    """The float64 value of bfloat16 bit patterns, infinity as 2^128 (where rounding overflows)."""
    value = float32_of_bits(top << 16).astype(np.float64)
    return np.where(np.isinf(value), np.copysign(2.0**128, value), value)


def exact_values(gen: torch.Generator, count: int = 4000) -> torch.Tensor:
    """special_values(), each many times, random float32 bit patterns of every exponent (NaNs and
    infinities among them), and as many bfloat16 ties (a low half of 0x8000)."""
    random_bits = torch.randint(-(2**31), 2**31, (count,), generator=gen, dtype=torch.int64)
    ties = (random_bits & ~0xFFFF) | 0x8000
    patterns = torch.cat([random_bits, ties]).to(torch.int32)  # int64 to int32 wraps, as bits
    return torch.cat([special_values().repeat(20), patterns.view(torch.float32)])


def bf16_neighbours(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bfloat16 patterns at or below the magnitude of float32 bits b and the next one above."""
    below = b >> 16
    return below, below + 1


def bf16_nearest_reference(b: np.ndarray, ties_away: bool) -> np.ndarray:
    """Rounding to nearest of finite float32 bits b: the nearer neighbour by float64 distance; on a
    tie the even one, or the one away from zero."""
    below, above = bf16_neighbours(b)
    x = np.abs(float32_of_bits(b).astype(np.float64))
    to_below = x - np.abs(bf16_value(below))
    to_above = np.abs(bf16_value(above)) - x
    tie_up = np.full(b.shape, True) if ties_away else (below & 1) == 1
    up = (to_above < to_below) | ((to_above == to_below) & tie_up)
    return np.where(up, above, below)


def first_momentum_buffer(grad: torch.Tensor, **options) -> torch.Tensor:
    """The bfloat16 momentum buffer of SGD's first step: the float32 gradient itself (the sign and
    clipping factors are 1), rounded as the state's storage says."""
    param = torch.nn.Parameter(torch.zeros(grad.numel()))
    param.grad = grad.clone()
    opt = fusedlr.SGD([param], lr=1e-3, momentum=0.9, state_dtype=torch.bfloat16, **options)
    opt.step()
    return opt.state[param]["momentum_buffer"]


def assert_unbiased(up: np.ndarray, probability: np.ndarray) -> None:
    """As many roundings up as their probabilities add to, within 6 sigma (a false failure once in
    5e8; the seeds are fixed besides)."""
    expected = probability.sum()
    sigma = np.sqrt((probability * (1 - probability)).sum())
    assert sigma > 5 and abs(up.sum() - expected) < 6 * sigma, (up.sum(), expected, sigma)


def test_bfloat16_to_nearest():
    x = exact_values(torch.Generator().manual_seed(1))
    got = bits16(first_momentum_buffer(x))
    b = bits32(x)
    magnitude = b & 0x7FFFFFFF
    nan = magnitude > 0x7F800000
    infinite = magnitude == 0x7F800000
    finite = ~nan & ~infinite
    assert (got[nan] == 0x7FC0).all()  # every NaN made 0x7fc0, as c10::BFloat16 makes it
    assert (got[infinite] == b[infinite] >> 16).all()
    sign = (b >> 16) & 0x8000
    expected = bf16_nearest_reference(magnitude[finite], ties_away=False) | sign[finite]
    assert (got[finite] == expected).all(), np.flatnonzero(got[finite] != expected)[:10]


def test_bfloat16_stochastic_is_an_unbiased_neighbour():
    x = exact_values(torch.Generator().manual_seed(2))
    got = bits16(first_momentum_buffer(x, stochastic_rounding=True, rounding_seed=3))
    b = bits32(x)
    magnitude = b & 0x7FFFFFFF
    sign = (b >> 16) & 0x8000
    nan = magnitude > 0x7F800000
    infinite = magnitude == 0x7F800000
    # at or beyond the largest finite: to nearest
    beyond = ~nan & ~infinite & (magnitude >> 16 >= BF16_MAX_BITS)
    exact = ~nan & ~beyond & ((b & 0xFFFF) == 0)  # infinities included
    between = ~nan & ~beyond & ~exact
    assert (got[nan] == 0x7FC0).all()
    assert (got[beyond] == (bf16_nearest_reference(magnitude[beyond], ties_away=False) | sign[beyond])).all()
    assert (got[exact] == b[exact] >> 16).all()  # signed zeros included
    below, above = bf16_neighbours(magnitude[between])
    got_magnitude = got[between] & 0x7FFF
    assert ((got[between] & 0x8000) == sign[between]).all()
    assert np.isin(got_magnitude - below, (0, 1)).all()
    x_between = np.abs(float32_of_bits(magnitude[between]).astype(np.float64))
    low, high = bf16_value(below), bf16_value(above)
    assert_unbiased(got_magnitude == above, (x_between - low) / (high - low))


def float16_update(param: torch.Tensor, grad: torch.Tensor, lr: float, **options) -> torch.Tensor:
    """A float16 parameter after one SGD step without momentum: param + (-lr) * grad in float32,
    rounded to float16 as its storage says."""
    p = torch.nn.Parameter(param.clone())
    p.grad = grad.clone()
    fusedlr.SGD([p], lr=lr, **options).step()
    return p.detach()


def float16_case(seed: int):
    """float16 parameters and gradients (specials, large and subnormal values, random ones) and the
    float32 values of their SGD update as the kernel computes them: param + (-lr) * grad (the
    gradient's sign and clipping factors are 1), in float32 without fused multiply-adds."""
    gen = torch.Generator().manual_seed(seed)
    specials = special_values().to(torch.float16)
    n = 6000
    scales = 2.0 ** torch.randint(-30, 16, (n,), generator=gen).to(torch.float32)
    param = torch.cat([specials.repeat(40), (torch.randn(n, generator=gen) * scales).to(torch.float16),
                       torch.full((200,), FP16_MAX, dtype=torch.float16)])
    grad = torch.cat([specials.repeat(40)[torch.randperm(40 * specials.numel(), generator=gen)],
                      (torch.randn(n, generator=gen) * scales).to(torch.float16),
                      (-torch.rand(200, generator=gen) * 20).to(torch.float16)])
    lr = 0.3
    neg_lr = torch.tensor(-lr, dtype=torch.float32)
    value = param.to(torch.float32) + neg_lr * grad.to(torch.float32)
    return param, grad, lr, value.numpy()


def test_float16_to_nearest():
    param, grad, lr, v = float16_case(4)
    got = bits16(float16_update(param, grad, lr))
    nan = np.isnan(v)
    with np.errstate(over="ignore"):  # numpy's conversion: to nearest even, to infinity beyond
        expected = v[~nan].astype(np.float16).view(np.uint16).astype(np.int64)
    assert (got[~nan] == expected).all(), np.flatnonzero(got[~nan] != expected)[:10]
    # a NaN is 0x7e00 with its sign
    assert ((got[nan] & 0x7FFF) == 0x7E00).all()


def test_every_float16_is_read_exactly():
    """Each of the 65,536 float16 bit patterns as a gradient, read into float32 by the step: SGD with
    lr 1 from float32 masters of zero makes each master 0 + (-1) * grad, so it must hold the
    gradient's exact value, negated (numpy's float16 conversion, the reference), NaNs as NaNs; the
    float16 parameter is then that master to nearest: the negated value, a NaN 0x7e00 with a sign
    (0 + (-0) is +0, so both zeros give +0)."""
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    grad = torch.from_numpy(patterns.view(np.int16).copy()).view(torch.float16)
    p = torch.nn.Parameter(torch.zeros(grad.numel(), dtype=torch.float16))
    p.grad = grad
    opt = fusedlr.SGD([p], lr=1.0, master_weights=True)
    opt.step()
    master = opt.state[p]["master_weight"].numpy()
    exact = patterns.view(np.float16).astype(np.float32)
    with np.errstate(invalid="ignore"):
        expected = np.float32(0.0) + np.float32(-1.0) * exact
    nan = np.isnan(exact)
    assert nan.sum() == 2 * 1023  # 2 signs x 1023 payloads
    assert np.array_equal(np.isnan(master), nan)
    assert np.array_equal(master[~nan].view(np.uint32), expected[~nan].view(np.uint32))
    got = bits16(p)
    assert (got[~nan] == expected[~nan].astype(np.float16).view(np.uint16)).all()  # exact in float16
    assert ((got[nan] & 0x7FFF) == 0x7E00).all()


@pytest.mark.parametrize("offset", [0, 1])
def test_every_float16_parameter_and_gradient_read_exactly(offset):
    """As above without masters, so the loop reads the float16 parameter and gradient by pairs of
    elements ([note: element pairs]), from a view starting mid-word too: parameters of zero stepped
    by lr 1 become 0 + (-1) * grad to nearest, which is the gradient's value negated, exact in
    float16 (+0 for both zeros), a NaN 0x7e00 with a sign."""
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    grad_storage = torch.zeros(offset + patterns.size, dtype=torch.float16)
    grad_storage[offset:] = torch.from_numpy(patterns.view(np.int16).copy()).view(torch.float16)
    storage = torch.zeros(offset + patterns.size, dtype=torch.float16)
    p = torch.nn.Parameter(storage[offset:])
    p.grad = grad_storage[offset:]
    fusedlr.SGD([p], lr=1.0).step()
    exact = patterns.view(np.float16).astype(np.float32)
    with np.errstate(invalid="ignore"):
        expected = (np.float32(0.0) + np.float32(-1.0) * exact).astype(np.float16).view(np.uint16)
    nan = np.isnan(exact)
    got = bits16(p)
    assert (got[~nan] == expected[~nan]).all(), np.flatnonzero(got[~nan] != expected[~nan])[:10]
    assert ((got[nan] & 0x7FFF) == 0x7E00).all()


def test_float16_stochastic_is_an_unbiased_neighbour():
    param, grad, lr, v = float16_case(5)
    got_bits = bits16(float16_update(param, grad, lr, stochastic_rounding=True, rounding_seed=11))
    got = got_bits.astype(np.uint16).view(np.float16).astype(np.float64)
    nan = np.isnan(v)
    assert np.isnan(got[nan]).all()
    beyond = ~nan & (np.abs(v) >= FP16_MAX)  # at or beyond the largest finite: as to nearest
    with np.errstate(over="ignore"):
        nearest = v.astype(np.float16)
    assert (got_bits[beyond] == nearest[beyond].view(np.uint16)).all()
    inside = ~nan & ~beyond
    exact = inside & (nearest.astype(np.float32) == v)
    # exact values keep their bits, signed zeros included
    assert (got_bits[exact] == v[exact].astype(np.float16).view(np.uint16)).all()
    between = inside & ~exact
    nearest_between = nearest[between]
    toward = np.where(nearest_between.astype(np.float64) > v[between], -np.inf, np.inf).astype(np.float16)
    other = np.nextafter(nearest_between, toward)
    low = np.minimum(np.abs(nearest_between.astype(np.float64)), np.abs(other.astype(np.float64)))
    high = np.maximum(np.abs(nearest_between.astype(np.float64)), np.abs(other.astype(np.float64)))
    magnitude = np.abs(got[between])
    assert ((magnitude == low) | (magnitude == high)).all()
    assert (np.signbit(got[between]) == np.signbit(v[between])).all()
    assert (np.abs(v[between]) < 2.0**-14).sum() > 100  # the subnormal candidate is exercised
    assert_unbiased(magnitude == high, (np.abs(v[between].astype(np.float64)) - low) / (high - low))


def master_case(seed: int):
    """float32 masters (ties, signed zeros, the ties at and beyond bfloat16's largest finite value,
    random values of every exponent) and bfloat16 gradients: zero for half of them (the master
    stays a tie), small for the others (the master moves)."""
    gen = torch.Generator().manual_seed(seed)
    n = 4096
    top = torch.randint(0, 0x7F7F, (n,), generator=gen, dtype=torch.int64)  # finite magnitudes
    sign = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64) << 31
    low = torch.where(torch.arange(n) % 2 == 0, torch.full((n,), 0x8000, dtype=torch.int64),
                      torch.randint(0, 0x10000, (n,), generator=gen, dtype=torch.int64))
    edges = torch.tensor([0x0, 0x80000000, 0x00008000, 0x80008000, 0x7F7F8000, 0xFF7F8000, 0x7F7F7FFF],
                         dtype=torch.int64)
    master_bits = torch.cat([sign | (top << 16) | low, edges]).to(torch.int32)  # int64 to int32 wraps, as bits
    masters = master_bits.view(torch.float32)
    moves = (torch.randn(masters.numel(), generator=gen) * masters.abs().clamp(max=1e30) * 2.0**-10).to(torch.bfloat16)
    grads = torch.where(torch.arange(masters.numel()) % 2 == 0, torch.zeros_like(moves), moves)
    grads[-edges.numel():] = 0
    return masters, grads


@pytest.mark.parametrize("master_weights", [True, "remainder"])
def test_bf16_parameter_of_a_master_rounds_ties_away(master_weights):
    """SGD with lr 1 from masters set in the state: each new master is master - grad in float32,
    and its bf16 parameter is its rounding to nearest, ties away from zero."""
    masters, grads = master_case(6)
    param = torch.nn.Parameter(torch.zeros(masters.numel(), dtype=torch.bfloat16))
    opt = fusedlr.SGD([param], lr=1.0, master_weights=master_weights)
    param.grad = torch.zeros_like(param)
    opt.step()  # makes the state
    m = bits32(masters)
    if master_weights is True:
        opt.state[param]["master_weight"].copy_(masters)
        param.data.zero_()  # the step must write every parameter
    else:  # the master as the parameter (its top half, rounded) and the remainder (its low half)
        top = ((m + 0x8000) & 0xFFFFFFFF) >> 16
        param.data.copy_(torch.from_numpy(top.astype(np.uint16).view(np.int16)).view(torch.bfloat16))
        opt.state[param]["master_remainder"].copy_(torch.from_numpy((m & 0xFFFF).astype(np.uint16).view(np.int16)))
    param.grad = grads
    opt.step()
    new_master = bits32(masters + torch.tensor(-1.0) * grads.to(torch.float32))
    finite = (new_master & 0x7FFFFFFF) < 0x7F800000
    sign = (new_master[finite] >> 16) & 0x8000
    expected = bf16_nearest_reference(new_master[finite] & 0x7FFFFFFF, ties_away=True) | sign
    assert (bits16(param)[finite] == expected).all(), np.flatnonzero(bits16(param)[finite] != expected)[:10]
    if master_weights is True:
        assert (bits32(opt.state[param]["master_weight"]) == new_master).all()
    else:
        assert (bits16(opt.state[param]["master_remainder"]) == (new_master & 0xFFFF)).all()
    ties = finite & ((new_master & 0xFFFF) == 0x8000)
    assert ties.sum() > 1000 and (~ties & finite).sum() > 1000  # ties, and moved masters
