"""The roundings of csrc/storage_math.h against references of their own: torch's conversions to
nearest (one element at a time; NaNs, which torch makes another NaN than c10, by position), the bfloat16 / float16 neighbours of each
value (numpy), and the rounding to nearest with ties away that makes a float32 master's bf16
parameter. Each rounding is fed exact float32 values through a step whose result is known in
float32: special values (tests/isa_steps.py, special_values), ties, and random bit patterns of
every exponent. tests/test_cpu_isa.py compares the loop versions with each other; these compare
what all of them compute with what the roundings are meant to give."""

import numpy as np
import pytest
import torch

import fusedlr
from isa_steps import special_values

BF16_MAX_BITS = 0x7F7F0000  # the largest finite bfloat16, as float32 bits
FP16_MAX = 65504.0


def bits32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().view(torch.int32).numpy().view(np.uint32).astype(np.int64)


def bits16(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().view(torch.int16).numpy().view(np.uint16).astype(np.int64)


def exact_values(gen: torch.Generator, count: int = 4000) -> torch.Tensor:
    """special_values(), each many times, then random float32 bit patterns of every exponent (NaNs
    and infinities among them), then values with a random low half of 0x8000 (bf16 ties) and of
    0x1000 below float16's 13 dropped bits (fp16 ties)."""
    random_bits = torch.randint(-(2**31), 2**31, (count,), generator=gen, dtype=torch.int64).to(torch.int32)
    ties = torch.randint(0, 2**31, (count // 4,), generator=gen, dtype=torch.int64)
    bf16_ties = ((ties & ~0xFFFF) | 0x8000).to(torch.int32)
    fp16_ties = ((ties & ~0x1FFF) | 0x1000).to(torch.int32)
    return torch.cat([special_values().repeat(20),
                      torch.cat([random_bits, bf16_ties, fp16_ties]).view(torch.float32)])


def nearest_bf16_reference(x: torch.Tensor) -> np.ndarray:
    """torch's conversion to nearest even, one element at a time."""
    return np.array([bits16(x[i:i + 1].to(torch.bfloat16))[0] for i in range(x.numel())])


def first_momentum_buffer(grad: torch.Tensor, **options) -> torch.Tensor:
    """The bfloat16 momentum buffer of SGD's first step, which is the float32 gradient itself,
    rounded as the state's storage says."""
    param = torch.nn.Parameter(torch.zeros(grad.numel()))
    param.grad = grad.clone()
    opt = fusedlr.SGD([param], lr=1e-3, momentum=0.9, state_dtype=torch.bfloat16, **options)
    opt.step()
    return opt.state[param]["momentum_buffer"]


def test_bfloat16_to_nearest_is_c10s():
    x = exact_values(torch.Generator().manual_seed(1))
    got = bits16(first_momentum_buffer(x))
    expected = nearest_bf16_reference(x)
    nan = np.isnan(x.numpy())
    # every NaN made 0x7fc0, as c10::BFloat16 makes it (torch's tensor conversion makes 0xffff)
    assert (got[nan] == 0x7FC0).all()
    assert (got[~nan] == expected[~nan]).all(), np.flatnonzero(got != expected)[:10]


def test_bfloat16_stochastic_is_a_neighbour():
    x = exact_values(torch.Generator().manual_seed(2))
    got = bits16(first_momentum_buffer(x, stochastic_rounding=True, rounding_seed=3))
    b = bits32(x)
    magnitude = b & 0x7FFFFFFF
    nan = magnitude > 0x7F800000
    beyond = ~nan & (magnitude >= BF16_MAX_BITS)  # at or beyond the largest finite: as to nearest
    exact = ~nan & ~beyond & ((b & 0xFFFF) == 0)
    between = ~nan & ~beyond & ~exact
    assert (got[nan] == 0x7FC0).all()
    assert (got[beyond] == nearest_bf16_reference(x[torch.from_numpy(beyond)])).all()
    assert (got[exact] == b[exact] >> 16).all()
    # the neighbour below the magnitude (the top half) or the one above it, with its sign
    below = b[between] >> 16
    assert np.isin(got[between] - below, (0, 1)).all()
    # both neighbours occur (over a thousand values rounded; each goes up with probability of its low half)
    assert 0 < (got[between] != below).mean() < 1


def float16_update(param: torch.Tensor, grad: torch.Tensor, lr: float, **options) -> torch.Tensor:
    """A float16 parameter after one SGD step without momentum: param + (-lr) * grad in float32,
    rounded to float16 as its storage says."""
    p = torch.nn.Parameter(param.clone())
    p.grad = grad.clone()
    fusedlr.SGD([p], lr=lr, **options).step()
    return p.detach()


def float16_case(seed: int):
    """float16 parameters and gradients (specials, large and subnormal values, random ones) and the
    float32 values of their SGD update, computed as the kernel computes them: param + (-lr) * grad,
    the gradient first multiplied by the sign and clipping factors, both 1 here."""
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
    value = param.to(torch.float32) + neg_lr * ((grad.to(torch.float32) * 1.0) * 1.0)
    return param, grad, lr, value


def test_float16_to_nearest_is_c10s():
    param, grad, lr, value = float16_case(4)
    got = float16_update(param, grad, lr)
    expected = torch.cat([value[i:i + 1].to(torch.float16) for i in range(value.numel())])
    nan = torch.isnan(value)
    assert torch.equal(torch.isnan(got), nan)
    assert (bits16(got)[~nan.numpy()] == bits16(expected)[~nan.numpy()]).all()
    # a NaN is 0x7e00 with its sign
    assert ((bits16(got)[nan.numpy()] & 0x7FFF) == 0x7E00).all()


def test_float16_stochastic_is_a_neighbour():
    param, grad, lr, value = float16_case(5)
    got = float16_update(param, grad, lr, stochastic_rounding=True, rounding_seed=11).to(torch.float32).numpy()
    v = value.numpy()
    nan = np.isnan(v)
    assert (np.isnan(got) == nan).all()
    beyond = ~nan & (np.abs(v) >= FP16_MAX)  # at or beyond the largest finite: as to nearest
    with np.errstate(over="ignore"):  # numpy's cast to float16 rounds to nearest even, to inf beyond
        assert (got[beyond] == v[beyond].astype(np.float16).astype(np.float32)).all()
    inside = ~nan & ~beyond
    nearest = v[inside].astype(np.float16)
    exact = nearest.astype(np.float32) == v[inside]
    toward = np.where(nearest.astype(np.float32) > v[inside], -np.inf, np.inf).astype(np.float16)
    other = np.nextafter(nearest, toward)
    g = got[inside]
    assert (g[exact] == v[inside][exact]).all()
    assert ((g == nearest.astype(np.float32)) | (g == other.astype(np.float32)))[~exact].all()
    # signs kept, -0 included, where the value is not zero
    assert (np.signbit(g) == np.signbit(v[inside]))[v[inside] != 0].all()
    subnormal = ~exact & (np.abs(v[inside]) < 2.0**-14)
    assert subnormal.sum() > 100  # the subnormal candidate is exercised
    assert 0 < (g != nearest.astype(np.float32))[~exact].mean() < 1


@pytest.mark.parametrize("master_weights", [True, "remainder"])
def test_bf16_parameter_of_a_master_rounds_ties_away(master_weights):
    """Masters set to exact ties (and random values), then a step with lr 0, which leaves every
    master as it is: each bf16 parameter is its master rounded to nearest, ties away from zero."""
    gen = torch.Generator().manual_seed(6)
    n = 4096
    top = torch.randint(0, 0x7F7F, (n,), generator=gen, dtype=torch.int64)  # finite magnitudes
    sign = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64) << 31
    low = torch.where(torch.arange(n) % 2 == 0, torch.full((n,), 0x8000, dtype=torch.int64),
                      torch.randint(0, 0x10000, (n,), generator=gen, dtype=torch.int64))
    master_bits = (sign | (top << 16) | low).to(torch.int32)  # int64 to int32 wraps, as bits
    masters = master_bits.view(torch.float32)
    param = torch.nn.Parameter(masters.to(torch.bfloat16))
    opt = fusedlr.AdamW([param], lr=1e-3, master_weights=master_weights)
    param.grad = torch.zeros_like(param)
    opt.step()  # makes the state
    m = bits32(masters)
    rounded = ((m + 0x8000) & 0xFFFFFFFF) >> 16  # the magnitude's low half carried: ties away
    if master_weights is True:
        opt.state[param]["master_weight"].copy_(masters)
    else:  # the master as the parameter (its rounding) and the remainder (its low half)
        param.data.copy_(torch.from_numpy(rounded.astype(np.uint16).view(np.int16)).view(torch.bfloat16))
        opt.state[param]["master_remainder"].copy_(torch.from_numpy((m & 0xFFFF).astype(np.uint16).view(np.int16)))
    opt.param_groups[0]["lr"] = 0.0
    opt.step()
    assert (bits16(param) == rounded).all(), np.flatnonzero(bits16(param) != rounded)[:10]
    if master_weights is True:
        assert (bits32(opt.state[param]["master_weight"]) == m).all()
    else:
        assert (bits16(opt.state[param]["master_remainder"]) == (m & 0xFFFF)).all()
