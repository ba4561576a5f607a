"""The cost of DTensor parameters: a fusedlr step over FSDP2's DTensor parameters against the same
step over their local shards as plain tensors (partition_group: the same one all-reduce for the
norm), clipping included.

    torchrun --nproc-per-node 2 benchmarks/fsdp_step.py            # gloo on the CPU, NCCL on GPUs

Prints, per model shape, the median step time of each and their ratio (DTensor / plain).
"""

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import fully_shard

import fusedlr
from fusedlr import schedules as S

SHAPES = {
    "8 x 2048x2048": [(2048, 2048)] * 8,          # 34M parameters in a few large tensors
    "400 x 64x64": [(64, 64)] * 400,              # 1.6M parameters in many small tensors
}


class Params(nn.Module):
    """A model of the given parameter shapes whose loss touches each parameter once, so that a
    backward leaves FSDP2's own gradients (reduce-scattered, in the parameter's spec)."""

    def __init__(self, shapes, device):
        super().__init__()
        self.params = nn.ParameterList([nn.Parameter(torch.randn(*shape, device=device)) for shape in shapes])

    def forward(self, weights: list[torch.Tensor]) -> torch.Tensor:
        return sum((p * w).sum() for p, w in zip(self.params, weights))


def timed(step, rounds: int, device) -> float:
    times = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", dist.get_rank() % torch.cuda.device_count()) if cuda else torch.device("cpu")
    rank = dist.get_rank()
    for name, shapes in SHAPES.items():
        torch.manual_seed(0)
        model = Params(shapes, device)
        fully_shard(model)
        model([torch.randn(*shape, device=device) for shape in shapes]).backward()
        sharded = list(model.parameters())
        plain = [nn.Parameter(p.to_local().detach().clone()) for p in sharded]
        schedule = S.OneCycleLR(max_lr=1e-3, total_steps=10_000)
        opts = {
            "DTensor": fusedlr.AdamW(sharded, lr=1e-3, schedule=schedule, max_grad_norm=args.max_grad_norm),
            "plain shards": fusedlr.AdamW(plain, lr=1e-3, schedule=schedule, max_grad_norm=args.max_grad_norm,
                                          partition_group=dist.group.WORLD),
        }
        for p, q in zip(sharded, plain):
            q.grad = p.grad.to_local().clone()
        for opt in opts.values():
            opt.step()  # state created
        results = {}
        for _ in range(3):  # the contenders take turns
            for label, opt in opts.items():
                results.setdefault(label, []).append(timed(opt.step, args.rounds // 3, device))
        medians = {label: statistics.median(values) for label, values in results.items()}
        if rank == 0:
            ratio = medians["DTensor"] / medians["plain shards"]
            print(f"{name:>16}: DTensor {medians['DTensor'] * 1e3:8.3f} ms   plain shards "
                  f"{medians['plain shards'] * 1e3:8.3f} ms   ratio {ratio:.3f}x")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
