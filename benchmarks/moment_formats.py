"""How AdamW fares with its moments kept in fewer bits: a study for the choice of an 8-bit state
format (issue 14's memory goal), in float64-free plain torch, not fusedlr's kernels.

Each format is simulated by rounding exp_avg and exp_avg_sq through it after every update (what a
kernel that stores them so would read back at the next step); the update itself is float32 AdamW,
as fusedlr computes it. Two problems, each over 1,000 steps from the same seed and data:
  - regression: 1,024 weights of a noisy linear least-squares problem (4,096 rows, full batch);
  - mlp: a 2-layer MLP (about 70K weights) fit to a random teacher on mini-batches.
For each format it prints the bytes per parameter the two moments take, the final loss as a ratio
of the float32-state run's, the largest relative gap of the loss curve to that run's, and the
relative distance of the final weights from it. Run: python benchmarks/moment_formats.py [--steps N]
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Callable

import torch

Round = Callable[[torch.Tensor, bool, torch.Generator], torch.Tensor]  # (values, signed, gen) -> stored


def _blocks(x: torch.Tensor, size: int) -> tuple[torch.Tensor, int]:
    flat = x.reshape(-1)
    pad = (-flat.numel()) % size
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, size), pad


def _unblock(blocks: torch.Tensor, pad: int, like: torch.Tensor) -> torch.Tensor:
    flat = blocks.reshape(-1)
    return (flat[:flat.numel() - pad] if pad else flat).view_as(like)


def float32(x, signed, gen):
    return x


def bfloat16(x, signed, gen):
    return x.to(torch.bfloat16).float()


def linear8(block: int, stochastic: bool) -> Round:
    """Codes of 8 bits spaced evenly up to the block's absolute maximum (a float32 scale per block)."""
    def round_(x, signed, gen):
        b, pad = _blocks(x, block)
        top = b.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        levels = 127.0 if signed else 255.0
        scaled = b / top * levels
        if stochastic:
            codes = torch.floor(scaled + torch.rand(scaled.shape, generator=gen))
        else:
            codes = torch.round(scaled)
        return _unblock(codes / levels * top, pad, x)
    return round_


def e4m3(block: int, power_of_two: bool, sqrt_v: bool = False) -> Round:
    """float8 e4m3 codes of the values scaled per block: by a float32 factor that maps the block's
    absolute maximum to 448 (the largest e4m3), or by a power of two (a shared exponent, as OCP's MX
    formats scale). With sqrt_v, exp_avg_sq is kept as its square root (half the dynamic range)."""
    def round_(x, signed, gen):
        value = x.sqrt() if (sqrt_v and not signed) else x
        b, pad = _blocks(value, block)
        top = b.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        if power_of_two:
            scale = torch.exp2(torch.floor(torch.log2(top)) - 8)  # top / scale in [256, 512)
        else:
            scale = top / 448.0
        codes = (b / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float()
        out = _unblock(codes * scale, pad, value)
        return out.square() if (sqrt_v and not signed) else out
    return round_


def dynamic8(block: int) -> Round:
    """Codes of 8 bits on a map dense near zero (a float32 scale per block), as bitsandbytes' dynamic
    quantization spaces them: a sign (for exp_avg), then decades 10^-k, k = 6 .. 0, each holding
    2^(1+j) evenly spaced values, j growing toward 1 (for exp_avg_sq the sign bit is a fraction bit);
    values round to the nearest code."""
    def code_map(signed: bool) -> torch.Tensor:
        bits = 7 if signed else 8
        values = [0.0]
        for j in range(7):  # decade 10^-(6-j), 2^(j + bits - 7) codes in it
            count = 2 ** (j + bits - 7)
            edges = torch.linspace(0.1, 1.0, count + 1, dtype=torch.float64)
            values += (10.0 ** -(6 - j) * (edges[:-1] + edges[1:]) / 2).tolist()
        values.append(1.0)
        magnitudes = torch.tensor(sorted(set(values)), dtype=torch.float64)
        codes = torch.cat([-magnitudes.flip(0)[:-1], magnitudes]) if signed else magnitudes
        return codes.float()

    maps = {True: code_map(True), False: code_map(False)}

    def round_(x, signed, gen):
        codes = maps[signed]
        b, pad = _blocks(x, block)
        top = b.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        scaled = (b / top).clamp(-1.0, 1.0)
        upper = torch.searchsorted(codes, scaled.contiguous()).clamp(1, codes.numel() - 1)
        below, above = codes[upper - 1], codes[upper]
        nearest = torch.where(scaled - below <= above - scaled, below, above)
        return _unblock(nearest * top, pad, x)
    return round_


def mx_codec(stochastic: bool) -> Round:
    """fusedlr's own 8-bit state codec ([note: 8-bit state], csrc/storage_math.h): e4m3 with a
    power-of-two scale per block of 32, rounded to nearest or stochastically (20 random bits)."""
    from fusedlr import _C

    def round_(x, signed, gen):
        flat = x.detach().reshape(-1).float().contiguous()
        bits = torch.randint(-2 ** 31, 2 ** 31, flat.shape, generator=gen, dtype=torch.int64).to(torch.int32) \
            if stochastic else None
        return _C.mx_decode(_C.mx_encode(flat, bits), flat.numel()).view_as(x)
    return round_


@dataclass
class Format:
    name: str
    round: Round
    bytes_per_param: float  # both moments, scales included


FORMATS = [
    Format("float32", float32, 8.0),
    Format("bfloat16", bfloat16, 4.0),
    Format("linear8, blocks of 256", linear8(256, False), 2 + 8 / 256),
    Format("linear8, blocks of 256, stochastic", linear8(256, True), 2 + 8 / 256),
    Format("linear8, blocks of 32", linear8(32, False), 2 + 8 / 32),
    Format("dynamic8, blocks of 256", dynamic8(256), 2 + 8 / 256),
    Format("e4m3, float32 scale per 256", e4m3(256, False), 2 + 8 / 256),
    Format("e4m3, float32 scale per 256, sqrt(v)", e4m3(256, False, sqrt_v=True), 2 + 8 / 256),
    Format("e4m3, power-of-two scale per 32 (MX)", e4m3(32, True), 2 + 2 / 32),
    Format("e4m3, power-of-two scale per 32, sqrt(v)", e4m3(32, True, sqrt_v=True), 2 + 2 / 32),
    Format("fusedlr MX codec, nearest", mx_codec(False), 2 + 2 / 32),
    Format("fusedlr MX codec, stochastic", mx_codec(True), 2 + 2 / 32),
]


def adamw_run(params: list[torch.Tensor], loss_of: Callable[[int], torch.Tensor], fmt: Format, steps: int,
              lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01) -> list[float]:
    gen = torch.Generator().manual_seed(7)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    losses = []
    for t in range(1, steps + 1):
        for p in params:
            p.grad = None
        loss = loss_of(t)
        loss.backward()
        losses.append(loss.item())
        with torch.no_grad():
            for p, mi, vi in zip(params, m, v):
                g = p.grad
                p.mul_(1 - lr * weight_decay)
                m_new = mi * betas[0] + (1 - betas[0]) * g
                v_new = vi * betas[1] + (1 - betas[1]) * g * g
                m_hat = m_new / (1 - betas[0] ** t)
                v_hat = v_new / (1 - betas[1] ** t)
                p.sub_(lr * m_hat / (v_hat.sqrt() + eps))
                mi.copy_(fmt.round(m_new, True, gen))
                vi.copy_(fmt.round(v_new, False, gen))
    return losses


def regression(steps: int, fmt: Format):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 1024, generator=gen) / 32
    w_true = torch.randn(1024, generator=gen)
    y = x @ w_true + 0.1 * torch.randn(4096, generator=gen)  # a loss floor of about 0.01
    w = torch.zeros(1024, requires_grad=True)
    losses = adamw_run([w], lambda t: ((x @ w - y) ** 2).mean(), fmt, steps, lr=1e-2)
    return losses, [w.detach()]


def mlp(steps: int, fmt: Format):
    gen = torch.Generator().manual_seed(1)
    teacher = [torch.randn(64, 256, generator=gen) / 8, torch.randn(256, 16, generator=gen) / 16]
    inputs = torch.randn(steps, 64, 64, generator=gen)
    targets = [torch.tanh(b @ teacher[0]) @ teacher[1] for b in inputs]
    w1 = (torch.randn(64, 512, generator=gen) / 8).requires_grad_()
    w2 = (torch.randn(512, 16, generator=gen) / 22).requires_grad_()
    b1 = torch.zeros(512, requires_grad=True)

    def loss_of(t):
        batch = inputs[t - 1]
        return ((torch.relu(batch @ w1 + b1) @ w2 - targets[t - 1]) ** 2).mean()

    losses = adamw_run([w1, b1, w2], loss_of, fmt, steps, lr=3e-3)
    return losses, [w1.detach(), b1.detach(), w2.detach()]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--only", default="", help="run the formats whose name holds this text (and float32)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for problem in (regression, mlp):
        reference_losses, reference_weights = problem(args.steps, FORMATS[0])
        ref_norm = math.sqrt(sum(float(w.square().sum()) for w in reference_weights))
        # the curve's gap, over the mean loss of a window of 20 steps (mini-batch noise averaged out)
        window = 20
        smooth = lambda c: torch.tensor(c).unfold(0, window, window).mean(1)  # noqa: E731
        ref_curve = smooth(reference_losses)
        print(f"\n{problem.__name__}: {args.steps} steps, float32-state final loss {reference_losses[-1]:.4g}")
        print(f"{'format':<44} {'B/param':>7} {'final loss':>10} {'max curve gap':>13} {'weights off':>11}")
        for fmt in FORMATS:
            if args.only not in fmt.name and fmt is not FORMATS[0]:
                continue
            losses, weights = problem(args.steps, fmt)
            curve = smooth(losses)
            gap = float(((curve - ref_curve).abs() / ref_curve).max())
            off = math.sqrt(sum(float((w - r).square().sum()) for w, r in zip(weights, reference_weights))) / ref_norm
            final = sum(losses[-window:]) / sum(reference_losses[-window:])
            print(f"{fmt.name:<44} {fmt.bytes_per_param:>7.3f} {final:>9.3f}x {gap:>12.1%} {off:>10.2%}")


if __name__ == "__main__":
    main()
