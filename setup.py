"""Builds fusedlr._C: the CPU kernels always, the CUDA kernels when torch is a CUDA build and nvcc
is found.

Environment switches:
  FUSEDLR_CUDA          auto (default), 1 (require the CUDA kernels) or 0 (CPU only)
  TORCH_CUDA_ARCH_LIST  GPU architectures (default "8.0;9.0+PTX": sm_80, sm_90 and PTX for newer)
  MAX_JOBS              parallel compile jobs
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    switch = os.environ.get("FUSEDLR_CUDA", "auto").lower()
    if switch not in ("auto", "0", "1"):
        raise SystemExit(f"FUSEDLR_CUDA must be auto, 0 or 1, not {switch!r}")
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if switch == "1" and not available:
        raise SystemExit(
            "FUSEDLR_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}"
        )
    return available and switch != "0"


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: ATen's parallel_for is a header template that runs serially without it.
    # -ffp-contract=off: no fused multiply-adds, so the AVX-512, AVX2 and baseline versions of the
    # CPU loops, and the CUDA kernels (-fmad=false), round alike.
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas"]
    link = ["-fopenmp"]
    if not want_cuda():
        return CppExtension("fusedlr._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-fmad=false"]
    return CUDAExtension(
        "fusedlr._C", sources, extra_compile_args={"cxx": cxx + ["-DFUSEDLR_WITH_CUDA"], "nvcc": nvcc},
        extra_link_args=link,
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
