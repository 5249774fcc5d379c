"""The progress line shows the loss and each weighted loss term the criterion reports, whatever
its terms are called: a new term appears there without the engine naming it."""
import logging
import types

import torch

from deformable_detr.engine.optim import build_optimizer, build_scheduler
from deformable_detr.engine.progress import TrainingProgress, headline_terms
from deformable_detr.engine.train_step import StepResult
from deformable_detr.engine.trainer import Trainer, TrainerSettings, TrainingData, TrainingParts
from deformable_detr.models import HungarianMatcher, SetCriterion, loss_weights
from model_builders import tiny_model

CPU = torch.device("cpu")


def metrics_of(line):
    """The names of a progress line's values, in order: ``... MiB loss 2 loss_ce 1 ...`` -> [loss, loss_ce, ...]."""
    return line.split(" MiB ", 1)[1].split()[::2]


def report(progress, values):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    progress.start_epoch(epoch=0, epoch_step=0)
    progress.update(StepResult({k: torch.tensor(v) for k, v in values.items()}, images=1), step=1, epoch_step=1, optimizer=optimizer)
    return progress.line(1, 1)


def test_the_final_layers_terms_are_headlines_and_auxiliary_copies_are_not():
    weights = loss_weights(num_decoder_layers=6, aux_loss=True, two_stage=True)
    assert headline_terms(weights) == ["loss_ce", "loss_bbox", "loss_giou"]
    assert headline_terms({**weights, "loss_extra": 1.0, "loss_extra_0": 1.0, "loss_extra_enc": 1.0}) == [
        "loss_ce", "loss_bbox", "loss_giou", "loss_extra"]


def test_a_new_weighted_term_appears_between_the_loss_and_the_other_values():
    weights = {**loss_weights(num_decoder_layers=2), "loss_extra": 0.5, "loss_extra_0": 0.5}
    progress = TrainingProgress(total_steps=1, steps_per_epoch=1, bar=False, loss_terms=headline_terms(weights))
    values = {"loss": 2.0, "loss_ce": 1.0, "loss_bbox": 0.5, "loss_giou": 0.25, "loss_extra": 0.125, "loss_extra_0": 0.25,
              "loss_ce_0": 1.0, "class_error": 50.0, "cardinality_error": 3.0, "grad_norm": 4.0}
    assert metrics_of(report(progress, values)) == ["loss", "loss_ce", "loss_bbox", "loss_giou", "loss_extra", "class_error", "grad_norm", "lr"]


def test_without_the_criterions_weights_every_final_layer_loss_value_is_shown():
    progress = TrainingProgress(total_steps=1, steps_per_epoch=1, bar=False)
    values = {"loss": 2.0, "loss_extra": 0.125, "loss_extra_0": 0.25, "loss_ce": 1.0, "grad_norm": 4.0}
    assert metrics_of(report(progress, values)) == ["loss", "loss_ce", "loss_extra", "grad_norm", "lr"]


class ExtraTermCriterion(SetCriterion):
    """The set criterion with one more weighted term, ``loss_extra``: the predicted boxes' mean size."""

    def forward(self, outputs, targets, num_boxes=None):
        losses = super().forward(outputs, targets, num_boxes=num_boxes)
        losses["loss_extra"] = outputs["pred_boxes"][..., 2:].mean()
        return losses


class Loader(list):
    """Fixed training batches, with the hooks the trainer positions a loader by."""

    batch_size = 1
    dataset = sampler = types.SimpleNamespace(set_epoch=lambda epoch, start=0: None)


def batches(count, size=64):
    generator = torch.Generator().manual_seed(0)
    for image_id in range(count):
        target = {"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4]]), "labels": torch.tensor([3]), "image_id": torch.tensor(image_id)}
        yield torch.randn(1, 3, size, size, generator=generator), torch.zeros(1, size, size, dtype=torch.bool), [target]


def test_a_training_run_logs_a_criterions_new_term(tmp_path, caplog):
    torch.manual_seed(0)
    model = tiny_model()
    criterion = ExtraTermCriterion(10, HungarianMatcher(), {**loss_weights(num_decoder_layers=2), "loss_extra": 0.1})
    optimizer = build_optimizer(model, lr=1e-4, lr_backbone=1e-5)
    parts = TrainingParts(model, criterion, None, optimizer, build_scheduler(optimizer, iters_per_epoch=2))
    trainer = Trainer(parts, TrainingData(Loader(batches(2))), TrainerSettings(epochs=1, log_every=1), str(tmp_path), CPU)
    with caplog.at_level(logging.INFO, logger="deformable_detr.engine.progress"):
        trainer.fit()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[epoch 0]")]
    assert len(lines) == 2
    assert all(metrics_of(line) == ["loss", "loss_ce", "loss_bbox", "loss_giou", "loss_extra", "class_error", "grad_norm", "lr"]
               for line in lines), lines
    assert "train_loss_extra" in trainer.history[0]
