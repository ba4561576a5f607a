"""The command line: the benchmark end to end at a tiny size, its floor arithmetic, and plots."""

import builtins
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch

from fusedlr import bench

CLI = [sys.executable, "-m", "fusedlr"]


def run_bench(tmp_path, *args):
    """`python -m fusedlr bench ARGS --json ... --quiet`: its output and its JSON report."""
    out = tmp_path / "bench.json"
    result = subprocess.run(CLI + ["bench", *args, "--json", str(out), "--quiet"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout, json.loads(out.read_text())


def test_bench_runs_end_to_end_and_writes_json(tmp_path):
    stdout, report = run_bench(tmp_path, "--preset", "20x256", "--preset", "2000x1k", "--steps", "3",
                               "--schedule", "warmup-cosine", "--no-compiled")
    assert "torch fused" in stdout and "fusedlr" in stdout
    assert report["machine"]["torch"] == torch.__version__
    bandwidths = report["bandwidth_bytes_per_s"]
    assert set(bandwidths) == {"copy", "in_place", "scale", "read"} and min(bandwidths.values()) > 0
    assert report["floor_bandwidth_bytes_per_s"] == max(bandwidths["copy"], bandwidths["in_place"], bandwidths["scale"])
    presets = {p["preset"]: p for p in report["presets"]}
    assert set(presets) == {"20x256", "2000x1k"}
    small = presets["2000x1k"]
    assert small["tensors"] == 2000 and small["params"] == 2000 * 1024
    assert small["bytes_per_step"] == 28 * small["params"]
    assert small["floor_s"] == pytest.approx(small["bytes_per_step"] / report["floor_bandwidth_bytes_per_s"])
    names = [r["contender"] for r in small["results"]]
    assert names[:3] == ["torch for-loop", "torch foreach", "torch fused"] and names[-1] == "fusedlr"
    for r in small["results"]:
        assert len(r["samples_s"]) == 3 and all(s > 0 for s in r["samples_s"])
        assert r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["pct_of_floor"] == pytest.approx(100 * small["floor_s"] / r["median_s"])
        assert r["achieved_gb_s"] == pytest.approx(small["bytes_per_step"] / r["median_s"] / 1e9)
    fused = next(r for r in small["results"] if r["contender"] == "torch fused")
    assert fused["speedup_vs_torch_fused"] == 1.0


def test_bench_times_torch_compiled_apart_from_its_compile(tmp_path):
    stdout, report = run_bench(tmp_path, "--preset", "20x256", "--steps", "2", "--optimizer", "sgd",
                               "--schedule", "step")
    results = {r["contender"]: r for r in report["presets"][0]["results"]}
    compiled = results["torch compiled, tensor lr"]
    assert compiled["compile_s"] > 0 and len(compiled["samples_s"]) == 2
    assert all("compile_s" not in r for name, r in results.items() if name != "torch compiled, tensor lr")
    assert "which compile, took" in stdout


def test_bench_with_clipping(tmp_path):
    stdout, report = run_bench(tmp_path, "--preset", "20x256", "--steps", "3", "--optimizer", "sgd",
                               "--max-grad-norm", "0.5", "--no-compiled")
    assert report["max_grad_norm"] == 0.5
    preset = report["presets"][0]
    median = {r["contender"]: r["median_s"] for r in preset["results"]}
    assert list(median)[-2:] == ["fusedlr, no clipping", "fusedlr"]
    assert preset["clipping_cost"] == pytest.approx(median["fusedlr"] / median["fusedlr, no clipping"])
    read_s = preset["params"] * 4 / report["bandwidth_bytes_per_s"]["read"]
    assert preset["clipping_floor"] == pytest.approx(1 + read_s / preset["floor_s"])
    assert "fusedlr with clipping takes" in stdout


def test_deepspeed_import_leaves_torch_cuda_check_as_it_was(monkeypatch):
    """deepspeed's import sets PYTORCH_NVML_BASED_CUDA_CHECK, which slows torch's own contenders;
    the bench puts it back, and DS_ACCELERATOR, which it sets for the import. A stand-in module plays deepspeed, as the real one may not be installed."""
    class Imported:
        pass

    real_import = builtins.__import__

    def setting_import(name, *args, **kwargs):
        if name == "deepspeed.ops.adam":
            os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
            return types.SimpleNamespace(DeepSpeedCPUAdam=Imported)
        return real_import(name, *args, **kwargs)

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    for before in (None, "0"):
        if before is None:
            monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK", raising=False)
        else:
            monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", before)
        with monkeypatch.context() as m:
            m.setattr(builtins, "__import__", setting_import)
            assert bench.import_deepspeed_cpu_adam() is Imported
        assert os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == before
        assert "DS_ACCELERATOR" not in os.environ  # set for the import only


def test_bytes_per_param():
    assert bench.bytes_per_param("adamw", torch.float32, momentum=True) == 28
    assert bench.bytes_per_param("adam", torch.float32, momentum=True) == 28
    # read p, g, buf; write p, buf (design.md says 16, which leaves out one of the buffer's two trips)
    assert bench.bytes_per_param("sgd", torch.float32, momentum=True) == 20
    assert bench.bytes_per_param("sgd", torch.float32, momentum=False) == 12
    assert bench.bytes_per_param("adamw", torch.bfloat16, momentum=True) == 3 * 2 + 4 * 4
    assert bench.bytes_per_param("adamw", torch.float64, momentum=True) == 56


def test_presets_have_the_sizes_they_claim():
    count = lambda shapes: sum(math.prod(s) for s in shapes)  # noqa: E731
    assert count(bench.gpt2_small()) == pytest.approx(124.4e6, rel=1e-3)
    assert count(bench.resnet50()) == pytest.approx(25.56e6, rel=1e-3)
    assert len(bench.resnet50()) == 161
    assert count(bench.llama_1b()) == pytest.approx(1.236e9, rel=1e-2)


@pytest.mark.parametrize("args", [
    ["OneCycleLR", "--max_lr", "0.1", "--total_steps", "300", "--torch"],
    ["CosineAnnealingWarmRestarts", "--T_0", "50", "--T_mult", "2"],
    ["Cycles", "--t_initial", "60", "--cycle_mul", "1.5", "--cycle_limit", "4", "--shape", "tanh", "--torch"],
])
def test_plot_writes_a_png(tmp_path, args):
    pytest.importorskip("matplotlib")
    out = tmp_path / "lr.png"
    result = subprocess.run(CLI + ["plot", *args, "--steps", "300", "-o", str(out)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plot_refuses_bad_arguments(tmp_path):
    result = subprocess.run(CLI + ["plot", "StepLR", "--step_size", "0", "-o", str(tmp_path / "x.png")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "step_size" in result.stderr
    result = subprocess.run(CLI + ["plot", "Warmup", "--warmup_steps", "5", "-o", str(tmp_path / "x.png")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "takes schedules" in result.stderr
