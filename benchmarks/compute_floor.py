"""The compute floor of each storage mode of a bfloat16 model's AdamW step: the time per element of
a step whose tensors fit in the caches (no memory traffic to wait for), scaled to a model's size.
A step that moves fewer bytes can go no faster than this, whatever the memory does.

    python benchmarks/compute_floor.py [--elements 262144] [--model 124.44e6] [--rounds 5]

The time per element is the difference of two step sizes over their difference in elements (the
step's fixed cost cancels), the best of `--rounds` runs of 400 steps each, on all of torch's threads.
Both sizes must run on all the threads: a step under 32,768 elements runs on the calling thread
alone (csrc/cpu/fused_step_cpu.cpp, kSerialBelow), so the smaller size, an eighth of the larger,
must be at least that.
"""

from __future__ import annotations

import argparse
import time

import torch

import fusedlr

SERIAL_BELOW = 1 << 15  # csrc/cpu/fused_step_cpu.cpp, kSerialBelow: smaller steps run on one thread

MODES = {
    "fp32 state": {},
    "fp32 masters": dict(master_weights=True),
    "remainders": dict(master_weights="remainder"),
    "remainders + bf16 state": dict(master_weights="remainder", state_dtype=torch.bfloat16),
    "stochastic + bf16 state": dict(stochastic_rounding=True, state_dtype=torch.bfloat16),
}


def seconds_per_step(elements: int, options: dict, rounds: int, steps: int = 400) -> float:
    gen = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter((torch.randn(elements, generator=gen) * 0.02).to(torch.bfloat16))
    param.grad = (torch.randn(elements, generator=gen) * 1e-3).to(torch.bfloat16)
    opt = fusedlr.AdamW([param], lr=1e-3, weight_decay=0.01, **options)
    for _ in range(20):
        opt.step()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            opt.step()
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=1 << 18, help="the larger step's elements (in cache)")
    parser.add_argument("--model", type=float, default=124.44e6, help="parameters to scale to (GPT-2 small)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    small = args.elements // 8
    if small < SERIAL_BELOW:
        parser.error(f"--elements must be at least {8 * SERIAL_BELOW}: the smaller step, an eighth of it, "
                     f"would run on one thread (under {SERIAL_BELOW} elements) and the difference would mean nothing")
    print(f"AdamW on bfloat16 parameters, {torch.get_num_threads()} threads, {fusedlr.cpu_isa()} loops; "
          f"{small} and {args.elements} elements")
    print(f"{'storage':26s} {'ns / element':>12s} {'ms for the model':>17s}")
    for name, options in MODES.items():
        large_s = seconds_per_step(args.elements, options, args.rounds)
        small_s = seconds_per_step(small, options, args.rounds)
        per_element = (large_s - small_s) / (args.elements - small)
        print(f"{name:26s} {per_element * 1e9:12.3f} {per_element * args.model * 1e3:17.1f}")


if __name__ == "__main__":
    main()
