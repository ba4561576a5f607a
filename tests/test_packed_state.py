"""Packed optimizer state (fusedlr/_state.py, [note: packed state]): the state the optimizer creates
for many parameters at once lies in one buffer per dtype, each tensor in its parameter's layout."""

import pytest
import torch

import fusedlr
from fusedlr import _state
from registry import OPTIMIZERS


def packed_params():
    gen = torch.Generator().manual_seed(3)
    shapes = [(3, 4), (7,), (), (0, 5), (2, 3, 5, 5), (33,)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    params[4] = params[4].to(memory_format=torch.channels_last)
    params.append(torch.randn(6, 4, generator=gen).t())  # a transposed (column-major) parameter
    params.append(torch.randn(9, generator=gen, dtype=torch.float64))
    params.append(torch.randn(4, 5, generator=gen).to(torch.bfloat16))
    params.append(torch.randn(13, generator=gen).to(torch.float16))
    return [torch.nn.Parameter(p) for p in params]


def assert_packed(tensors, params):
    """One storage for all; each tensor in its parameter's layout, 64-byte aligned, none overlapping."""
    storages = {t.untyped_storage().data_ptr() for t in tensors}
    assert len(storages) == 1
    spans = []
    for t, p in zip(tensors, params):
        assert t.shape == p.shape and t.stride() == p.stride()
        if t.numel():
            assert t.data_ptr() % 64 == 0
            spans.append((t.storage_offset(), t.storage_offset() + t.numel()))
    spans.sort()
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))


def state_dtype(p):
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def check_packed_state(opt, params):
    steps = [opt.state[p]["step"] for p in params]
    assert all(s.dtype == torch.int64 and s.dim() == 0 for s in steps)
    assert len({s.untyped_storage().data_ptr() for s in steps}) == 1
    for key in opt._STATE_KEYS:
        holders = [p for p in params if key in opt.state[p]]
        for dtype in (torch.float32, torch.float64):
            group = [p for p in holders if state_dtype(p) == dtype]
            assert all(opt.state[p][key].dtype == dtype for p in group)
            if group:
                assert_packed([opt.state[p][key] for p in group], group)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_first_step_packs_state_by_dtype(optimizer):
    """Every state of the registry's settings (alike: with its optional state) is packed."""
    params = packed_params()
    for p in params:
        p.grad = torch.randn_like(p)
    entry = OPTIMIZERS[optimizer]
    opt = entry.fused(params, master_weights=True, **entry.alike)
    opt.step()
    for key in opt._STATE_KEYS:
        assert any(key in opt.state[p] for p in params), f"no parameter has {key}: the settings test too little"
    check_packed_state(opt, params)
    for p in params:
        if p.dtype in (torch.bfloat16, torch.float16):
            master = opt.state[p]["master_weight"]
            rounded = _state.split_master(master)[0] if p.dtype == torch.bfloat16 else master.to(p.dtype)
            assert torch.equal(rounded, p.detach())
        assert int(opt.state[p]["step"]) == 1


def test_packed_state_updates_as_separate_tensors_would():
    """A step on packed state equals torch's AdamW, whose state is one tensor per parameter."""
    params = [p for p in packed_params() if p.dtype in (torch.float32, torch.float64)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = fusedlr.AdamW(params, lr=1e-2, amsgrad=True)
    ref = torch.optim.AdamW(twins, lr=1e-2, amsgrad=True, foreach=False)
    gen = torch.Generator().manual_seed(5)
    for _ in range(30):
        for p, q in zip(params, twins):
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key], ref.state[q][key], rtol=1e-5, atol=1e-7)


def test_late_first_gradients_get_a_pack_of_their_own():
    params = packed_params()[:3]
    opt = fusedlr.Adam(params, lr=1e-3)
    params[0].grad = torch.randn_like(params[0])
    opt.step()
    for p in params[1:]:
        p.grad = torch.randn_like(p)
    opt.step()
    first, late = opt.state[params[0]], [opt.state[p] for p in params[1:]]
    assert_packed([s["exp_avg"] for s in late], params[1:])
    assert first["exp_avg"].untyped_storage().data_ptr() != late[0]["exp_avg"].untyped_storage().data_ptr()
    assert [int(opt.state[p]["step"]) for p in params] == [2, 1, 1]


def test_loaded_state_is_packed():
    params = packed_params()
    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in params if p.dtype != torch.float16]
    params = [p for p in params if p.dtype != torch.float16]
    ref = torch.optim.AdamW(torch_params, lr=1e-3, amsgrad=True)
    for p in torch_params:
        p.grad = torch.randn_like(p)
    ref.step()
    opt = fusedlr.AdamW(params, lr=1e-3, amsgrad=True)
    opt.load_state_dict(ref.state_dict())
    check_packed_state(opt, params)
    for p, q in zip(params, torch_params):
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert torch.equal(opt.state[p][key], ref.state[q][key].to(state_dtype(p)))
        assert int(opt.state[p]["step"]) == 1


def test_large_entries_stand_alone_and_packs_stay_small():
    """State of 4 MiB or more has its own storage; smaller state shares packs of at most 16 MiB. A
    step on them (huge-page buffers included) matches torch's AdamW."""
    gen = torch.Generator().manual_seed(7)
    shapes = [(1100, 1000)] + [(1 << 18,)] * 20 + [(5, 7)]  # 4.4 MB, then 20 of 1 MiB, then a small one
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = fusedlr.AdamW(params, lr=1e-2)
    ref = torch.optim.AdamW(twins, lr=1e-2, foreach=False)
    for _ in range(3):
        for p, q in zip(params, twins):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    storages = {}
    for p in params:
        t = opt.state[p]["exp_avg"]
        storages.setdefault(t.untyped_storage().data_ptr(), []).append(p)
    big = opt.state[params[0]]["exp_avg"]
    assert storages[big.untyped_storage().data_ptr()] == [params[0]]
    assert big.untyped_storage().nbytes() == big.numel() * 4
    packs = [ps for ps in storages.values() if ps != [params[0]]]
    assert len(packs) == 2 and sorted(len(ps) for ps in packs) == [5, 16]  # 16 of 1 MiB fill a pack
    for ps in packs:
        assert opt.state[ps[0]]["exp_avg"].untyped_storage().nbytes() <= 16 << 20
        assert_packed([opt.state[p]["exp_avg"] for p in ps], ps)


def test_a_parameter_that_is_not_dense_is_refused_at_its_first_step():
    dense = torch.nn.Parameter(torch.randn(4))
    sliced = torch.nn.Parameter(torch.randn(8, 8)[:, ::2])
    opt = fusedlr.Adam([dense, sliced], lr=1e-3)
    dense.grad, sliced.grad = torch.randn(4), torch.randn(8, 4)
    before = dense.detach().clone(), sliced.detach().clone()
    with pytest.raises(RuntimeError, match="parameter 1 must be a dense tensor"):
        opt.step()
    assert torch.equal(dense, before[0]) and torch.equal(sliced, before[1]) and not opt.state


def test_settings_replaced_by_tensors_are_read_by_value():
    """A setting replaced by a tensor (of a lower precision, or of two elements for betas) is read
    as its float value, as the same float would be."""
    gen = torch.Generator().manual_seed(11)
    start = torch.randn(6, generator=gen)
    a, b = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    by_tensor, by_float = fusedlr.Adam([a], lr=0.1), fusedlr.Adam([b], lr=0.1)
    edits = [("lr", torch.tensor(0.1, dtype=torch.bfloat16)), ("betas", torch.tensor([0.8, 0.99])),
             ("betas", torch.tensor([0.7, 0.95])), ("lr", torch.tensor(0.05))]
    for name, value in [(None, None)] + edits:
        if name is not None:
            by_tensor.param_groups[0][name] = value
            by_float.param_groups[0][name] = value.item() if value.numel() == 1 else tuple(value.tolist())
        grad = torch.randn(6, generator=gen)
        a.grad, b.grad = grad.clone(), grad.clone()
        by_tensor.step()
        by_float.step()
        assert torch.equal(a, b)
