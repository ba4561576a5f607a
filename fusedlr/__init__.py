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

from . import schedules
from .optim import SGD, Adam, AdamW

__all__ = ["SGD", "Adam", "AdamW", "schedules"]
__version__ = "0.1.0"
