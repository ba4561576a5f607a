"""Builds fusedlr._C: the CPU kernels always, the CUDA kernels when torch is a CUDA build and nvcc
is found.

Environment switches:
  FUSEDLR_CUDA          auto (default), 1 (require the CUDA kernels) or 0 (CPU only)
  TORCH_CUDA_ARCH_LIST  GPU architectures (default "8.0;9.0+PTX": sm_80, sm_90 and PTX for newer)
  MAX_JOBS              parallel compile jobs
"""

import glob
import os
import shutil



def find_cuda_home() -> str | None:
    """The toolkit folder: torch guesses it as the parent of the nvcc on PATH, which is wrong when that
    nvcc is a link or a wrapper script (/usr/local/bin/nvcc -> /usr/local, no libcudart there)."""
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    for candidate in candidates + ["/usr/local/cuda"]:
        if os.path.isfile(os.path.join(candidate, "bin", "nvcc")) and glob.glob(
                os.path.join(candidate, "lib*", "libcudart.so*")):
            return candidate
    return None


if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and find_cuda_home():
    os.environ["CUDA_HOME"] = find_cuda_home()

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


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
    # -Werror=switch: a node kind, optimizer or mode missing from a switch fails the build.
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-Wall", "-Werror=switch",
           "-Wno-unknown-pragmas"]
    link = ["-fopenmp"]
    if not want_cuda():
        return CppExtension("fusedlr._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-fmad=false", "-Xcompiler=-Werror=switch"]
    return CUDAExtension(
        "fusedlr._C", sources, extra_compile_args={"cxx": cxx + ["-DFUSEDLR_WITH_CUDA"], "nvcc": nvcc},
        extra_link_args=link,
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
