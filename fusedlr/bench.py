"""Step-throughput benchmark: fusedlr against torch's optimizers, each with its lr scheduler.

Every contender updates the same parameters with the same gradients (each keeps its own state), and
the contenders take turns, round after round, so that drift of the machine hits all of them alike.
The floor is the time the bytes a step must move take at the memory bandwidth measured in the same
run (stream_bandwidths). Those streams are single torch ops over one or two arrays; a step that
streams several arrays at once can move more, and then runs at more than 100% of the floor.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

import fusedlr
from fusedlr import schedules as S

# --------------------------------------------------------------------------------------------
# Presets: parameter shapes only, nothing downloaded.


def gpt2_small() -> list[tuple[int, ...]]:
    d, layers, vocab, context = 768, 12, 50257, 1024
    shapes = [(vocab, d), (context, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def resnet50() -> list[tuple[int, ...]]:
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(width, in_ch, 1, 1), (width,), (width,), (width, width, 3, 3), (width,), (width,),
                       (4 * width, width, 1, 1), (4 * width,), (4 * width,)]
            if b == 0:
                shapes += [(4 * width, in_ch, 1, 1), (4 * width,), (4 * width,)]
            in_ch = 4 * width
    return shapes + [(1000, 2048), (1000,)]


def llama_1b() -> list[tuple[int, ...]]:
    d, layers, ffn, vocab, kv = 2048, 16, 8192, 128256, 512
    shapes = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d,), (d, d), (kv, d), (kv, d), (d, d), (d,), (ffn, d), (ffn, d), (d, ffn)]
    return shapes + [(d,)]


PRESETS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "gpt2-124m": gpt2_small,
    "resnet50": resnet50,
    "2000x1k": lambda: [(1024,)] * 2000,
    "20x256": lambda: [(256,)] * 20,
    "llama-1b": llama_1b,
}
CPU_PRESETS = ["gpt2-124m", "resnet50", "2000x1k", "20x256"]
GPU_PRESETS = ["llama-1b", "gpt2-124m", "resnet50", "2000x1k", "20x256"]
LARGE = {"gpt2-124m", "resnet50", "llama-1b"}

# --------------------------------------------------------------------------------------------
# Schedules by name, sized for a run far longer than the benchmark, so none runs out.

HORIZON = 10 ** 9
SCHEDULES: dict[str, Callable[[float], S.Schedule | None]] = {
    "none": lambda lr: None,
    "step": lambda lr: S.StepLR(step_size=1000, gamma=0.5),
    "cosine": lambda lr: S.CosineAnnealingLR(T_max=HORIZON, eta_min=lr / 100),
    "warmup-cosine": lambda lr: S.SequentialLR([S.LinearLR(start_factor=0.01, total_iters=5),
                                                S.CosineAnnealingLR(T_max=HORIZON, eta_min=lr / 100)],
                                               milestones=[5]),
    "onecycle": lambda lr: S.OneCycleLR(max_lr=lr, total_steps=HORIZON),
    "cyclic": lambda lr: S.CyclicLR(base_lr=lr / 10, max_lr=lr, step_size_up=7),
    "plateau": lambda lr: S.ReduceLROnPlateau(patience=3),
}


def bytes_per_param(optimizer: str, dtype: torch.dtype, momentum: bool, state_dtype: torch.dtype | None = None,
                    master: bool | str = False) -> float:
    """What a step must move per parameter: read the gradient, the parameter (or its float32 master)
    and the state, write them back. fp32 Adam/AdamW: 28 (p, g, m, v read; p, m, v written); SGD
    with momentum: 20; plain SGD: 12. A bfloat16 parameter with a float32 master reads the master
    instead of the parameter (2 + 2 + 4 read, 2 + 4 written), with a remainder both (2 + 2 + 2 read,
    2 + 2 written); bfloat16 state moves 2 bytes per value, 8-bit state 1 + 1/32 (a code, and a
    scale per 32 values)."""
    p = torch.empty((), dtype=dtype).element_size()
    if state_dtype == torch.float8_e4m3fn:
        state = 1 + 1 / 32
    elif state_dtype is not None:
        state = torch.empty((), dtype=state_dtype).element_size()
    else:
        state = 8 if dtype == torch.float64 else 4
    if master is True:
        param = p + 4 + 4 + p  # the gradient and the master read, the master and the parameter written
    elif master == "remainder":
        param = p + 2 * (p + 2)  # the gradient read; the parameter and its remainder read and written
    else:
        param = 3 * p
    states = (1 if momentum else 0) if optimizer == "sgd" else 2
    return param + 2 * states * state


def state_bytes(opt) -> int:
    """The optimizer's memory: the bytes of its per-parameter state tensors (masters included, step
    counters not), each storage counted once."""
    seen, total = set(), 0
    for state in opt.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step" and value.numel() > 0:
                storage = value.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
    return total


# --------------------------------------------------------------------------------------------


@dataclass
class Contender:
    name: str
    step: Callable[[], None]
    samples: list[float] = field(default_factory=list)
    compile_s: float | None = None  # the first steps, which compile, are timed apart
    # where it moves other bytes than the preset's own step (another storage, a float32 model)
    bytes_per_param: float | None = None
    optimizer: object = None  # for its memory (state_bytes), after the timed rounds


COMPILING_STEPS = 3  # torch.compile compiles at the first step and again at the second (dynamic step count)


def compiling_steps_timed(step: Callable[[], None], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(COMPILING_STEPS):
        step()
    synchronize(device)
    return time.perf_counter() - start


def captured(step: Callable[[], None]) -> Callable[[], None]:
    """step() captured once in a CUDA graph, after warm-up steps on a side stream (as torch's docs
    capture); calling the result replays the graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def optimizer_kwargs(optimizer: str, lr: float) -> dict:
    if optimizer == "sgd":
        return dict(lr=lr, momentum=0.9)
    return dict(lr=lr, weight_decay=0.01)


def import_deepspeed_cpu_adam():
    """deepspeed.ops.adam.DeepSpeedCPUAdam (raises where deepspeed is not installed).

    Importing deepspeed sets PYTORCH_NVML_BASED_CUDA_CHECK=1, after which every
    torch.cuda.is_available() asks NVML again; on a machine without a GPU that made torch's fused
    CPU step of 20 x 256 parameters 1.7x slower. The variable is put back as it was, so that torch's
    contenders run as they do without deepspeed."""
    saved = {name: os.environ.get(name) for name in ("PYTORCH_NVML_BASED_CUDA_CHECK", "DS_ACCELERATOR")}
    # Named, the CPU accelerator is taken without a warning that none other was found; so is the
    # build of its op without torch's warning that no CUDA runtime is there.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    build_log = logging.getLogger("torch.utils.cpp_extension")
    build_level = build_log.level
    build_log.setLevel(logging.ERROR)
    try:
        importlib.import_module("torch.utils.cpp_extension")  # deepspeed builds its op with it, on first use
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # optional
    finally:
        build_log.setLevel(build_level)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return DeepSpeedCPUAdam


def make_contenders(optimizer: str, schedule_name: str, params, device: torch.device,
                    max_grad_norm: float | None = None, compiled: bool = True) -> list[Contender]:
    """See below; with bfloat16 parameters also each way fusedlr can store them (storage_contenders)."""
    contenders = torch_and_fused_contenders(optimizer, schedule_name, params, device, max_grad_norm, compiled)
    if params and params[0].dtype == torch.bfloat16 and optimizer != "sgd":
        contenders += storage_contenders(optimizer, schedule_name, params, device)
    return contenders


def storage_contenders(optimizer: str, schedule_name: str, params, device: torch.device) -> list[Contender]:
    """A bfloat16 model's ways to keep its optimizer state, each with the bytes its step moves:
    float32 masters, int16 remainders (the same run in 2 bytes less), remainders with bfloat16 or
    8-bit moments, and stochastic rounding with bfloat16 or 8-bit moments (no master at all); and torch's fused
    step on a float32 copy of the model, torch's way to float32 masters."""
    lr = 1e-3
    kwargs = optimizer_kwargs(optimizer, lr)
    schedule = SCHEDULES[schedule_name](lr)
    fused_cls = {"adam": fusedlr.Adam, "adamw": fusedlr.AdamW}[optimizer]
    torch_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer]
    dtype = params[0].dtype
    metric = torch.tensor(1.0, device=device)
    out = []
    for name, options in [("fusedlr, fp32 masters", dict(master_weights=True)),
                          ("fusedlr, remainders", dict(master_weights="remainder")),
                          ("fusedlr, remainders + bf16 state", dict(master_weights="remainder",
                                                                    state_dtype=torch.bfloat16)),
                          ("fusedlr, stochastic + bf16 state", dict(stochastic_rounding=True,
                                                                    state_dtype=torch.bfloat16)),
                          ("fusedlr, remainders + 8-bit state", dict(master_weights="remainder",
                                                                     state_dtype=torch.float8_e4m3fn)),
                          ("fusedlr, stochastic + 8-bit state", dict(stochastic_rounding=True,
                                                                     state_dtype=torch.float8_e4m3fn))]:
        opt = fused_cls(params, **kwargs, schedule=schedule, **options)
        step = (lambda o=opt: (o.step(), o.observe(metric))) if isinstance(schedule, S.ReduceLROnPlateau) else opt.step
        out.append(Contender(name, step, optimizer=opt,
                             bytes_per_param=bytes_per_param(optimizer, dtype, True, options.get("state_dtype"),
                                                             options.get("master_weights", False))))
    fp32 = [torch.nn.Parameter(p.detach().float()) for p in params]
    for p, q in zip(fp32, params):
        p.grad = q.grad.float()
    opt = torch_cls(fp32, **kwargs, fused=True)
    sched = S.torch_scheduler(schedule, opt) if schedule is not None else None

    def fp32_step():
        opt.step()
        if sched is not None:
            sched.step(1.0) if isinstance(schedule, S.ReduceLROnPlateau) else sched.step()
    out.append(Contender("torch fused, fp32 model", fp32_step, optimizer=opt,
                         bytes_per_param=bytes_per_param(optimizer, torch.float32, True)))
    return out


def torch_and_fused_contenders(optimizer: str, schedule_name: str, params, device: torch.device,
                               max_grad_norm: float | None = None, compiled: bool = True) -> list[Contender]:
    """Each contender with its schedule as users run it; with max_grad_norm, torch's contenders call
    clip_grad_norm_ before their step and fusedlr clips in its step, and "fusedlr, no clipping" runs
    as well, so that the cost of clipping is measured in the same run.

    "torch compiled" is torch.compile of the step and its scheduler with a tensor lr (torch's recipe
    for a compiled optimizer with an lr scheduler), its compile time reported apart. On CUDA, "CUDA
    graph" contenders replay a graph of the step captured once: torch's fused capturable step (its
    scheduler, which writes the tensor lr from the host, runs between replays) and fusedlr's step."""
    lr = 1e-3
    torch_cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer]
    fused_cls = {"sgd": fusedlr.SGD, "adam": fusedlr.Adam, "adamw": fusedlr.AdamW}[optimizer]
    kwargs = optimizer_kwargs(optimizer, lr)
    schedule = SCHEDULES[schedule_name](lr)
    metric = torch.tensor(1.0, device=device)
    contenders = []
    # torch keeps the state in the parameters' dtype, bfloat16 and float16 too
    dtype = params[0].dtype if params else torch.float32
    torch_bytes = bytes_per_param(optimizer, dtype, True, state_dtype=dtype if dtype != torch.float64 else None)

    def torch_contender(name, **impl):
        opt = torch_cls(params, **kwargs, **impl)
        sched = S.torch_scheduler(schedule, opt) if schedule is not None else None

        def step():
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=impl.get("foreach"))
            opt.step()
            if sched is None:
                return
            if isinstance(schedule, S.ReduceLROnPlateau):
                sched.step(1.0)
            else:
                sched.step()
        return Contender(name, step, optimizer=opt, bytes_per_param=torch_bytes)

    contenders.append(torch_contender("torch for-loop", foreach=False))
    contenders.append(torch_contender("torch foreach", foreach=True))
    contenders.append(torch_contender("torch fused", fused=True))
    plateau = isinstance(schedule, S.ReduceLROnPlateau)

    def tensor_lr_optimizer(**impl):
        opt = torch_cls(params, **dict(kwargs, lr=torch.tensor(lr, device=device)), **impl)
        sched = S.torch_scheduler(schedule, opt) if schedule is not None and not plateau else None
        return opt, sched

    def clipped_step(opt):
        def step():
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=True)
            opt.step()
        return step

    if device.type == "cuda" and optimizer != "sgd":
        opt, sched = tensor_lr_optimizer(fused=True, capturable=True)
        capturable_step = clipped_step(opt)
        contenders.append(Contender("torch fused capturable, tensor lr",
                                    lambda: (capturable_step(), sched.step() if sched else None),
                                    bytes_per_param=torch_bytes))
        graph_opt, graph_sched = tensor_lr_optimizer(fused=True, capturable=True)
        replay = captured(clipped_step(graph_opt))
        contenders.append(Contender("torch fused capturable, CUDA graph",
                                    lambda: (replay(), graph_sched.step() if graph_sched else None),
                                    bytes_per_param=torch_bytes))
    if compiled and not plateau:
        # a tensor lr takes Adam's for-loop step, or its foreach one where it is capturable (CUDA)
        impl = dict(foreach=False) if optimizer != "sgd" and device.type == "cpu" else dict(foreach=True)
        if optimizer != "sgd" and device.type == "cuda":
            impl["capturable"] = True
        compiled_opt, compiled_sched = tensor_lr_optimizer(**impl)

        eager_step = clipped_step(compiled_opt)

        @torch.compile(fullgraph=False)
        def compiled_step():
            eager_step()
            if compiled_sched is not None:
                compiled_sched.step()

        contenders.append(Contender("torch compiled, tensor lr", compiled_step, bytes_per_param=torch_bytes,
                                    compile_s=compiling_steps_timed(compiled_step, device)))
    if device.type == "cpu" and optimizer != "sgd":
        try:
            DeepSpeedCPUAdam = import_deepspeed_cpu_adam()
            ds = DeepSpeedCPUAdam(params, lr=lr, weight_decay=kwargs["weight_decay"],
                                  adamw_mode=optimizer == "adamw")
            ds_sched = S.torch_scheduler(schedule, ds) if schedule is not None and not isinstance(
                schedule, S.ReduceLROnPlateau) else None
            contenders.append(Contender("DeepSpeedCPUAdam", lambda: (ds.step(), ds_sched.step() if ds_sched else None)))
        except Exception:  # not installed, or its op does not build here
            pass

    def fused_contender(name, **options):
        opt = fused_cls(params, **kwargs, schedule=schedule, **options)
        if isinstance(schedule, S.ReduceLROnPlateau):
            return Contender(name, lambda: (opt.step(), opt.observe(metric)), optimizer=opt)
        return Contender(name, opt.step, optimizer=opt)

    if device.type == "cuda" and not plateau:
        graph_step = fused_contender("", max_grad_norm=max_grad_norm).step
        contenders.append(Contender("fusedlr, CUDA graph", captured(graph_step)))
    if max_grad_norm is not None:
        contenders.append(fused_contender("fusedlr, no clipping"))
        contenders.append(fused_contender("fusedlr", max_grad_norm=max_grad_norm))
    else:
        contenders.append(fused_contender("fusedlr"))
    return contenders


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stream_bandwidths(device: torch.device, megabytes: int) -> dict[str, float]:
    """Bytes per second of large streams, the best of several runs:
    "copy": dst.copy_(src), counted as read src + write dst;
    "in_place": dst.add_(src), counted as read dst and src + write dst;
    "scale": dst.mul_(c), counted as read dst + write dst;
    "read": src.sum(), a read-only stream (what the norm pass of clipping does).
    An optimizer step updates its state in place. On CPUs a copy also reads dst before writing it
    (write-allocate), which the count leaves out, so the copy understates what memory can do; the
    floor takes the fastest of the three that write."""
    n = megabytes * 2 ** 20 // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)

    def timed(fn) -> float:
        times = []
        for _ in range(7):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
        return min(times[1:])  # the best run: the floor is what memory can do

    nbytes = src.numel() * 4
    return {"copy": 2 * nbytes / timed(lambda: dst.copy_(src)),
            "in_place": 3 * nbytes / timed(lambda: dst.add_(src)),
            "scale": 2 * nbytes / timed(lambda: dst.mul_(1.0000001)),
            "read": nbytes / timed(lambda: src.sum())}


def floor_bandwidth(bandwidths: dict[str, float]) -> float:
    """The bandwidth of the floor: the fastest stream that writes, as a step does."""
    return max(value for name, value in bandwidths.items() if name != "read")


class Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = max(total, 1), 0, enabled

    def advance(self, label: str) -> None:
        self.done += 1
        if self.enabled:
            width = 30
            filled = width * self.done // self.total
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {label:<40}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def default_rounds(preset: str, device: torch.device) -> int:
    if device.type == "cuda":
        return 50 if preset in LARGE else 200
    return 11 if preset in LARGE else 40


def run_preset(preset: str, args, device: torch.device, bandwidths: dict[str, float], progress: Progress) -> dict:
    bandwidth = floor_bandwidth(bandwidths)
    shapes = PRESETS[preset]()
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device=device, dtype=dtype))
              for s in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device=device, dtype=dtype)
    contenders = make_contenders(args.optimizer, args.schedule, params, device, args.max_grad_norm,
                                 compiled=not args.no_compiled)
    rounds = args.steps or default_rounds(preset, device)
    warmup = 2
    for r in range(warmup + rounds):
        order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
        for c in order:
            synchronize(device)
            start = time.perf_counter()
            c.step()
            synchronize(device)
            elapsed = time.perf_counter() - start
            if r >= warmup:
                c.samples.append(elapsed)
        progress.advance(f"{preset} round {r + 1}/{warmup + rounds}")
    n_params = sum(p.numel() for p in params)
    step_bytes = n_params * bytes_per_param(args.optimizer, dtype, momentum=True)
    floor = step_bytes / bandwidth
    fused = statistics.median(next(c for c in contenders if c.name == "torch fused").samples)
    results = []
    for c in contenders:
        median = statistics.median(c.samples)
        moved = n_params * (c.bytes_per_param or bytes_per_param(args.optimizer, dtype, momentum=True))
        memory = state_bytes(c.optimizer) / n_params if c.optimizer is not None else None
        results.append(dict(contender=c.name, median_s=median, min_s=min(c.samples), max_s=max(c.samples),
                            params_per_s=n_params / median, achieved_gb_s=moved / median / 1e9,
                            bytes_per_param=moved / n_params, pct_of_floor=100 * moved / bandwidth / median,
                            speedup_vs_torch_fused=fused / median, state_bytes_per_param=memory,
                            samples_s=c.samples, **({} if c.compile_s is None else dict(compile_s=c.compile_s))))
    del contenders, params
    report = dict(preset=preset, tensors=len(shapes), params=n_params, bytes_per_step=step_bytes,
                  floor_s=floor, rounds=rounds, results=results)
    if args.max_grad_norm is not None:
        median = {r["contender"]: r["median_s"] for r in results}
        report["clipping_cost"] = median["fusedlr"] / median["fusedlr, no clipping"]
        # clipping must read the gradients once more before the update: at best that read's time more
        grad_bytes = n_params * dtype.itemsize
        report["clipping_floor"] = (floor + grad_bytes / bandwidths["read"]) / floor
    return report


def format_table(report: dict) -> str:
    lines = [f"\n{report['preset']}: {report['params'] / 1e6:.2f}M parameters in {report['tensors']} tensors, "
             f"{report['bytes_per_step'] / 1e6:.1f} MB per step, floor {report['floor_s'] * 1e3:.3f} ms"]
    header = f"{'contender':<34} {'median ms':>10} {'(min-max)':>19} {'Mparam/s':>10} {'B/param':>8} {'GB/s':>7} " \
             f"{'% floor':>8} {'vs fused':>9} {'state B/param':>14}"
    lines += [header, "-" * len(header)]
    for r in report["results"]:
        spread = f"({r['min_s'] * 1e3:.3f}-{r['max_s'] * 1e3:.3f})"
        memory = "" if r["state_bytes_per_param"] is None else f"{r['state_bytes_per_param']:.2f}"
        lines.append(f"{r['contender']:<34} {r['median_s'] * 1e3:>10.3f} {spread:>19} "
                     f"{r['params_per_s'] / 1e6:>10.1f} {r['bytes_per_param']:>8.1f} {r['achieved_gb_s']:>7.2f} "
                     f"{r['pct_of_floor']:>7.1f}% {r['speedup_vs_torch_fused']:>8.2f}x {memory:>14}")
    for r in report["results"]:
        if "compile_s" in r:
            lines.append(f"{r['contender']}: its first {COMPILING_STEPS} steps, which compile, took "
                         f"{r['compile_s']:.1f} s (not in its times)")
    if "clipping_cost" in report:
        lines.append(f"clipping: every contender clips to a global norm (the floor is that of the step alone); "
                     f"fusedlr with clipping takes {report['clipping_cost']:.2f}x its time without (one more "
                     f"read of the gradients at the measured read bandwidth: {report['clipping_floor']:.2f}x)")
    return "\n".join(lines)


def machine_info(device: torch.device) -> dict:
    info = dict(platform=platform.platform(), processor=platform.processor(), python=platform.python_version(),
                torch=torch.__version__, fusedlr=fusedlr.__version__, threads=torch.get_num_threads(),
                cpus=os.cpu_count(), device=str(device), fusedlr_cuda_built=fusedlr.cuda_built())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    deepspeed = sys.modules.get("deepspeed")
    if deepspeed is not None:
        info["deepspeed"] = getattr(deepspeed, "__version__", "unknown")
    return info


def write_plot(reports: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(4.2 * len(reports), 4.2), squeeze=False)
    for ax, report in zip(axes[0], reports):
        names = [r["contender"] for r in report["results"]]
        values = [r["pct_of_floor"] for r in report["results"]]
        bars = ax.bar(range(len(names)), values, color=["#4c72b0" if n != "fusedlr" else "#dd8452" for n in names])
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("% of memory-bandwidth floor (higher is faster)")
        ax.set_title(f"{report['preset']} ({report['params'] / 1e6:.1f}M params)", fontsize=10)
        for bar, r in zip(bars, report["results"]):
            ax.annotate(f"{r['speedup_vs_torch_fused']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    fig.suptitle("optimizer step throughput (label: speedup over torch fused)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not fusedlr.cuda_built():
        print("fusedlr was built without its CUDA kernels; rebuild with FUSEDLR_CUDA=1", file=sys.stderr)
        return 2
    presets = args.preset or (GPU_PRESETS if device.type == "cuda" else CPU_PRESETS)
    for p in presets:
        if p not in PRESETS:
            print(f"unknown preset {p!r}; choose from {', '.join(PRESETS)}", file=sys.stderr)
            return 2
    bandwidths = stream_bandwidths(device, 1024)
    bandwidth = floor_bandwidth(bandwidths)
    print(f"fusedlr bench: {args.optimizer}, schedule {args.schedule}, {args.dtype}, on {device} "
          f"({torch.get_num_threads()} threads); bandwidth GB/s: "
          + ", ".join(f"{name} {value / 1e9:.2f}" for name, value in bandwidths.items())
          + f"; the floor uses {bandwidth / 1e9:.2f}")
    total = sum(2 + (args.steps or default_rounds(p, device)) for p in presets)
    progress = Progress(total, enabled=not args.quiet and sys.stderr.isatty())
    reports = []
    for preset in presets:
        reports.append(run_preset(preset, args, device, bandwidths, progress))
    progress.close()
    for report in reports:
        print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine_info(device), optimizer=args.optimizer, schedule=args.schedule,
                           dtype=args.dtype, max_grad_norm=args.max_grad_norm, bandwidth_bytes_per_s=bandwidths,
                           floor_bandwidth_bytes_per_s=bandwidth, presets=reports), f, indent=1)
        print(f"\nwrote {args.json}")
    if args.plot:
        write_plot(reports, args.plot)
        print(f"wrote {args.plot}")
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("--preset", action="append", choices=list(PRESETS),
                        help="preset to run (repeatable); default: all for the device")
    parser.add_argument("--optimizer", default="adamw", choices=["sgd", "adam", "adamw"])
    parser.add_argument("--schedule", default="onecycle", choices=list(SCHEDULES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--steps", type=int, default=None, help="timed rounds per preset (default: by preset size)")
    parser.add_argument("--max-grad-norm", type=float, default=None,
                        help="every contender clips its gradients to this global L2 norm (torch: clip_grad_norm_)")
    parser.add_argument("--no-compiled", action="store_true",
                        help="leave out torch's compiled optimizer (its compile takes seconds to minutes)")
    parser.add_argument("--json", default=None, help="write every figure and raw sample here")
    parser.add_argument("--plot", default=None, help="write a PNG bar chart here (needs matplotlib)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
