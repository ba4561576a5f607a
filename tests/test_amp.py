"""torch.amp.GradScaler hands fusedlr its scale and inf flag: the step unscales inside the update and
skips itself, counters included, when a gradient overflowed."""

import copy
import math

import pytest
import torch

import fusedlr
from fusedlr import schedules as S
from registry import OPTIMIZERS


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def model_pair(seed=0, device="cpu"):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).to(device)
    return model, copy.deepcopy(model)


def train(model, opt, scaler, batches, clip=None, poison=(), bad=math.nan, dtype=torch.float16):
    skipped = []
    device = next(model.parameters()).device
    for k, (x, y) in enumerate(batches):
        x, y = x.to(device), y.to(device)
        opt.zero_grad()
        with torch.autocast(device.type, dtype=dtype):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        if k in poison:
            next(model.parameters()).grad[0, 0] = bad
        if clip is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped.append(scaler.get_scale() < before)
    return skipped


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("clip", [None, "clip_grad_norm_", "max_grad_norm"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grad_scaler_matches_torch(device, optimizer, clip, dtype):
    """fp16 and bf16 autocast. A scale of 2**30 overflows fp16 in the first steps, and NaN is injected
    at steps 25 and 31:
    the same steps are skipped as with torch's fused optimizer, and the parameters agree. Clipping
    to a norm of 1 (which clips most steps here) is either clip_grad_norm_ after scaler.unscale_ on
    both sides, or fusedlr's own max_grad_norm, unscaled in the step, against the former in torch."""
    model, ref_model = model_pair(device=device)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 16, generator=gen), torch.randn(8, 1, generator=gen)) for _ in range(40)]
    # The reference is torch's fused AdamW where it follows the run; elsewhere torch's for-loop
    # optimizer, which GradScaler steps after its own unscale and inf check. On the CPU, torch's fused
    # SGD, and its fused AdamW after unscale_, diverge in this very run (parameters of 1e30 and more
    # by step 16), so they are no reference.
    impl = dict(fused=True) if clip is None and optimizer == "adamw" else dict(foreach=False)
    fused_clip = dict(max_grad_norm=1.0) if clip == "max_grad_norm" else {}
    entry = OPTIMIZERS[optimizer]
    kwargs = dict(entry.alike, lr=1e-2)
    opt = entry.fused(model.parameters(), **kwargs, **fused_clip)
    ref = entry.reference(ref_model.parameters(), **kwargs, **impl)
    poison = {25, 31}
    # growth_interval=1000: once the scale fits, only the poisoned steps skip, whatever the rounding.
    # In fp16 the first scale overflows; bf16 has float32's range, where only the poison does.
    init_scale = 2.0 ** 30 if dtype == torch.float16 else 2.0 ** 16
    skipped = train(model, opt, torch.amp.GradScaler(device, init_scale=init_scale, growth_interval=1000), batches,
                    1.0 if clip == "clip_grad_norm_" else None, poison, dtype=dtype)
    ref_skipped = train(ref_model, ref, torch.amp.GradScaler(device, init_scale=init_scale, growth_interval=1000),
                        batches, None if clip is None else 1.0, poison, dtype=dtype)
    assert skipped == ref_skipped and skipped[25] and skipped[31] and skipped.count(False) > 20
    assert skipped[0] == (dtype == torch.float16)
    assert opt.schedule_steps().tolist() == [skipped.count(False)]
    # fp32 roundings differ (ATen's vector kernels fuse multiply-adds); 40 steps of lr 1e-2 on
    # values of order 0.1 keep them far below 1e-4. Under bf16 autocast such an ulp can flip a bf16
    # rounding of the next forward pass (2**-8 relative) and grow: 1e-3 still sits far below the
    # steps themselves (40 steps of 1e-2), which a wrong update would be off by.
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float16 else dict(rtol=1e-3, atol=1e-3)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_gradient_skips_the_step_and_changes_nothing(device):
    model, _ = model_pair(device=device)
    opt = fusedlr.AdamW(model.parameters(), lr=1e-2, schedule=S.StepLR(step_size=1, gamma=0.5))
    scaler = torch.amp.GradScaler(device, init_scale=1.0)
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 16, generator=gen), torch.randn(8, 1, generator=gen)) for _ in range(6)]
    train(model, opt, scaler, batches[:3])
    params = [p.detach().clone() for p in model.parameters()]
    state = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    steps, lr = opt.schedule_steps().clone(), opt.last_lr().clone()
    assert train(model, opt, scaler, batches[3:4], poison={0}) == [True]
    for p, before in zip(model.parameters(), params):
        assert torch.equal(p.detach(), before)
        for k, v in state[p].items():
            assert torch.equal(opt.state[p][k], v)
    assert torch.equal(opt.schedule_steps(), steps) and torch.equal(opt.last_lr(), lr)
    train(model, opt, scaler, batches[4:])  # and training goes on
    assert opt.schedule_steps().tolist() == [steps.item() + 2]


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_with_clipping_matches_torch(device):
    """bf16 autocast (no scaler): fusedlr's fused clipping against clip_grad_norm_ + torch's AdamW,
    on the same bf16-computed gradients."""
    model, ref_model = model_pair(seed=3, device=device)
    opt = fusedlr.AdamW(model.parameters(), lr=1e-2, max_grad_norm=0.5)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, foreach=False)
    gen = torch.Generator().manual_seed(4)
    clipped = 0
    for _ in range(30):
        x, y = torch.randn(8, 16, generator=gen).to(device), torch.randn(8, 1, generator=gen).to(device)
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad()
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = torch.nn.functional.mse_loss(m(x).float(), y)
            loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.5)
        clipped += bool(norm > 0.5)
        opt.step()
        ref.step()
        torch.testing.assert_close(opt.last_grad_norm().float(), norm, rtol=1e-5, atol=0)
    assert clipped > 10
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_skip_nonfinite_with_a_scaler_too(device, bad):
    """skip_nonfinite and GradScaler together: a poisoned step is skipped once, by either."""
    model, _ = model_pair(device=device)
    opt = fusedlr.SGD(model.parameters(), lr=1e-2, momentum=0.9, skip_nonfinite=True)
    scaler = torch.amp.GradScaler(device, init_scale=1.0)
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 16, generator=gen), torch.randn(8, 1, generator=gen)) for _ in range(4)]
    assert train(model, opt, scaler, batches, poison={2}, bad=bad) == [False, False, True, False]
    assert opt.schedule_steps().tolist() == [3]
    assert all(bool(p.isfinite().all()) for p in model.parameters())


def test_amp_inputs_are_checked():
    p = torch.nn.Parameter(torch.ones(2))
    opt = fusedlr.SGD([p], lr=0.1)
    p.grad = torch.ones(2)
    opt.found_inf = torch.zeros(3)
    with pytest.raises(RuntimeError, match="found_inf"):
        opt.step()
    del opt.found_inf
    assert torch.equal(p.detach(), torch.ones(2))
