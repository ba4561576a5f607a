"""The cost of changing a group's lr (and weight decay) before every step, as a framework's
scheduler does on a group without a fusedlr schedule, against steps that change nothing.

    python benchmarks/hyper_edit.py [--presets 20x256 2000x1k resnet50] [--steps 50] [--rounds 7]

Both kinds of step take turns round after round; the report is the median time per step of each
and their ratio (README: a changed setting reaches the step without a rebuild of its lists).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fusedlr
from fusedlr.bench import PRESETS


def time_steps(opt, params, steps: int, edit: bool) -> float:
    group = opt.param_groups[0]
    start = time.perf_counter()
    for k in range(steps):
        if edit:
            group["lr"] = 1e-3 * (1 + (k % 7) / 7)
            group["weight_decay"] = 0.01 * (1 + k % 3)
        opt.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["20x256", "2000x1k", "resnet50"], choices=list(PRESETS))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print(f"{'preset':>10} {'unchanged':>12} {'lr + wd set':>12} {'ratio':>7}")
    for preset in args.presets:
        params = [torch.nn.Parameter(torch.randn(shape)) for shape in PRESETS[preset]()]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = fusedlr.AdamW(params, lr=1e-3, weight_decay=0.01)
        opt.step()
        plan = opt._lists.plan
        times = {False: [], True: []}
        for _ in range(args.rounds):
            for edit in (False, True):
                times[edit].append(time_steps(opt, params, args.steps, edit))
        assert opt._lists.plan is plan, "a setting's change rebuilt the step's lists"
        same, edited = statistics.median(times[False]), statistics.median(times[True])
        print(f"{preset:>10} {same * 1e6:>10.1f}us {edited * 1e6:>10.1f}us {edited / same:>6.2f}x")


if __name__ == "__main__":
    main()
