"""fusedlr inside the trainers people use: HF transformers' Trainer, Lightning, timm's optimizer
factory. In each, the lr each step uses is the schedule's, the lr the framework logs is that lr,
and the run equals torch's optimizer with the framework's own scheduler. Tiny models built from
configs, random data, CPU only; each test skips when its framework is not installed."""

import math
import warnings

import pytest
import torch

import fusedlr
from fusedlr import schedules as S
from fusedlr.lr import LRConflictError

warnings.filterwarnings("ignore", message=".*lr_scheduler.step\\(\\)")

# float32 training of a few steps: fusedlr's update and torch's differ in the last bits of each
# step (torch's sqrt and FMAs), which Adam's normalisation lets grow to ~1e-6 relative in a dozen
# steps; a wrong lr at any step (1e-2 relative or more in these schedules) is far outside.
RTOL, ATOL = 2e-4, 2e-6


def record_lrs(opt):
    """The lr of each of opt's steps, read just before it (the hook is the framework-independent
    witness of what the step used)."""
    used = []
    opt.register_step_pre_hook(lambda o, args, kwargs: used.append(float(o.param_groups[0]["lr"])))
    return used


# ---------------------------------------------------------------------------------------------
# HF transformers Trainer


def hf_setup(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 97, (48, 16), generator=gen)
    data = [{"input_ids": t, "labels": t} for t in tokens]

    def model():
        transformers.set_seed(0)
        return transformers.GPT2LMHeadModel(config)

    def trainer(m, optimizers, **kwargs):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4, logging_steps=1,
            report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0, lr_scheduler_type="linear",
            warmup_steps=3, disable_tqdm=True, **{"save_strategy": "no", **kwargs})
        return transformers.Trainer(model=m, args=args, train_dataset=data, optimizers=optimizers)

    return model, trainer


def hf_linear(warmup, total):
    """HF's get_scheduler("linear") as a fusedlr schedule: warmup from 0, then linear to 0."""
    return S.SequentialLR([S.LinearLR(start_factor=0.0, end_factor=1.0, total_iters=warmup),
                           S.LinearLR(start_factor=1.0, end_factor=0.0, total_iters=total - warmup)],
                          milestones=[warmup])


def logged_lrs(trainer):
    return [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]


def test_hf_trainer_with_the_schedule_on_the_device(tmp_path):
    model, trainer = hf_setup(tmp_path)
    ours, ref = model(), model()
    opt = fusedlr.AdamW(ours.parameters(), lr=1e-3, weight_decay=0.0, schedule=hf_linear(3, 12))
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.0)
    used, ref_used = record_lrs(opt), record_lrs(ref_opt)
    ours_trainer = trainer(ours, (opt, opt.as_lr_scheduler()))
    ref_trainer = trainer(ref, (ref_opt, None))  # Trainer's own LambdaLR, "linear" with 3 warmup steps
    ours_trainer.train()
    ref_trainer.train()
    assert used == pytest.approx(ref_used, rel=1e-12, abs=1e-18)
    assert used == pytest.approx([1e-3 * (k / 3 if k < 3 else (12 - k) / 9) for k in range(12)], rel=1e-12)
    # Trainer logs get_last_lr() between the optimizer's step and the scheduler's: the lr used
    assert logged_lrs(ours_trainer) == pytest.approx(used, rel=1e-12, abs=1e-18)
    assert logged_lrs(ref_trainer) == pytest.approx(ref_used, rel=1e-12, abs=1e-18)
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL)


def test_hf_trainer_scheduling_a_group_without_a_schedule(tmp_path):
    """fusedlr without a schedule under Trainer's own scheduler: torch's behaviour, exactly."""
    model, trainer = hf_setup(tmp_path)
    ours, ref = model(), model()
    opt = fusedlr.AdamW(ours.parameters(), lr=1e-3, weight_decay=0.0)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.0)
    used, ref_used = record_lrs(opt), record_lrs(ref_opt)
    trainer(ours, (opt, None)).train()
    trainer(ref, (ref_opt, None)).train()
    assert used == pytest.approx(ref_used, rel=1e-15, abs=1e-18) and used[3] == 1e-3
    assert len({id(opt._lists.plan)}) == 1
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL)


def test_hf_trainer_scheduler_on_top_of_a_schedule_raises(tmp_path):
    model, trainer = hf_setup(tmp_path)
    ours = model()
    opt = fusedlr.AdamW(ours.parameters(), lr=1e-3, schedule=S.CosineAnnealingLR(T_max=12))
    with pytest.raises(LRConflictError, match="as_lr_scheduler"):
        trainer(ours, (opt, None)).train()


def test_hf_trainer_resume_is_exact(tmp_path):
    model, trainer = hf_setup(tmp_path)
    straight, first = model(), model()

    def make(m):
        opt = fusedlr.AdamW(m.parameters(), lr=1e-3, weight_decay=0.0, schedule=hf_linear(3, 12))
        return opt, opt.as_lr_scheduler()

    trainer(straight, make(straight)).train()
    trainer(first, make(first), save_strategy="steps", save_steps=5).train()
    resumed = model()
    resumed_trainer = trainer(resumed, make(resumed))
    resumed_trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-5"))
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_hf_trainer_feeds_its_eval_metric_to_an_on_device_greedy_schedule(tmp_path):
    """lr_scheduler_type="greedy": Trainer steps HF's GreedyLR with the eval loss after each
    evaluation; fusedlr's GreedyLR gets the same metric through as_lr_scheduler()."""
    transformers = pytest.importorskip("transformers")
    model, _ = hf_setup(tmp_path)
    tokens = torch.randint(0, 97, (48, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": t, "labels": t} for t in tokens]
    greedy = dict(factor=0.5, patience=1, min_lr=1e-5, max_lr=4e-3)

    def trainer(m, optimizers):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4, per_device_eval_batch_size=8,
            logging_steps=1, eval_strategy="steps", eval_steps=1, metric_for_best_model="loss", report_to=[],
            use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True, save_strategy="no",
            lr_scheduler_type="greedy", lr_scheduler_kwargs=greedy)
        return transformers.Trainer(model=m, args=args, train_dataset=data, eval_dataset=data[:8],
                                    optimizers=optimizers)

    ours, ref = model(), model()
    opt = fusedlr.AdamW(ours.parameters(), lr=1e-3, weight_decay=0.0, schedule=S.from_hf("greedy", **greedy))
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.0)
    used, ref_used = record_lrs(opt), record_lrs(ref_opt)
    ours_trainer = trainer(ours, (opt, opt.as_lr_scheduler()))
    ref_trainer = trainer(ref, (ref_opt, None))  # Trainer's own HF GreedyLR
    ours_trainer.train()
    ref_trainer.train()
    assert len(used) == 12 and used == pytest.approx(ref_used, rel=1e-12)
    assert len(set(used)) >= 3, used  # the eval losses moved the lr
    assert [e["learning_rate"] for e in ours_trainer.state.log_history if "learning_rate" in e] == pytest.approx(
        used, rel=1e-12)
    # at lrs up to 4e-3, elements whose gradients sit near zero take Adam steps of either sign from
    # last-bit differences (up to ~1e-5 here); a wrong lr at any step would move most elements by ~lr
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=5e-3 * max(used))


# ---------------------------------------------------------------------------------------------
# Lightning


def lightning_run(precision, make_optimizers, steps=10, checkpoint_to=None, resume_from=None):
    pl = pytest.importorskip("lightning.pytorch")

    class Model(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

        def training_step(self, batch, _):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x).float(), y)
            self.log("train_loss", loss)  # what a ReduceLROnPlateau-like scheduler monitors
            return loss

        def configure_optimizers(self):
            return make_optimizers(self.parameters())

    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 8, generator=gen), torch.randn(64, 1, generator=gen)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    logger = _memory_logger()
    model = Model()
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", precision=precision, logger=logger,
                         callbacks=[pl.callbacks.LearningRateMonitor(logging_interval="step")],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         log_every_n_steps=1)
    trainer.fit(model, loader, ckpt_path=resume_from)
    if checkpoint_to is not None:
        trainer.save_checkpoint(checkpoint_to)
    return model, logger.lrs


def _memory_logger():
    """A Lightning logger that keeps the lrs LearningRateMonitor logs, as floats when logged."""
    from lightning.pytorch.loggers.logger import Logger

    class MemoryLogger(Logger):
        name, version = "memory", 0

        def __init__(self):
            super().__init__()
            self.lrs = []

        def log_hyperparams(self, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            self.lrs += [float(v) for k, v in metrics.items() if k.startswith("lr-")]

    return MemoryLogger()


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_fit_logs_the_lr_used_and_equals_torch(precision):
    schedule = S.OneCycleLR(max_lr=0.05, total_steps=10)
    used_box = {}

    def ours(params):
        opt = fusedlr.AdamW(params, lr=0.05, weight_decay=0.01, schedule=schedule)
        used_box["used"] = record_lrs(opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": opt.as_lr_scheduler(), "interval": "step"}}

    def ref(params):
        opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.01)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": S.torch_scheduler(schedule, opt), "interval": "step"}}

    model, logged = lightning_run(precision, ours)
    ref_model, ref_logged = lightning_run(precision, ref)
    expected = [schedule(k, 0.05) for k in range(10)]
    assert used_box["used"] == pytest.approx(expected, rel=1e-12)
    # LearningRateMonitor reads group["lr"] before each step: the lr that step uses
    assert logged == pytest.approx(expected, rel=1e-12)
    assert ref_logged == pytest.approx(expected, rel=1e-12)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL)


def test_lightning_hands_the_monitored_metric_to_an_on_device_plateau_schedule():
    """Lightning steps a ReduceLROnPlateau scheduler with the monitored metric; as_lr_scheduler()
    of an optimizer with a metric-driven schedule is one, so the schedule on the device sees it."""
    schedule = S.ReduceLROnPlateau(patience=1, factor=0.5, threshold=0.05)
    used_box = {}

    def ours(params):
        opt = fusedlr.AdamW(params, lr=0.05, weight_decay=0.01, schedule=schedule)
        used_box["used"] = record_lrs(opt)
        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": opt.as_lr_scheduler(), "interval": "step", "monitor": "train_loss"}}

    def ref(params):
        opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.01)
        used_box["ref"] = record_lrs(opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": S.torch_scheduler(schedule, opt), "interval": "step",
                                                    "monitor": "train_loss"}}

    model, logged = lightning_run("32-true", ours, steps=16)
    ref_model, _ = lightning_run("32-true", ref, steps=16)
    used = used_box["used"]
    assert used == pytest.approx(used_box["ref"], rel=1e-12)
    assert len(set(used)) >= 2, used  # some plateau reduced the lr
    assert logged == pytest.approx(used, rel=1e-12)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# timm


def timm_steps_alike(ours, opt, ref, ref_opt, ref_sched, steps: int, seed: int) -> None:
    """`steps` steps of a model under fusedlr and its copy under timm's optimizer and scheduler
    (stepped per update), on the same random images: every group's lr equal before each step,
    the parameters alike at the end."""
    gen = torch.Generator().manual_seed(seed)
    for k in range(steps):
        for group, ref_group in zip(opt.param_groups, ref_opt.param_groups):
            assert float(group["lr"]) == pytest.approx(ref_group["lr"], rel=1e-12)
        x = torch.randn(4, 3, 8, 8, generator=gen)
        for m, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
        ref_sched.step_update(k + 1)
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL)


def test_timm_layer_decay_groups_run_at_their_lr_scale():
    """timm's create_optimizer_v2(layer_decay=...) groups carry lr_scale; timm's own scheduler
    multiplies each group's lr by it. fusedlr with the twin schedule runs the same lrs and steps."""
    timm = pytest.importorskip("timm")
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    def model():
        torch.manual_seed(0)
        return timm.models.vision_transformer.VisionTransformer(img_size=8, patch_size=4, embed_dim=16, depth=3,
                                                                num_heads=2, num_classes=3)

    ours, ref = model(), model()
    ref_opt = create_optimizer_v2(ref, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    groups = create_optimizer_v2(ours, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5).param_groups
    scales = sorted({g["lr_scale"] for g in groups})
    assert len(scales) >= 4 and scales[0] < 0.1  # several depths, really scaled
    steps = 12
    opt = fusedlr.AdamW([{k: v for k, v in g.items() if k in ("params", "lr", "weight_decay", "lr_scale")}
                         for g in groups], lr=1e-3, schedule=S.CosineAnnealingLR(T_max=steps, eta_min=1e-5))
    ref_sched = CosineLRScheduler(ref_opt, t_initial=steps, lr_min=1e-5, t_in_epochs=False)
    timm_steps_alike(ours, opt, ref, ref_opt, ref_sched, steps, seed=2)
    assert not math.isclose(float(opt.param_groups[0]["lr"]), float(opt.param_groups[-1]["lr"]))


def test_timm_groups_copied_after_their_scheduler_run_at_the_base_lr():
    """A timm scheduler built on the optimizer first (to convert it with from_timm) moves each
    group's base lr to initial_lr and sets lr to its warmup's; groups copied as the README copies
    them (initial_lr too) run timm's lrs from the base lr, not from the warmup's."""
    timm = pytest.importorskip("timm")
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    def model():
        torch.manual_seed(0)
        return timm.models.vision_transformer.VisionTransformer(img_size=8, patch_size=4, embed_dim=16, depth=2,
                                                                num_heads=2, num_classes=3)

    def timm_pair(m):
        o = create_optimizer_v2(m, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
        return o, CosineLRScheduler(o, t_initial=10, lr_min=1e-5, warmup_t=3, warmup_lr_init=1e-6, t_in_epochs=False)

    ours, ref = model(), model()
    ref_opt, ref_sched = timm_pair(ref)
    timm_opt, timm_sched = timm_pair(ours)
    assert all(g["lr"] != g["initial_lr"] for g in timm_opt.param_groups)  # the warmup's lr, as the case needs
    opt = fusedlr.AdamW([{k: g[k] for k in ("params", "lr", "initial_lr", "weight_decay", "lr_scale") if k in g}
                         for g in timm_opt.param_groups], schedule=S.from_timm(timm_sched))
    timm_steps_alike(ours, opt, ref, ref_opt, ref_sched, 10, seed=3)


def test_lightning_resume_continues_as_torch(tmp_path):
    """Checkpointed and resumed by Lightning, fusedlr continues as torch's AdamW with its twin
    scheduler resumed the same way, at the schedule's lrs. (Lightning's resumed fit is not the
    uninterrupted one, for torch's optimizer too, so the run to match is torch's resumed one.)"""
    schedule = S.OneCycleLR(max_lr=0.05, total_steps=16)

    def ours(params):
        opt = fusedlr.AdamW(params, lr=0.05, schedule=schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": opt.as_lr_scheduler(), "interval": "step"}}

    def ref(params):
        opt = torch.optim.AdamW(params, lr=0.05)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": S.torch_scheduler(schedule, opt), "interval": "step"}}

    resumed = {}
    for name, make in (("ours", ours), ("torch", ref)):
        lightning_run("32-true", make, steps=8, checkpoint_to=tmp_path / f"{name}.ckpt")
        resumed[name] = lightning_run("32-true", make, steps=16, resume_from=tmp_path / f"{name}.ckpt")
    (model, lrs), (ref_model, ref_lrs) = resumed["ours"], resumed["torch"]
    assert lrs == pytest.approx([schedule(k, 0.05) for k in range(8, 16)], rel=1e-12)
    assert ref_lrs == pytest.approx(lrs, rel=1e-12)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL)
