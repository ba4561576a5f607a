"""fusedlr: fused SGD / Adam / AdamW steps with the learning-rate schedule evaluated on the device.

    import fusedlr
    from fusedlr import schedules as S

    opt = fusedlr.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1,
                        schedule=S.OneCycleLR(max_lr=3e-4, total_steps=10_000))
    for batch in loader:
        loss(model, batch).backward()
        opt.step()       # lr(step) computed in the kernel, step counter advanced on the device
        opt.zero_grad()
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C, optim, schedules
from .optim import *  # noqa: F401,F403  (every optimizer: optim.__all__)
from .convert import from_torch

__all__ = [*optim.__all__, "from_torch", "schedules", "cuda_built", "cpu_isa"]


def cuda_built() -> bool:
    """Whether this build of fusedlr has its CUDA kernels."""
    return bool(_C.cuda_built)


def cpu_isa() -> str:
    """The instruction set the CPU loops run: "avx512", "avx2" or "default" (baseline), the best the
    CPU has unless the environment variable FUSEDLR_CPU_ISA names one. Every version rounds alike."""
    return _C.cpu_isa()


cpu_isa()  # an unknown or unsupported FUSEDLR_CPU_ISA fails the import, not a step
__version__ = "0.1.0"
