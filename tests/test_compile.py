"""torch.compile(fullgraph=True) of a step: one graph for the whole run, the lr still following its
schedule, results equal to eager."""

import pytest
import torch
from torch._dynamo.utils import counters

import fusedlr
from fusedlr import schedules as S
from registry import OPTIMIZERS


@pytest.mark.parametrize("options", [{}, dict(max_grad_norm=0.05, skip_nonfinite=True)])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_compiled_step_has_one_graph_and_matches_eager(optimizer, options):
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model, ref = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    ref.load_state_dict(model.state_dict())
    schedule = S.OneCycleLR(max_lr=0.01, total_steps=100)
    kwargs = dict(OPTIMIZERS[optimizer].alike, lr=0.01, schedule=schedule, **options)
    fused_cls = OPTIMIZERS[optimizer].fused
    opt, ref_opt = fused_cls(model.parameters(), **kwargs), fused_cls(ref.parameters(), **kwargs)
    x = torch.randn(16, 8)

    def backward(m):
        m.zero_grad(set_to_none=False)
        m(x).pow(2).mean().backward()

    backward(model)
    opt.step()  # state exists before compiling, as after any warm-up step
    backward(ref)
    ref_opt.step()

    @torch.compile(fullgraph=True)
    def step():
        opt.step()

    lrs = []
    for _ in range(40):
        backward(model)
        step()
        backward(ref)
        ref_opt.step()
        lrs.append(float(opt.last_lr()[0]))
    assert counters["stats"]["unique_graphs"] == 1
    assert lrs == pytest.approx([schedule(k, 0.01) for k in range(2, 42)], rel=1e-12)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    if options:
        assert torch.equal(opt.last_grad_norm(), ref_opt.last_grad_norm())
        assert float(opt.last_grad_norm()) > 0.05  # it clipped


def test_compiled_first_step_creates_state_without_a_warning():
    """The first step under torch.compile creates the state inside the graph: plain zeros, no call
    Dynamo cannot trace (the huge-page buffer of eager steps)."""
    import warnings

    torch._dynamo.reset()
    model = torch.nn.Linear(8, 4)
    opt = fusedlr.AdamW(model.parameters(), lr=0.01, schedule=S.CosineAnnealingLR(T_max=10))
    x = torch.randn(16, 8)

    @torch.compile
    def train_step():
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            train_step()
    assert not [w for w in caught if "packed_state_buffer" in str(w.message)]
    assert int(opt.schedule_steps()[0]) == 3
    assert float(opt.param_groups[0]["lr"]) == S.CosineAnnealingLR(T_max=10)(3, 0.01)
