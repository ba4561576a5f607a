"""fusedlr under torch.distributed: DDP, FSDP2, tensor parallel (Shard(0), Shard(1), Replicate),
FSDP2 over TP on a 2x2 mesh, ZeRO, torch.distributed.checkpoint, each against torch.optim under the
same wrapper (tests/dist_cases.py). Ranks are processes on 127.0.0.1 with gloo; each case is
bounded in time, and only the processes a case started are ended."""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

HERE = pathlib.Path(__file__).parent
CASE_SECONDS = 150

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch without gloo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(case: str, world: int, folder: pathlib.Path) -> None:
    port = str(free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")  # a crash prints where each thread was
    logs = [open(folder / f"rank{r}.log", "w+") for r in range(world)]
    ranks = [subprocess.Popen([sys.executable, str(HERE / "dist_cases.py"), case, str(r), str(world), port,
                               str(folder)], stdout=logs[r], stderr=subprocess.STDOUT, env=env)
             for r in range(world)]
    deadline = time.monotonic() + CASE_SECONDS
    try:
        for rank in ranks:
            rank.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        hung = [rank for rank in ranks if rank.poll() is None]
        for rank in hung:
            rank.kill()
            rank.wait()
    output = []
    for r, log in enumerate(logs):
        log.seek(0)
        output.append(f"--- rank {r} (exit {ranks[r].returncode}) ---\n{log.read()[-4000:]}")
        log.close()
    assert not hung, f"{case}: ranks still running after {CASE_SECONDS}s, ended\n" + "\n".join(output)
    assert all(rank.returncode == 0 for rank in ranks), "\n".join(output)


@pytest.mark.parametrize("case, world", [
    ("ddp", 2), ("fsdp2", 2), ("tp", 2), ("fsdp_tp", 4), ("zero", 2), ("skip_agrees", 2), ("dcp", 2),
    ("state_init_step", 2), ("grad_placements", 2), ("grad_scaler", 2), ("settings_agree", 2), ("bad_tensors", 2),
    ("compile", 2),
])
def test_distributed(case, world, tmp_path):
    run_ranks(case, world, tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available() or not dist.is_nccl_available(), reason="needs a GPU and NCCL")
def test_nccl_one_rank_fsdp2(tmp_path):
    run_ranks("nccl", 1, tmp_path)


def test_fsdp_example_trains_saves_and_resumes(tmp_path):
    """examples/fsdp_train.py as the README runs it (torchrun, two ranks), then again from its checkpoint."""
    example = HERE.parent / "examples" / "fsdp_train.py"
    outputs = []
    for steps in (6, 9):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                   "127.0.0.1", "--master-port", str(free_port()), str(example), "--steps", str(steps), "--warmup",
                   "3", "--checkpoint-every", "3", "--checkpoint-dir", str(tmp_path)]
        # a session of its own: on a hang, torchrun and the ranks it started end together
        run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1"),
                               start_new_session=True)
        try:
            stdout, stderr = run.communicate(timeout=CASE_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            stdout, stderr = run.communicate()
            raise AssertionError(f"the example ran past {CASE_SECONDS}s, ended\n{stdout[-2000:]}{stderr[-2000:]}")
        assert run.returncode == 0, stdout[-3000:] + stderr[-3000:]
        outputs.append(stdout)
    assert "saved step 6" in outputs[0] and "resumed" not in outputs[0]
    assert "resumed at step 6" in outputs[1] and "step    8" in outputs[1] and "saved step 9" in outputs[1]
