"""The CPU loops' AVX-512, AVX2 and baseline versions (csrc/cpu/cpu_isa.h, [note: instruction
sets]) give bitwise the same steps: every optimizer, dtype, storage mode and option, tails, chunked
tensors and misaligned views, and special values (NaN, infinities, subnormals, the largest finite
values, ties) under every storage mode, each version forced by FUSEDLR_CPU_ISA in a process of its
own. So a machine of another CPU computes what CI computed, NaN payloads aside.

tests/isa_steps.py runs the steps and saves what they leave; this file compares the versions."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

import fusedlr
import isa_steps
from fusedlr import _C

HERE = pathlib.Path(__file__).parent
SUPPORTED = _C.cpu_isas_supported().split(", ")


def run(isa: str | None, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("FUSEDLR_CPU_ISA", None)
    if isa is not None:
        env["FUSEDLR_CPU_ISA"] = isa
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


def bits(t: torch.Tensor) -> torch.Tensor:
    flat = torch.empty(t.numel(), dtype=t.dtype)
    flat.copy_(t.reshape(-1))
    return flat.view(torch.uint8)


def test_every_version_steps_bitwise_alike(tmp_path):
    if len(SUPPORTED) < 2:
        pytest.skip(f"this CPU runs only {SUPPORTED}")
    results = {}
    for isa in SUPPORTED:
        out = tmp_path / f"{isa}.pt"
        done = run(isa, str(HERE / "isa_steps.py"), str(out))
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip() == f"ran {isa}"
        results[isa] = torch.load(out, weights_only=True)
    first, *others = SUPPORTED
    # every case ran and saved its tensors
    assert sum(name.endswith("/param/0") for name in results[first]) == len(list(isa_steps.cases()))
    assert sum("/special_param" in name for name in results[first]) == len(list(isa_steps.special_cases()))
    for isa in others:
        assert results[isa].keys() == results[first].keys()
        for name, value in results[first].items():
            other = results[isa][name]
            if "/special_" in name and value.is_floating_point():
                # NaN where the other has NaN; every other value's bits equal, signed zeros included
                nan = torch.isnan(value)
                assert torch.equal(nan, torch.isnan(other)), (isa, name)
                value, other = value[~nan], other[~nan]
            # equal bits, signed zeros included (and NaN payloads, where an ordinary case has a NaN)
            assert torch.equal(bits(value), bits(other)), (isa, name)


def test_the_chosen_version_is_the_best_unless_forced():
    assert fusedlr.cpu_isa() == os.environ.get("FUSEDLR_CPU_ISA", SUPPORTED[-1])
    for isa in SUPPORTED:
        done = run(isa, "-c", "import fusedlr; print(fusedlr.cpu_isa())", timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip() == isa


@pytest.mark.parametrize("value", ["avx3", "AVX2", "sse"] + [isa for isa in ("avx2", "avx512") if isa not in SUPPORTED])
def test_a_version_that_cannot_run_fails_the_import_clearly(value):
    done = run(value, "-c", "import fusedlr", timeout=120)
    assert done.returncode == 1  # an exception, not a crash
    assert f"FUSEDLR_CPU_ISA={value}" in done.stderr
    assert ("this CPU cannot run" if value in ("avx2", "avx512") else "is not a version") in done.stderr
