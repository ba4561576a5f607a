"""Steps every CPU optimizer path (each optimizer under every storage mode of each parameter
dtype) on fixed random inputs and saves what they leave (parameters, state, norms, lrs) to the file
named by its argument: tests/test_cpu_isa.py runs it under each FUSEDLR_CPU_ISA and compares the
files bitwise."""

import itertools
import sys

import torch

import fusedlr
from fusedlr import _state
from fusedlr import schedules as S

SIZES = (0, 1, 15, 17, 1000, 70_001)  # empty, tails, and more than one 65,536-element chunk


def inputs(dtype, gen):
    params = [torch.nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)) for n in SIZES]
    # a view one element into its storage: loads that are not vector-aligned
    base = torch.randn(4_097, generator=gen, dtype=torch.float64).to(dtype)
    params.append(torch.nn.Parameter(base[1:]))
    return params


def storages(dtype):
    """Every storage mode of `dtype`'s parameters (storage_math.h, [note: storage]): the state's
    dtype, the master weight, and rounding to nearest or stochastically where something rounds
    stochastically (bfloat16 or 8-bit state, or a low-precision parameter without a master weight)."""
    if dtype == torch.float64:
        return [{}]
    masters = {torch.float32: [False], torch.bfloat16: [False, True, "remainder"], torch.float16: [False, True]}
    return [dict(state_dtype=state, master_weights=master, stochastic_rounding=stochastic, rounding_seed=7)
            for state, master, stochastic in itertools.product((None, torch.bfloat16, torch.float8_e4m3fn), masters[dtype],
                                                                (False, True))
            if not stochastic or state is not None or (dtype != torch.float32 and master is False)]


DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def cases():
    schedule = S.OneCycleLR(max_lr=0.05, total_steps=12)
    for dtype in DTYPES:
        for storage in storages(dtype):
            label = ",".join(f"{k}={v}" for k, v in storage.items())
            yield f"sgd-{dtype}-{label}", dtype, lambda p, o=storage: fusedlr.SGD(
                p, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01, schedule=schedule, **o)
            yield f"nesterov-{dtype}-{label}", dtype, lambda p, o=storage: fusedlr.SGD(
                p, lr=0.05, momentum=0.9, nesterov=True, max_grad_norm=2.0, **o)
            yield f"adam-{dtype}-{label}", dtype, lambda p, o=storage: fusedlr.Adam(
                p, lr=0.01, weight_decay=0.1, amsgrad=True, schedule=schedule, max_grad_norm=5.0, **o)
            yield f"adamw-{dtype}-{label}", dtype, lambda p, o=storage: fusedlr.AdamW(
                p, lr=0.01, betas=(0.8, 0.99), maximize=True, max_grad_norm=float("inf"), **o)
            yield f"lion-{dtype}-{label}", dtype, lambda p, o=storage: fusedlr.Lion(
                p, lr=0.01, betas=(0.9, 0.99), weight_decay=0.1, **o)


def special_values() -> torch.Tensor:
    """float32 values at the edges the roundings to bfloat16 and float16 treat apart: zeros, NaNs
    (quiet, signaling, either sign), infinities, float32's largest finite value, bfloat16's largest
    finite value, the tie just beyond it and a value just below it, float16's largest finite value
    and values beyond it, subnormals of float32, bfloat16 and float16, float16's smallest normal,
    and exact ties of bfloat16 (1 + 2^-8, 0x3f818000) and of float16 (1 + 2^-11, 1 + 3 * 2^-11)."""
    values = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 3.4e38, -3.4e38, 3.3895e38, 65504.0,
                           65519.0, 65520.0, -65536.0, 1e-40, -1e-40, 1e-45, 2.0**-126, 2.0**-14, 6e-5, 6e-8, -3e-8,
                           1e-5, 1.0, 1.00390625, 1.00048828125, -1.00146484375])
    bits = torch.tensor([0x7F800001, 0xFFC00001, 0x7FFFFFFF, 0x7FBFFFFF, 0xFF800001, 0x3F808000, 0x3F818000,
                         0x7F7F0000, 0x7F7F8000, 0x7F7FFFFF, 0x00008000, 0x80018000], dtype=torch.int64)
    return torch.cat([values, bits.to(torch.int32).view(torch.float32)])  # int64 to int32 wraps, as bits


def special_cases():
    """Steps of parameters and gradients drawn from special_values() and ordinary values under every
    storage mode of the low-precision dtypes: name, dtype, optimizer factory. What the roundings
    then see are the updates' results, special and not; tests/test_rounding.py feeds the special
    values to them exactly. NaN payloads are not compared (which of two NaN operands an operation
    passes on is the compiler's choice in each version of the loops)."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for storage in storages(dtype):
            label = ",".join(f"{k}={v}" for k, v in storage.items())
            yield f"special-sgd-{dtype}-{label}", dtype, lambda p, o=storage: fusedlr.SGD(p, lr=1e-3, momentum=0.9, **o)
            yield f"special-adamw-{dtype}-{label}", dtype, lambda p, o=storage: fusedlr.AdamW(p, lr=1e-3, **o)


def run_special(saved: dict) -> None:
    values = special_values()
    for name, dtype, make in special_cases():
        gen = torch.Generator().manual_seed(len(saved))
        # every special value at many offsets within a vector, among ordinary values
        ordinary = torch.randn(4 * values.numel(), generator=gen)
        pool = torch.cat([values.repeat(8), ordinary])
        param = torch.nn.Parameter(pool[torch.randperm(pool.numel(), generator=gen)].to(dtype))
        opt = make([param])
        for step in range(3):
            grad = pool[torch.randperm(pool.numel(), generator=gen)] * 10.0 ** (step - 1)
            param.grad = grad.to(dtype)
            opt.step()
        saved[f"{name}/special_param"] = param.detach().clone()
        for key, value in opt.state[param].items():
            # 8-bit state decoded: its NaN codes' signs are those of the NaNs the update made, which
            # are not compared (above)
            saved[f"{name}/special_{key}"] = _state.state_value(value, param).clone()


def main(path: str) -> None:
    saved = {}
    run_special(saved)
    for name, dtype, make in cases():
        gen = torch.Generator().manual_seed(len(saved))
        params = inputs(dtype, gen)
        opt = make(params)
        for step in range(6):
            for p in params:
                # gradients of mixed scales, some tiny, some large: both sums of squares run
                scale = 10.0 ** (8 * torch.rand((), generator=gen).item() - 4)
                p.grad = (torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
            opt.step()
            saved[f"{name}/lr/{step}"] = opt.last_lr().clone()
            if opt.max_grad_norm is not None:
                saved[f"{name}/norm/{step}"] = opt.last_grad_norm().clone()
        for i, p in enumerate(params):
            saved[f"{name}/param/{i}"] = p.detach().clone()
            for key, value in opt.state[p].items():
                saved[f"{name}/{key}/{i}"] = value.clone()
    torch.save(saved, path)
    print(f"ran {fusedlr.cpu_isa()}")


if __name__ == "__main__":
    main(sys.argv[1])
