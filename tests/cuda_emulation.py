"""The CUDA kernels built for the CPU (csrc/emulation/emulated_ops.cpp): `load()` compiles them once
per source change into build/cuda-emulation and returns torch.ops.fusedlr_emulated, fusedlr's ops
for CPU tensors run by the CUDA kernels and their host code."""

from __future__ import annotations

import os
import pathlib

import torch
import torch.utils.cpp_extension

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUILD_DIR = ROOT / "build" / "cuda-emulation"
# As the real kernels round: no contraction into fused multiply-adds (setup.py: -ffp-contract=off
# for the CPU, -fmad=false for nvcc).
CFLAGS = ["-O2", "-ffp-contract=off", "-fno-strict-aliasing", "-Wall", "-Werror=switch", "-Wno-unknown-pragmas"]


def load():
    if not hasattr(torch.ops, "fusedlr_emulated") or not hasattr(torch.ops.fusedlr_emulated, "adam_step_"):
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        torch.utils.cpp_extension.load(
            name="fusedlr_cuda_emulation",
            sources=[str(ROOT / "csrc" / "emulation" / "emulated_ops.cpp"), str(ROOT / "csrc" / "step_inputs.cpp")],
            extra_cflags=CFLAGS, extra_include_paths=[str(ROOT / "csrc")], build_directory=str(BUILD_DIR),
            is_python_module=False, verbose=bool(os.environ.get("FUSEDLR_VERBOSE_BUILD")))
    return torch.ops.fusedlr_emulated
