"""Training-engine pieces: the step loop's guards, parameter groups, schedule, checkpoint files."""
import os

import pytest
import torch

from deformable_detr.engine.checkpoint import CheckpointKeeper, find_resume, save_atomic
from deformable_detr.engine.optim import build_optimizer, build_scheduler, param_groups
from deformable_detr.engine.train_step import NonFiniteLossError, TrainStep
from deformable_detr.models import HungarianMatcher, SetCriterion, loss_weights
from model_builders import one_box_batches, tiny_model


class Poisoned(torch.nn.Module):
    """Wraps a detector; makes the logits NaN for the batches whose first image id is listed."""

    def __init__(self, model, poisoned_ids):
        super().__init__()
        self.model = model
        self.poisoned_ids = set(poisoned_ids)
        self.current = None

    def forward(self, images, masks):
        out = self.model(images, masks)
        if self.current in self.poisoned_ids:
            out["pred_logits"] = out["pred_logits"] * float("nan")
        return out


class Loader:
    """Sets ``model.current`` to the image id of the batch it yields."""

    def __init__(self, model, image_ids):
        self.model, self.image_ids = model, image_ids

    def __iter__(self):
        for images, masks, targets in one_box_batches(self.image_ids):
            self.model.current = int(targets[0]["image_id"])
            yield images, masks, targets


def run_steps(model, criterion, loader, optimizer, scheduler, after_step=None, **options):
    """What the trainer does with a loader: one TrainStep call per batch, counting the steps."""
    train_step = TrainStep(model, criterion, optimizer, scheduler, torch.device("cpu"), **options)
    steps = 0
    for images, masks, targets in loader:
        train_step(images, masks, targets)
        steps += 1
        if after_step is not None:
            after_step(steps)
    return steps


def setup(poisoned_ids):
    torch.manual_seed(0)
    model = Poisoned(tiny_model(), poisoned_ids)
    criterion = SetCriterion(10, HungarianMatcher(), loss_weights(num_decoder_layers=2))
    optimizer = build_optimizer(model.model, lr=1e-3, lr_backbone=1e-3)
    scheduler = build_scheduler(optimizer, iters_per_epoch=100)
    return model, criterion, optimizer, scheduler


def test_a_non_finite_loss_skips_the_step_and_counts_it():
    model, criterion, optimizer, scheduler = setup(poisoned_ids=[2])
    seen = []

    def after_step(step):
        seen.append(step)
        # parameters only: BatchNorm statistics are updated by every forward pass
        if step == 1:
            after_step.after_first = {k: v.detach().clone() for k, v in model.named_parameters()}
        if step == 2:
            assert all(torch.equal(v, after_step.after_first[k]) for k, v in model.named_parameters())

    run_steps(model, criterion, Loader(model, [1, 2, 3]), optimizer, scheduler, after_step)
    assert seen == [1, 2, 3] and scheduler.last_epoch == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_too_many_non_finite_steps_in_a_row_abort_naming_the_images():
    model, criterion, optimizer, scheduler = setup(poisoned_ids=[5, 6, 7])
    with pytest.raises(NonFiniteLossError, match=r"3 steps in a row .*images 7 \(seven.png\)"):
        run_steps(
            model, criterion, Loader(model, [4, 5, 6, 7, 8]), optimizer, scheduler,
            max_nonfinite_steps=3, describe_images=lambda ids: ", ".join(f"{i} (seven.png)" for i in ids),
        )


def test_an_empty_batch_is_skipped_in_a_single_process():
    model, criterion, optimizer, scheduler = setup(poisoned_ids=[])
    empty = (torch.zeros(0, 3, 64, 64), torch.zeros(0, 64, 64, dtype=torch.bool), [])
    loader = [empty] + list(one_box_batches([1]))
    steps = []
    run_steps(model, criterion, loader, optimizer, scheduler, steps.append)
    assert steps == [1, 2] and scheduler.last_epoch == 2


def test_parameter_groups_follow_the_official_recipe():
    model = tiny_model()
    groups = {g["name"]: g for g in param_groups(model, lr=2e-4, lr_backbone=2e-5, lr_linear_proj_mult=0.1)}
    names = {id(p): n for n, p in model.named_parameters()}
    assert groups["backbone"]["lr"] == 2e-5 and all(names[id(p)].startswith("backbone.") for p in groups["backbone"]["params"])
    assert groups["linear_proj"]["lr"] == pytest.approx(2e-5)
    linear = {names[id(p)] for p in groups["linear_proj"]["params"]}
    assert linear and all("sampling_offsets" in n or "reference_points" in n for n in linear)
    assert "transformer.reference_points.weight" in linear
    assert groups["default"]["lr"] == 2e-4
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    grouped = {names[id(p)] for g in groups.values() for p in g["params"]}
    assert grouped.isdisjoint(frozen) and len(grouped) + len(frozen) == len(names)


def test_schedule_steps_at_epoch_milestones_after_warmup():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = build_scheduler(optimizer, iters_per_epoch=10, milestones=[2, 3], gamma=0.1, warmup_iters=4)
    rates = []
    for _ in range(40):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert rates[19] == pytest.approx(1.0) and rates[20] == pytest.approx(0.1) and rates[30] == pytest.approx(0.01)


def test_atomic_save_never_leaves_a_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_last.pth"
    save_atomic({"step": 1}, str(path))

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError):
        save_atomic({"step": 2}, str(path))
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["checkpoint_last.pth"]


def test_resume_falls_back_to_the_newest_readable_checkpoint(tmp_path):
    keeper = CheckpointKeeper(str(tmp_path), keep_every=1)
    state = {"model": {}, "optimizer": {}, "scheduler": {}, "epoch": 1, "step": 10}
    keeper.save(state, finished_epoch=0, is_best=False)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_epoch0000.pth", "checkpoint_last.pth"]
    (tmp_path / "checkpoint_last.pth").write_bytes(b"PK\x03\x04 damaged")
    found = find_resume(str(tmp_path))
    assert found["path"].endswith("checkpoint_epoch0000.pth") and found["step"] == 10
    assert find_resume(str(tmp_path / "empty")) is None


def test_bf16_autocast_trains_in_float32_weights():
    model, criterion, optimizer, scheduler = setup(poisoned_ids=[])
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    run_steps(model, criterion, Loader(model, [1, 2]), optimizer, scheduler, amp="bf16")
    after = dict(model.named_parameters())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in after.values())
    assert not torch.equal(after["model.class_embed.0.weight"], before["model.class_embed.0.weight"])


def test_native_bf16_detection_agrees_with_the_cpu_flags():
    from deformable_detr.engine.precision import cpu_has_native_bf16

    try:
        with open("/proc/cpuinfo") as handle:
            flags = set(next(line for line in handle if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags on this system")
    assert cpu_has_native_bf16() == bool({"avx512_bf16", "amx_tile"} & flags)


def test_progress_reports_the_whole_runs_remaining_time_and_draws_a_bar(caplog, capsys):
    import logging

    from deformable_detr.engine.progress import TrainingProgress
    from deformable_detr.engine.train_step import StepResult

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    progress = TrainingProgress(total_steps=20, steps_per_epoch=4, log_every=2, bar=True)
    progress.evaluation_seconds, progress.remaining_evaluations = 100.0, 3
    progress.start_epoch(epoch=1, epoch_step=0)
    with caplog.at_level(logging.INFO, logger="deformable_detr.engine.progress"):
        for step in range(1, 5):
            progress.meter._last -= 1.0  # each step "took" a second more
            progress.update(StepResult({"loss": torch.tensor(2.0)}, images=2), step=4 + step, epoch_step=step, optimizer=optimizer)
    averages = progress.end_epoch()
    lines = [r.getMessage() for r in caplog.records]
    # the first step at once, then every log_every steps
    assert len(lines) == 3 and lines[0].startswith("[epoch 1] 1/4 eta 0:00:03 (run 0:05:")
    assert lines[1].startswith("[epoch 1] 2/4 eta 0:00:02 (run 0:05:")
    assert " img/s max_mem " in lines[1] and " MiB loss 2 " in lines[1]
    # 14 steps of the run left at about a second each, plus 3 evaluations of 100 s
    assert lines[2].startswith("[epoch 1] 4/4 eta 0:00:00 (run 0:05:1")
    assert averages["loss"] == 2.0 and "epoch 1: 100%" in capsys.readouterr().err
