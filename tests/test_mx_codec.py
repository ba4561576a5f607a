"""The 8-bit state codec ([note: 8-bit state], csrc/storage_math.h): e4m3 codes with a power-of-two
scale per block of 32, against independent references: torch's own float8_e4m3fn conversions for
the codes and float64 arithmetic for the scales and the values."""

import math

import pytest
import torch

from fusedlr import _C

BLOCK = 32
LARGEST = 448.0  # e4m3fn's largest finite value


def sample(n: int, seed: int) -> torch.Tensor:
    """float32 values whose blocks span float32's exponents, with zero blocks, float32 subnormals,
    negative zeros, and NaNs and infinities here and there."""
    g = torch.Generator().manual_seed(seed)
    blocks = -(-n // BLOCK)
    exponents = torch.randint(-150, 128, (blocks,), generator=g).repeat_interleave(BLOCK)[:n]
    x = torch.randn(n, generator=g, dtype=torch.float64) * torch.exp2(exponents.double())
    x = x.clamp(-3e38, 3e38).float()
    spread = torch.rand(n, generator=g) < 0.2  # some values far below their block's largest
    x[spread] *= torch.exp2(-torch.randint(0, 30, (int(spread.sum()),), generator=g).float())
    if blocks > 2:
        x[BLOCK:2 * BLOCK] = 0.0
    special = torch.randint(0, n, (max(1, n // 97),), generator=g)
    x[special] = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 1e-45])[torch.arange(special.numel()) % 5]
    return x


def reference_scales(x: torch.Tensor) -> torch.Tensor:
    """Each block's scale byte: 127 + the exponent of its largest finite magnitude - 8, at least 1."""
    n = x.numel()
    padded = torch.zeros(-(-n // BLOCK) * BLOCK, dtype=torch.float64)
    padded[:n] = x.double()
    magnitude = torch.where(torch.isfinite(padded), padded.abs(), torch.zeros_like(padded))
    largest = magnitude.view(-1, BLOCK).amax(dim=1)
    exponent = torch.frexp(largest).exponent - 1  # largest = m * 2^exponent, m in [1, 2)
    byte = torch.where(largest > 0, exponent + 127 - 8, torch.ones_like(exponent))
    return byte.clamp(min=1).to(torch.uint8)


def reference_codes(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """torch's float8_e4m3fn rounding (to nearest even) of each value over its block's scale, the
    magnitude clamped at 448 first; NaN for a non-finite value, its sign kept."""
    scale = torch.exp2(scales.double() - 127).repeat_interleave(BLOCK)[:x.numel()]
    y = x.double() / scale
    y = torch.where(y.abs() > LARGEST, torch.copysign(torch.full_like(y, LARGEST), y), y)
    finite = torch.isfinite(x)
    codes = torch.where(finite, y, torch.zeros_like(y)).float().to(torch.float8_e4m3fn).view(torch.uint8)
    sign = (torch.signbit(x).to(torch.uint8) << 7)
    return torch.where(finite, codes, sign | 0x7F)


def reference_values(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    scale = torch.exp2(scales.double() - 127).repeat_interleave(BLOCK)[:codes.numel()]
    return (codes.view(torch.float8_e4m3fn).double() * scale).float()


@pytest.mark.parametrize("n,seed", [(1, 0), (31, 1), (32, 2), (33, 3), (1000, 4), (65536 + 17, 5)])
def test_codes_and_scales_are_the_references(n, seed):
    x = sample(n, seed)
    out = _C.mx_encode(x)
    assert out.dtype == torch.uint8 and out.shape == (n + -(-n // BLOCK),)
    codes, scales = out[:n], out[n:]
    assert torch.equal(scales, reference_scales(x))
    assert torch.equal(codes, reference_codes(x, scales))


@pytest.mark.parametrize("n,seed", [(33, 6), (5000, 7)])
def test_decoded_values_are_the_references(n, seed):
    x = sample(n, seed)
    out = _C.mx_encode(x)
    decoded = _C.mx_decode(out, n)
    expected = reference_values(out[:n], out[n:])
    assert torch.equal(torch.isnan(decoded), torch.isnan(expected))
    finite = ~torch.isnan(expected)
    assert torch.equal(decoded[finite], expected[finite])
    assert torch.equal(torch.signbit(decoded[finite]), torch.signbit(expected[finite]))  # negative zeros too


def test_every_code_decodes_as_torch_decodes_it():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    for scale in (1, 100, 127, 200, 246):
        packed = torch.cat([codes, torch.full((8,), scale, dtype=torch.uint8)])
        decoded = _C.mx_decode(packed, 256)
        expected = (codes.view(torch.float8_e4m3fn).double() * 2.0 ** (scale - 127)).float()
        nan = torch.isnan(expected)
        assert torch.equal(torch.isnan(decoded), nan) and int(nan.sum()) == 2  # 0x7f and 0xff
        assert torch.equal(decoded[~nan], expected[~nan])


@pytest.mark.parametrize("seed", range(3))
def test_decoded_state_encodes_to_the_same_bytes(seed):
    """Saved decoded (float32), state loads back bit for bit: the scale of a decoded block is its own."""
    x = sample(4099, seed)
    once = _C.mx_encode(x)
    twice = _C.mx_encode(_C.mx_decode(once, x.numel()))
    assert torch.equal(once, twice)


def test_the_rounding_error_is_within_half_a_step():
    """Each value is within half an e4m3 step of its decoded value: 2^-4 of it where e4m3 is normal
    (3 mantissa bits), 2^-10 of the scale below that; a magnitude clamped at 448 times the scale
    (at most 512 times it) is within 1/8 of it."""
    x = sample(20000, 11)
    x = x[torch.isfinite(x)]
    out = _C.mx_encode(x)
    n = x.numel()
    decoded = _C.mx_decode(out, n).double()
    scale = torch.exp2(out[n:].double() - 127).repeat_interleave(BLOCK)[:n]
    xd = x.double()
    clamped = xd.abs() > LARGEST * scale
    error = (decoded - xd).abs()
    bound = torch.maximum(xd.abs() * 2.0 ** -4, scale * 2.0 ** -10)
    assert bool((error[~clamped] <= bound[~clamped]).all())
    assert bool((decoded[clamped].abs() == LARGEST * scale[clamped]).all())
    assert bool((error[clamped] <= xd[clamped].abs() / 8).all())
    assert int(clamped.sum()) > 0 and int((~clamped).sum()) > n // 2  # both cases were seen


def test_stochastic_rounding_is_unbiased_over_every_draw():
    """Stochastic codes over all 2^20 values of the 20 random bits: the mean of the decoded values is
    the value itself for a normal e4m3 (the carry's probability is the dropped bits' fraction,
    exactly), and the value rounded down to 2^-20 of a step for a subnormal one. Exhaustive, so the
    test has no false failures. A block's first value (300) fixes its scale at 1."""
    g = torch.Generator().manual_seed(3)
    normal = torch.rand(15, generator=g, dtype=torch.float64) * 400 + 2.0 ** -6  # [2^-6, 400]
    subnormal = torch.rand(12, generator=g, dtype=torch.float64) * 2.0 ** -6
    edges = torch.tensor([0.0, -3.3, 447.9, 500.0])  # 500 is clamped at 448
    row = torch.cat([torch.tensor([300.0]), normal.float(), subnormal.float(), edges])
    assert row.numel() == BLOCK
    draws = 1 << 20
    values = row.repeat(draws)
    bits = torch.arange(draws, dtype=torch.int32).repeat_interleave(BLOCK)
    out = _C.mx_encode(values, bits)
    n = values.numel()
    assert bool((out[n:] == 127).all())
    decoded = _C.mx_decode(out, n).double().view(draws, BLOCK)
    mean = decoded.sum(dim=0) / draws  # exact: sums of few-bit values
    x = row.double()
    is_subnormal = x.abs() < 2.0 ** -6
    steps = x.abs() * 2.0 ** 9  # subnormal steps of 2^-9
    expected = torch.where(is_subnormal, torch.sign(x) * torch.floor(steps * 2.0 ** 20) / 2.0 ** 20 / 2.0 ** 9, x)
    expected[-1] = 448.0
    assert torch.equal(mean, expected)
    # each draw gives one of the two codes around the value
    for k in range(BLOCK):
        seen = torch.unique(decoded[:, k])
        assert seen.numel() <= 2 and float(seen.min()) <= min(float(x[k]), 448.0) <= float(seen.max()), k


def test_stochastic_rounding_keeps_nan_and_sign():
    x = torch.tensor([math.nan, math.inf, -math.inf, -1e-12, -0.0] + [1.0] * 27)
    out = _C.mx_encode(x, torch.full((32,), -1, dtype=torch.int32))
    assert out[:3].tolist() == [0x7F, 0x7F, 0xFF] and out[3] == 0x80 and out[4] == 0x80


@pytest.mark.parametrize("call,message", [
    (lambda: _C.mx_encode(torch.ones(4), torch.zeros(3, dtype=torch.int32)), "one value per element"),
    (lambda: _C.mx_encode(torch.ones(4), torch.zeros(4, dtype=torch.int64)), "one value per element"),
    (lambda: _C.mx_encode(torch.ones(4, dtype=torch.float64)), "float32 CPU tensor"),
    (lambda: _C.mx_decode(torch.zeros(5, dtype=torch.uint8), 3), "3 codes and their 1 block scales"),
    (lambda: _C.mx_decode(torch.zeros(4, dtype=torch.float32), 3), "uint8"),
    (lambda: _C.mx_decode(torch.zeros(4, dtype=torch.uint8), -1), "uint8"),
])
def test_bad_input_raises(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()
