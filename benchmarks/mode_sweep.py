"""The time per element of every CPU update path: each optimizer under every storage mode of each
parameter dtype (the modes tests/isa_steps.py steps), slowest first. A path whose loop the
compiler left scalar stands out at several times the others' time, as float16 stochastic rounding
and SGD with momentum in low precision once did.

    python benchmarks/mode_sweep.py [--elements 262144] [--steps 30] [--top 0]

Each path steps one tensor of `--elements` elements; the median of `--steps` steps, after three
untimed ones, on all of torch's threads.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import torch

import fusedlr

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
import isa_steps  # noqa: E402  (the storage modes of each dtype)

OPTIMIZERS = {
    "sgd": lambda params, options: fusedlr.SGD(params, lr=1e-3, momentum=0.9, **options),
    "adamw": lambda params, options: fusedlr.AdamW(params, lr=1e-3, **options),
    "lion": lambda params, options: fusedlr.Lion(params, lr=1e-4, **options),
}


def seconds_per_element(dtype: torch.dtype, options: dict, make, elements: int, steps: int) -> float:
    gen = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.randn(elements, generator=gen).to(dtype))
    param.grad = (torch.randn(elements, generator=gen) * 1e-3).to(dtype)
    opt = make([param], options)
    for _ in range(3):
        opt.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / elements


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=1 << 18)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--top", type=int, default=0, help="print only the slowest N paths (0: all)")
    args = parser.parse_args()
    if args.elements < 1 or args.steps < 1:
        parser.error("--elements and --steps must be at least 1")
    rows = []
    for dtype in isa_steps.DTYPES:
        for storage in isa_steps.storages(dtype):
            options = {k: v for k, v in storage.items() if k != "rounding_seed"}
            label = ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"
            for name, make in OPTIMIZERS.items():
                per_element = seconds_per_element(dtype, options, make, args.elements, args.steps)
                rows.append((per_element, f"{name} {str(dtype).replace('torch.', '')} {label}"))
    rows.sort(reverse=True)
    median = statistics.median(t for t, _ in rows)
    print(f"{len(rows)} paths, {args.elements} elements, {torch.get_num_threads()} threads, "
          f"{fusedlr.cpu_isa()} loops; median {median * 1e9:.3f} ns per element")
    print(f"{'ns / element':>12s} {'x median':>9s}  path")
    for per_element, label in rows[: args.top or len(rows)]:
        print(f"{per_element * 1e9:12.3f} {per_element / median:9.2f}  {label}")


if __name__ == "__main__":
    main()
