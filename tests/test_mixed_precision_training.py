"""fp16 training on the CPU: autocast to float16 with ``torch.amp.GradScaler``, the steps the scaler
skips for overflowing gradients, what the run reports about them, the scaler in checkpoints, and
``trainer.amp=auto``."""
import json
import math
import types
import warnings

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cli import assert_ok, run_tool_in_process, tiny
from deformable_detr.engine import precision as precision_module
from deformable_detr.engine.checkpoint import find_resume
from deformable_detr.engine.optim import build_optimizer, build_scheduler
from deformable_detr.engine.precision import resolve_amp
from deformable_detr.engine.progress import TrainingProgress
from deformable_detr.engine.train_step import StepResult, TrainStep
from deformable_detr.engine.trainer import Trainer, TrainerSettings, TrainingData, TrainingParts
from deformable_detr.models import HungarianMatcher, SetCriterion, loss_weights
from model_builders import one_box_batches, tiny_model

CPU = torch.device("cpu")
# a scale under which float16 gradients overflow at once; one backoff brings it to 2**10, where they do not
OVERFLOWING = {"init_scale": 2.0**40, "backoff_factor": 2.0**-30}


def parts(fused=True):
    torch.manual_seed(0)
    model = tiny_model()
    criterion = SetCriterion(10, HungarianMatcher(), loss_weights(num_decoder_layers=2))
    optimizer = build_optimizer(model, lr=1e-3, lr_backbone=1e-3, fused=fused)
    return model, criterion, optimizer, build_scheduler(optimizer, iters_per_epoch=100)


def batches(count, size=64):
    return one_box_batches(range(count), size)


def parameters(model):
    # parameters only: BatchNorm statistics change with every forward pass
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def changed(model, before):
    return any(not torch.equal(v, before[k]) for k, v in model.named_parameters())


def test_fp16_steps_train_through_the_scaler():
    model, criterion, optimizer, scheduler = parts()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    step = TrainStep(model, criterion, optimizer, scheduler, CPU, amp="fp16", scaler=scaler)
    dtypes = []
    model.class_embed[-1].register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    for images, masks, targets in batches(2):
        before = parameters(model)
        result = step(images, masks, targets)
        assert math.isfinite(result.values["loss"]) and math.isfinite(result.values["grad_norm"])
        assert changed(model, before)
    assert set(dtypes) == {torch.float16}
    # two steps without overflow, growth_interval=2: the scaler saw finite gradients and doubled its scale
    assert scaler.get_scale() == 2.0**9 and scheduler.last_epoch == 2
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


def test_the_reported_gradient_norm_is_unscaled():
    norms = []
    for scale in (2.0**4, 2.0**10):
        model, criterion, optimizer, scheduler = parts()
        step = TrainStep(model, criterion, optimizer, scheduler, CPU, amp="fp16", scaler=torch.amp.GradScaler("cpu", init_scale=scale))
        norms.append(float(step(*next(batches(1))).values["grad_norm"]))
    assert norms[0] == pytest.approx(norms[1], rel=1e-3)


# the fused AdamW skips inside its kernel (the scaler hands it the overflow flag), the other is not called
@pytest.mark.parametrize("fused", [True, False])
def test_a_step_with_overflowing_gradients_is_skipped_by_the_scaler(fused):
    model, criterion, optimizer, scheduler = parts(fused)
    scaler = torch.amp.GradScaler("cpu", **OVERFLOWING)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    step = TrainStep(model, criterion, optimizer, scheduler, CPU, amp="fp16", scaler=scaler, ema=ema)
    data = batches(3)
    before = parameters(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = step(*next(data))
    assert math.isfinite(result.values["loss"]) and not math.isfinite(result.values["grad_norm"])
    assert not changed(model, before) and scaler.get_scale() == 2.0**10
    assert all(float(state["step"]) == 0 for state in optimizer.state.values())  # Adam's bias correction counts no step
    # the schedule keeps counting steps, without torch's warning about a scheduler ahead of its optimizer
    assert scheduler.last_epoch == 1 and not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    # the EMA averaged the unchanged weights: still finite, equal to them
    assert int(ema.n_averaged) == 1 and all(torch.equal(p, before[k]) for k, p in ema.module.named_parameters())
    for images, masks, targets in data:
        before = parameters(model)
        result = step(images, masks, targets)
        assert math.isfinite(result.values["grad_norm"]) and changed(model, before)
    assert scaler.get_scale() == 2.0**10 and scheduler.last_epoch == 3
    assert {float(state["step"]) for state in optimizer.state.values()} == {2.0}
    assert all(torch.isfinite(p).all() for p in list(model.parameters()) + list(ema.module.parameters()))


def test_a_skipped_steps_gradient_norm_stays_out_of_the_epochs_averages():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    progress = TrainingProgress(total_steps=3, steps_per_epoch=3, log_every=1, bar=False)
    progress.start_epoch(epoch=0, epoch_step=0)
    for step, norm in enumerate([2.0, float("inf"), 4.0], start=1):
        progress.update(StepResult({"loss": torch.tensor(1.0), "grad_norm": torch.tensor(norm)}, images=1), step, step, optimizer)
        assert "grad_norm inf" not in progress.line(step, step) and "grad_norm nan" not in progress.line(step, step)
    averages = progress.end_epoch()
    assert averages["grad_norm"] == 3.0 and averages["loss"] == 1.0


class Loader(list):
    """Fixed training batches, with the hooks the trainer positions a loader by."""

    batch_size = 1
    dataset = sampler = types.SimpleNamespace(set_epoch=lambda epoch, start=0: None)


def fp16_trainer(run_dir, scaler, epochs=1):
    model, criterion, optimizer, scheduler = parts()
    return Trainer(TrainingParts(model, criterion, None, optimizer, scheduler, scaler=scaler), TrainingData(Loader(batches(2))),
                   TrainerSettings(epochs=epochs, amp="fp16", log_every=1), str(run_dir), CPU)


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory):
    """A one-epoch fp16 run of two steps whose first step overflows."""
    run_dir = tmp_path_factory.mktemp("fp16_run")
    trainer = fp16_trainer(run_dir, torch.amp.GradScaler("cpu", **OVERFLOWING))
    trainer.fit()
    return run_dir, trainer


def test_an_epoch_with_a_skipped_step_logs_a_finite_gradient_norm(fp16_run):
    run_dir, trainer = fp16_run
    (entry,) = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert entry["epoch"] == 0 and math.isfinite(entry["train_grad_norm"]) and math.isfinite(entry["train_loss"])
    assert trainer.history[0]["train_grad_norm"] == entry["train_grad_norm"]


def test_resume_restores_the_scalers_state(fp16_run):
    run_dir, _ = fp16_run
    checkpoint = find_resume(str(run_dir))
    assert checkpoint["scaler"]["scale"] == 2.0**10 and checkpoint["scaler"]["_growth_tracker"] == 1
    scaler = torch.amp.GradScaler("cpu")
    fp16_trainer(run_dir, scaler, epochs=2).load_state_dict(checkpoint)
    assert scaler.get_scale() == 2.0**10 and scaler.state_dict() == checkpoint["scaler"]


def test_train_builds_a_scaler_for_fp16_on_the_cpu(tmp_path):
    run = tmp_path / "run"
    assert_ok(run_tool_in_process("train", *tiny(run, tmp_path / "data", "trainer.epochs=1", "trainer.amp=fp16")))
    scaler = torch.load(run / "checkpoint_last.pth", weights_only=True)["scaler"]
    # 4 steps: the scaler backed off from its default 2**16 for overflowing ones, or counted 4 finite ones
    assert scaler["scale"] < 2.0**16 or scaler["_growth_tracker"] == 4
    entries = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert math.isfinite(entries[0]["train_grad_norm"]) and "val_AP" in entries[1]


@pytest.mark.parametrize("supported, expected", [(True, "bf16"), (False, None)])
def test_auto_amp_on_a_gpu_follows_its_bf16_support(monkeypatch, supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: supported)
    assert resolve_amp("auto", torch.device("cuda")) == expected
    assert resolve_amp("auto", torch.device("cuda", 1)) == expected


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, None)])
def test_auto_amp_on_the_cpu_follows_its_bf16_instructions(monkeypatch, native, expected):
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: native)
    assert resolve_amp("auto", CPU) == expected


def test_explicit_amp_settings_are_kept(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert [resolve_amp(amp, torch.device("cuda")) for amp in (None, "bf16", "fp16")] == [None, "bf16", "fp16"]
