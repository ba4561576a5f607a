"""Command line: `python -m fusedlr bench ...` and `python -m fusedlr plot SCHEDULE --arg value ... -o lr.png`."""

from __future__ import annotations

import argparse
import ast
import sys
import warnings

import torch

from . import bench
from . import schedules as S


def parse_schedule_args(extra: list[str]) -> dict:
    """`--T_max 100 --eta_min 1e-4` -> {"T_max": 100, "eta_min": 1e-4}; values are Python literals,
    anything else is a string."""
    kwargs = {}
    i = 0
    while i < len(extra):
        key = extra[i]
        if not key.startswith("--") or i + 1 >= len(extra):
            raise SystemExit(f"schedule arguments come as --name value pairs, got {' '.join(extra[i:])!r}")
        try:
            value = ast.literal_eval(extra[i + 1])
        except (ValueError, SyntaxError):
            value = extra[i + 1]
        kwargs[key[2:].replace("-", "_")] = value
        i += 2
    return kwargs


def plot(args, extra: list[str]) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cls = getattr(S, args.schedule, None)
    if not (isinstance(cls, type) and issubclass(cls, S.Schedule)) or args.schedule.startswith("_"):
        names = [n for n in S.__all__ if isinstance(getattr(S, n), type) and n not in ("Schedule",)]
        print(f"unknown schedule {args.schedule!r}; choose from {', '.join(names)}", file=sys.stderr)
        return 2
    if cls._SCHEDULE_FIELDS:
        print(f"{args.schedule} takes schedules: build it in Python and call .values()", file=sys.stderr)
        return 2
    try:
        schedule = cls(**parse_schedule_args(extra))
    except (TypeError, ValueError) as e:
        print(f"{args.schedule}: {e}", file=sys.stderr)
        return 2
    steps = args.steps
    lr, momentum = schedule.values(range(steps), base_lr=args.base_lr)
    cycled = schedule.cycles_momentum
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(steps), lr.tolist(), label="fusedlr lr", color="#dd8452", linewidth=2)
    if args.torch:
        param = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([param], lr=args.base_lr, momentum=0.9)
        sched = S.torch_scheduler(schedule, opt)
        unit = 1 if isinstance(schedule, S.OneCycleLR) else getattr(schedule, "steps_per_epoch", 1)
        torch_lr = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for t in range(steps):
                torch_lr.append(opt.param_groups[0]["lr"])
                if (t + 1) % unit == 0 and not (isinstance(schedule, S.OneCycleLR) and t + 1 >= schedule.n_steps):
                    opt.step()
                    if isinstance(schedule, S.ReduceLROnPlateau):
                        sched.step(1.0)
                    else:
                        sched.step()
        ax.plot(range(steps), torch_lr, label="torch scheduler lr", color="#4c72b0", linestyle="--", linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{args.schedule}({', '.join(extra[i][2:] + '=' + extra[i + 1] for i in range(0, len(extra), 2))})",
                 fontsize=9)
    if cycled:
        ax2 = ax.twinx()
        ax2.plot(range(steps), momentum.tolist(), label="momentum / beta1", color="#55a868", linewidth=1)
        ax2.set_ylabel("momentum / beta1")
        ax2.legend(loc="lower right", fontsize=8)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    plt.close(fig)
    print(f"wrote {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedlr")
    commands = parser.add_subparsers(dest="command", required=True)
    bench_parser = commands.add_parser("bench", help="optimizer step throughput against torch")
    bench.add_arguments(bench_parser)
    plot_parser = commands.add_parser("plot", help="plot a schedule's lr (and momentum) against the step",
                                      description="Extra --name value pairs are the schedule's arguments.")
    plot_parser.add_argument("schedule", help="a fusedlr.schedules name, e.g. OneCycleLR")
    plot_parser.add_argument("-o", "--output", default="lr.png")
    plot_parser.add_argument("--steps", type=int, default=1000, help="steps to plot")
    plot_parser.add_argument("--base-lr", type=float, default=0.1, help="the group lr relative schedules scale")
    plot_parser.add_argument("--torch", action="store_true", help="overlay the torch scheduler's values")
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return bench.main(args)
    return plot(args, extra)


if __name__ == "__main__":
    sys.exit(main())
