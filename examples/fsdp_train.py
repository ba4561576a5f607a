"""A small transformer language model trained with FSDP2 and fusedlr.AdamW: gradient clipping,
warmup then cosine decay, a torch.distributed.checkpoint checkpoint, and resume.

    torchrun --nproc-per-node 2 examples/fsdp_train.py --steps 200 --checkpoint-dir /tmp/fsdp-ckpt

gloo on the CPU, NCCL on GPUs. Run it again with the same --checkpoint-dir and it resumes where the
last checkpoint left off: the same parameters, optimizer state, schedule position and lr.
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

import fusedlr
from fusedlr import schedules as S


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 256, width: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers))
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens):
        causal = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, src_mask=causal, is_causal=True)
        return self.head(x)


def batch(step: int, rank: int, device, vocab: int = 256, size: int = 8, length: int = 32):
    """Random token sequences, different on each rank (each rank is a data-parallel replica)."""
    g = torch.Generator().manual_seed(10_000 * rank + step)
    tokens = torch.randint(vocab, (size, length + 1), generator=g).to(device)
    return tokens[:, :-1], tokens[:, 1:]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial weights on every rank, then sharded
    model = TinyLM().to(device)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)

    schedule = S.SequentialLR([S.LinearLR(start_factor=0.01, total_iters=args.warmup),
                               S.CosineAnnealingLR(T_max=args.steps - args.warmup, eta_min=args.lr / 10)],
                              milestones=[args.warmup])
    opt = fusedlr.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, schedule=schedule,
                        max_grad_norm=1.0)

    start = 0
    checkpoint = args.checkpoint_dir and os.path.join(args.checkpoint_dir, "latest")
    if checkpoint and os.path.exists(os.path.join(checkpoint, ".metadata")):
        model_state, optim_state = get_state_dict(model, opt)
        state = {"model": model_state, "optim": optim_state, "step": torch.tensor(0)}
        dcp.load(state, checkpoint_id=checkpoint)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = int(state["step"])
        if rank == 0:
            print(f"resumed at step {start}, lr {float(opt.last_lr()[0]):.3e}")

    for step in range(start, args.steps):
        inputs, targets = batch(step, rank, device)
        loss = nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()  # clipped by the global norm across ranks; the lr from the device step counter
        opt.zero_grad()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}  grad norm {float(opt.last_grad_norm()):.3f}  "
                  f"lr {float(opt.last_lr()[0]):.3e}")
        done = step + 1
        if checkpoint and (done % args.checkpoint_every == 0 or done == args.steps):
            model_state, optim_state = get_state_dict(model, opt)
            dcp.save({"model": model_state, "optim": optim_state, "step": torch.tensor(done)},
                     checkpoint_id=checkpoint)
            if rank == 0:
                print(f"saved step {done} to {checkpoint}")
    dist.barrier()  # no rank tears down while another's collectives are in flight
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Once FSDP2 has used a gloo group, torch (2.14) keeps the group's worker threads running past
    # destroy_process_group. One that lets go of a tensor while Python shuts down aborts the process
    # ("terminate called without an active exception") after the run has ended well. Everything
    # is saved and printed by now: leave without Python's shutdown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
