"""What a training run reports: the progress line, TensorBoard scalars and pictures, the JSON log
(``log.jsonl``) and each evaluation's ``metrics.json`` and ``predictions.json``."""
import json
import logging
import math
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

import torch

from ..evaluation.coco_evaluator import CocoEvaluation
from ..utils import distributed
from ..utils.atomic_files import write_json_atomic
from ..utils.memory import peak_memory_mib
from .compilation import compiled_graphs
from .evaluation_pictures import EvaluationPictures
from .progress import TrainingProgress, headline_terms
from .train_step import StepResult

if TYPE_CHECKING:
    from .trainer import TrainerSettings, TrainingData

logger = logging.getLogger(__name__)


class Reporter:
    """Reports a run to the log, TensorBoard (``writer``, main process) and files in ``run_dir``
    (main process); the trainer says what happened, this says it.

    Args:
        run_dir: receives ``log.jsonl`` (one line per epoch and per evaluation), ``metrics.json``
            and ``predictions.json`` (the last evaluation's).
        settings: the run's ``TrainerSettings`` (epochs, log_every, amp, compile, tensorboard_images,
            score_threshold).
        data: the run's ``TrainingData``: training images are named by their file names, the
            validation set's first images are drawn.
        steps_per_epoch: optimizer steps per epoch.
        optimizer: whose learning rates are reported.
        criterion: the progress line shows its weighted final-layer terms (``weight_dict``; see
            ``progress.headline_terms``).
        weights: the detector evaluations use, unwrapped; ``ema``: whether those are EMA weights.
        device: whose peak memory is reported.
        writer: a TensorBoard SummaryWriter, or None (other processes than the main one).
    """

    def __init__(self, run_dir: str, settings: "TrainerSettings", data: "TrainingData", *, steps_per_epoch: int,
                 optimizer: torch.optim.Optimizer, criterion: torch.nn.Module, weights: torch.nn.Module, ema: bool,
                 device: torch.device, writer=None):
        self.run_dir, self.settings, self.optimizer, self.device, self.writer = run_dir, settings, optimizer, device, writer
        self.train_dataset = data.train_loader.dataset
        self.val_dataset = getattr(data.val_loader, "dataset", None)
        self.ema = ema
        weight_dict = getattr(criterion, "weight_dict", None)
        self.progress = TrainingProgress(settings.epochs * steps_per_epoch, steps_per_epoch, log_every=settings.log_every,
                                         device=device, loss_terms=headline_terms(weight_dict) if weight_dict is not None else None)
        self.pictures = None
        if writer is not None and data.val_coco is not None:
            self.pictures = EvaluationPictures(writer, settings.tensorboard_images, settings.score_threshold, data.val_coco,
                                               getattr(self.val_dataset, "layout", None), weights)
        self.first_step_reported = False
        self.epoch_started = self.evaluation_started = time.perf_counter()

    def describe_images(self, image_ids: List[int]) -> str:
        """Training images by id and file name, e.g. ``12 (000012.jpg), 40 (000040.jpg)``."""
        coco = getattr(self.train_dataset, "coco", None)
        if coco is None:
            return ", ".join(map(str, image_ids))
        return ", ".join(f"{i} ({coco.imgs[i]['file_name']})" if i in coco.imgs else str(i) for i in image_ids)

    # -------------------------------------------------------------- training
    def start_epoch(self, epoch: int, epoch_step: int, remaining_evaluations: int) -> None:
        """``epoch`` starts (or continues after ``epoch_step`` steps) with ``remaining_evaluations``
        still to come in the run, counting the one after it."""
        self.progress.start_epoch(epoch, epoch_step)
        self.progress.remaining_evaluations = remaining_evaluations
        self.epoch_started = time.perf_counter()

    def step(self, result: StepResult, step: int, epoch_step: int, seconds: float) -> None:
        """A step took ``seconds``: ``step`` steps done in the run, ``epoch_step`` in the epoch. A
        collective every ``log_every`` steps (the TensorBoard values are averaged over the ranks)."""
        if self.settings.compile and not self.first_step_reported:
            self.first_step_reported = True
            logger.info("first training step: %.1f s (compilation included)", seconds)
        values = self.progress.update(result, step, epoch_step, self.optimizer)
        if values is not None:
            self._training_scalars(values, step)

    def _training_scalars(self, values: Dict[str, float], step: int) -> None:
        reduced = distributed.reduce_dict({k: torch.tensor(v) for k, v in values.items()})
        if self.writer is None:
            return
        for name, value in reduced.items():
            self.writer.add_scalar(f"train/{name}", float(value), step)
        for group in self.optimizer.param_groups:
            self.writer.add_scalar(f"lr/{group.get('name', 'group')}", group["lr"], step)
        self.writer.add_scalar("train/images_per_second", self.progress.meter.images_per_second(), step)
        self.writer.add_scalar("train/max_mem_mib", peak_memory_mib(self.device), step)

    def end_epoch(self, epoch: int, finished: bool) -> Optional[Dict[str, Any]]:
        """``epoch`` ends, ``finished`` or stopped before its last step; for a finished one, its
        entry of the run's history (its duration and average training values), also logged."""
        averages = self.progress.end_epoch()
        if self.settings.compile:
            # a count that grows every epoch would mean recompiling for new image sizes
            logger.info("torch.compile: %d graph(s) compiled so far", compiled_graphs())
        if not finished:
            return None
        skipped = getattr(self.train_dataset, "skipped", None)
        if skipped is not None and skipped.value:
            logger.warning("%d unreadable training images skipped so far (see the warnings above)", skipped.value)
        minutes = (time.perf_counter() - self.epoch_started) / 60
        entry = {"epoch": epoch, "minutes": round(minutes, 3), **{f"train_{k}": v for k, v in averages.items()}}
        self._log_json(entry)
        return entry

    # ------------------------------------------------------------ evaluation
    def start_evaluation(self) -> Optional[Callable]:
        """An evaluation starts; returns the evaluation loop's ``on_batch`` (None: nothing to draw)."""
        self.evaluation_started = time.perf_counter()
        if self.pictures is None:
            return None
        self.pictures.start()
        return self.pictures.collect

    def evaluation(self, evaluation: Optional[CocoEvaluation], epoch: int, step: int) -> Optional[Dict[str, Any]]:
        """The evaluation after ``epoch`` (``step`` steps done) ended; ``evaluation`` is None on other
        processes than the main one. Returns its entry of the run's history, also logged."""
        self.progress.evaluation_seconds = time.perf_counter() - self.evaluation_started
        if evaluation is None:
            return None
        precision = self.settings.amp or "float32"
        logger.info("evaluation after epoch %d (%s, %s):\n%s", epoch, "EMA weights" if self.ema else "weights", precision,
                    evaluation.table)
        entry = {"epoch": epoch, **{f"val_{k}": v for k, v in evaluation.stats.items()}}
        self._log_json(entry)
        # what was measured, as tools/eval.py records it
        measured = {"training": {"epoch": epoch, "step": step, "ema": self.ema}, "precision": precision}
        if hasattr(self.val_dataset, "annotation_file"):
            measured["dataset"] = {"annotations": os.path.abspath(self.val_dataset.annotation_file), "images": len(self.val_dataset)}
        write_json_atomic(os.path.join(self.run_dir, "metrics.json"), dict(evaluation.metrics(), **measured))
        write_json_atomic(os.path.join(self.run_dir, "predictions.json"), evaluation.predictions)
        if self.writer is not None:
            for name, value in evaluation.stats.items():
                self.writer.add_scalar(f"val/{name}", value, step)
            for row in evaluation.category_stats:
                self.writer.add_scalar(f"val_per_category/{row['name']}", row["AP"], step)
            if self.pictures is not None:
                self.pictures.write(step)
            self.writer.flush()
        return entry

    def close(self) -> None:
        """The run stops reporting (finished, stopped or failed): the progress bar is removed and
        TensorBoard's pending events are written."""
        self.progress.close_bar()
        if self.writer is not None:
            self.writer.flush()

    def _log_json(self, entry: Dict[str, Any]) -> None:
        """One line of ``log.jsonl``; NaN and infinities become null, which JSON has no word for."""
        if distributed.is_main_process():
            with open(os.path.join(self.run_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps({k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in entry.items()}) + "\n")
