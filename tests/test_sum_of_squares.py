"""fusedlr.sum_of_squares, the local part of a sharded model's gradient norm: against float64 sums,
independent of the thread count, opcheck, bad input."""

import subprocess
import sys

import pytest
import torch

from fusedlr import _ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tensors(device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sizes = [0, 1, 7, 8, 9, 4097, 32768, 32769, 100_003]  # empty, tails, around the chunk size
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    out = [(torch.randn(n, generator=gen) * 3).to(dtypes[i % 4]).to(device) for i, n in enumerate(sizes)]
    out.append(torch.randn(40, 70, generator=gen).t().to(device))  # not contiguous
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_matches_the_float64_sum(device):
    ts = tensors(device)
    want = sum(float(t.double().square().sum()) for t in ts)
    got = _ops.sum_of_squares(ts)
    assert got.dtype == torch.float64 and got.shape == () and got.device.type == device
    # a few hundred thousand float64 additions in another order: some 1e-16 relative each
    assert float(got) == pytest.approx(want, rel=1e-12)
    one = _ops.sum_of_squares([ts[5]])
    assert float(one) == pytest.approx(float(ts[5].double().square().sum()), rel=1e-12)


def test_result_does_not_depend_on_the_thread_count():
    code = ("import torch, fusedlr; from fusedlr import _ops; import sys\n"
            "torch.set_num_threads(int(sys.argv[1])); g = torch.Generator().manual_seed(1)\n"
            "ts = [torch.randn(n, generator=g) for n in (3, 70_000, 300_001, 5)]\n"
            "print(repr(float(_ops.sum_of_squares(ts))))")
    results = {subprocess.run([sys.executable, "-c", code, str(n)], capture_output=True, text=True,
                              check=True, timeout=120).stdout for n in (1, 2, 3)}
    assert len(results) == 1, results


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    torch.library.opcheck(torch.ops.fusedlr.sum_of_squares.default, (tensors(device)[2:6],))


def test_bad_input_raises():
    with pytest.raises(RuntimeError, match="at least one tensor"):
        _ops.sum_of_squares([])
    with pytest.raises(RuntimeError, match="is Long"):
        _ops.sum_of_squares([torch.ones(3), torch.ones(3, dtype=torch.int64)])
    with pytest.raises(RuntimeError, match="sparse"):
        _ops.sum_of_squares([torch.ones(3).to_sparse()])
    with pytest.raises(RuntimeError, match="is on meta"):
        _ops.sum_of_squares([torch.ones(3), torch.ones(3, device="meta")])
