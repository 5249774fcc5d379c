"""A training run: epochs of training, periodic evaluation, checkpoints, exact resume, clean stops."""
import contextlib
import dataclasses
import logging
import time
from typing import Any, Dict, List, Optional

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..errors import ConfigError
from ..models.weights import recipe_of_model
from ..utils import distributed
from .checkpoint import CheckpointKeeper, check_same_run
from .compilation import check_compiler, compile_detector
from .evaluate_loop import evaluate
from .precision import FP32_PRECISIONS, warn_if_amp_is_emulated
from .reporter import Reporter
from .resume_layout import ProcessLayout, continued_epoch_step
from .rng import rng_state, set_rng_state
from .stop_request import StopRequest, describe_signal
from .train_step import TrainStep, optimizer_step_batches, skip_schedule_step

logger = logging.getLogger(__name__)

COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@dataclasses.dataclass
class TrainerSettings:
    """How a run trains (the recipe's model, data and optimizer live elsewhere).

    epochs: epochs in total. clip_max_norm: gradient clipping (0: off). amp: None, "bf16", "fp16" or
    "auto" (bf16 where the device computes it natively, else None; see ``precision.resolve_amp``).
    eval_every: evaluate every this many epochs (and after the last). checkpoint_every_steps:
    also checkpoint within epochs (0: only at epoch ends). keep_every: keep a copy every this many
    epochs (0: only last and best). log_every: steps between progress lines. max_steps: stop with
    a checkpoint once this many steps are done in total (None: train all epochs); a stop asked
    for, so unlike a signal's it leaves ``stop_signal`` None (the tool exits 0).
    max_nonfinite_steps: consecutive NaN/inf losses before aborting. tensorboard_images: validation
    images drawn with their predictions at each evaluation. score_threshold: of the drawn boxes.
    ema_decay: keep an exponential moving average of the weights with this decay (e.g. 0.9998),
    updated after every optimizer step and used for evaluation (None: off). accumulate_steps:
    batches per optimizer step (gradient accumulation; the schedule counts optimizer steps).
    compile: train and evaluate through ``torch.compile`` of the detector (see
    ``compilation.compile_detector``; the matcher and losses run eagerly). fp32_precision: how
    float32 matrix products and convolutions compute, None (torch's defaults), "ieee", "tf32"
    (CUDA) or "bf16" (CPUs); see ``precision.set_fp32_precision``. metric: the COCO stat that
    picks the best checkpoint and that early stopping watches (AP, AP50, ...).
    early_stopping_patience: stop once this many evaluations in a row have not improved ``metric``
    by more than ``early_stopping_min_delta`` over the best (None: never); the best checkpoint
    holds the best weights (the EMA's, when kept: evaluations use them).
    """

    epochs: int = 50
    clip_max_norm: float = 0.1
    amp: Optional[str] = None
    eval_every: int = 1
    checkpoint_every_steps: int = 0
    keep_every: int = 0
    log_every: int = 20
    max_steps: Optional[int] = None
    max_nonfinite_steps: int = 5
    tensorboard_images: int = 4
    score_threshold: float = 0.3
    ema_decay: Optional[float] = None
    accumulate_steps: int = 1
    compile: bool = False
    fp32_precision: Optional[str] = None
    metric: str = "AP"
    early_stopping_patience: Optional[int] = None
    early_stopping_min_delta: float = 0.0

    def __post_init__(self) -> None:
        if self.eval_every < 1:
            raise ConfigError(f"trainer.eval_every={self.eval_every} must be at least 1 (the last epoch is always evaluated: "
                              "a value above trainer.epochs evaluates only there)")
        if self.metric not in COCO_STATS:
            raise ConfigError(f"trainer.metric={self.metric} is not one of {', '.join(COCO_STATS)}")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ConfigError(f"trainer.early_stopping_patience={self.early_stopping_patience} must be at least 1, or null (never stop early)")
        if self.early_stopping_min_delta < 0:
            raise ConfigError(f"trainer.early_stopping_min_delta={self.early_stopping_min_delta} must be >= 0")
        if self.accumulate_steps < 1:
            raise ConfigError(f"trainer.accumulate_steps={self.accumulate_steps} must be >= 1")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"trainer.ema_decay={self.ema_decay} must be in (0, 1), e.g. 0.9998, or null for no EMA")
        if self.amp not in (None, "bf16", "fp16", "auto"):
            raise ConfigError(f"trainer.amp={self.amp} is not one of null, bf16, fp16, auto")
        if self.fp32_precision is not None and not any(self.fp32_precision in v for v in FP32_PRECISIONS.values()):
            raise ConfigError(f"trainer.fp32_precision={self.fp32_precision} is not one of null, ieee, tf32 (CUDA), bf16 (CPU)")


@dataclasses.dataclass
class TrainingParts:
    """What a run optimizes: ``model`` (the detector, unwrapped), ``train_model`` (the module to
    train with, e.g. its DistributedDataParallel wrapper; default ``model``), the ``criterion``,
    ``postprocess`` for evaluation, and the optimization state (``scaler`` for fp16 only)."""

    model: torch.nn.Module
    criterion: torch.nn.Module
    postprocess: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Optional[torch.amp.GradScaler] = None
    train_model: Optional[torch.nn.Module] = None


@dataclasses.dataclass
class TrainingData:
    """``train_loader``: a DataLoader whose ``sampler`` has ``set_epoch(epoch, start)`` and whose
    dataset has ``set_epoch(epoch)``, dropping the last partial batch. ``val_loader`` and its
    pycocotools ground truth ``val_coco``: evaluation (None: no evaluation)."""

    train_loader: Any
    val_loader: Any = None
    val_coco: Any = None


class Trainer:
    """Owns the state of a run and everything needed to continue it as if never stopped.

    The trainer alone counts steps (``epoch``, ``epoch_step``, ``step``) and decides when to
    evaluate, checkpoint and stop; ``TrainStep`` trains on one batch per call and the ``Reporter``
    reports what happened.

    Args:
        parts, data, settings: what is trained, on what, and how.
        run_dir, device: where.
        writer: TensorBoard SummaryWriter on the main process, else None.
        extra_state: saved in every checkpoint as is (e.g. the composed ``config``).
        seed: of the data loader's worker seeds (reseeded per epoch for exact resume).
    """

    def __init__(self, parts: TrainingParts, data: TrainingData, settings: TrainerSettings, run_dir: str, device: torch.device, *,
                 writer=None, extra_state: Optional[Dict[str, Any]] = None, seed: int = 0):
        self.model = parts.model
        self.train_model = parts.train_model or parts.model
        self.postprocess = parts.postprocess
        self.optimizer, self.scheduler, self.scaler = parts.optimizer, parts.scheduler, parts.scaler
        self.train_loader, self.val_loader, self.val_coco = data.train_loader, data.val_loader, data.val_coco
        self.device = device
        self.settings = settings
        self.extra_state = dict(extra_state or {})
        self.seed = seed
        # the architecture stays as built for the whole run: stamped in every checkpoint, checked on resume
        self.recipe = recipe_of_model(self.model)
        self.keeper = CheckpointKeeper(run_dir, settings.keep_every)
        self.accumulate = settings.accumulate_steps
        self.steps_per_epoch = len(self.train_loader) // self.accumulate
        if self.steps_per_epoch == 0:
            raise ConfigError(f"trainer.accumulate_steps={self.accumulate} is more than the {len(self.train_loader)} batches of an epoch")
        self.batch_size = self.train_loader.batch_size * self.accumulate  # images per process and optimizer step
        # progress: the epoch in progress, steps done in it, steps done in total
        self.epoch = 0
        self.epoch_step = 0
        self.step = 0
        self.best: Optional[float] = None
        # evaluations in a row without an improvement of the metric, and whether that stopped the run
        self.evaluations_without_improvement = 0
        self.stopped_early = False
        # the signal that stopped the run (agreed by all ranks); None when it finished or stopped as asked (max_steps)
        self.stop_signal: Optional[int] = None
        warn_if_amp_is_emulated(settings.amp, device)
        self.history: List[Dict[str, Any]] = []
        self.last_evaluation = None
        self.ema = None
        if settings.ema_decay is not None:
            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(settings.ema_decay), use_buffers=True)
            logger.info("keeping an EMA of the weights (decay %g); evaluations use it", settings.ema_decay)
        # the weights evaluations use (the EMA's when kept), through their own compiled wrapper
        evaluated_weights = self.ema.module if self.ema is not None else self.model
        self.evaluation_model = evaluated_weights
        if settings.compile:
            check_compiler(device, "trainer.compile")
            self.train_model = compile_detector(self.train_model)
            self.evaluation_model = compile_detector(self.evaluation_model)
            logger.info("trainer.compile: training and evaluating through torch.compile (the first step and "
                        "evaluation compile; image sizes are dynamic)")
        self.reporter = Reporter(run_dir, settings, data, steps_per_epoch=self.steps_per_epoch, optimizer=self.optimizer,
                                 criterion=parts.criterion, weights=evaluated_weights, ema=self.ema is not None, device=device, writer=writer)
        self.train_step = TrainStep(
            self.train_model, parts.criterion, self.optimizer, self.scheduler, device, amp=settings.amp, scaler=self.scaler,
            max_norm=settings.clip_max_norm, ema=self.ema, max_nonfinite_steps=settings.max_nonfinite_steps,
            describe_images=self.reporter.describe_images,
        )

    # ----------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        rng = distributed.all_gather_object(rng_state())
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": {"model": self.ema.module.state_dict(), "n_averaged": self.ema.n_averaged} if self.ema is not None else None,
            "epoch": self.epoch,
            "epoch_step": self.epoch_step,
            "step": self.step,
            "world_size": distributed.get_world_size(),
            "batch_size": self.batch_size,
            "rng": rng,
            "recipe": dataclasses.asdict(self.recipe),
            "best": self.best,
            "evaluations_without_improvement": self.evaluations_without_improvement,
            "stopped_early": self.stopped_early,
            "history": self.history,
            **self.extra_state,
        }

    def load_state_dict(self, checkpoint: Dict[str, Any]) -> None:
        """Restore a run from ``checkpoint`` (see ``checkpoint.load_resumable``)."""
        path = checkpoint.get("path", "the checkpoint")
        check_same_run(checkpoint, self.recipe, self.extra_state.get("categories"))
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.scaler is not None and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        if self.ema is not None:
            if checkpoint.get("ema"):
                self.ema.module.load_state_dict(checkpoint["ema"]["model"])
                self.ema.n_averaged.copy_(checkpoint["ema"]["n_averaged"])
            else:
                logger.warning("%s holds no EMA weights: the EMA starts from the resumed weights", path)
                self.ema.module.load_state_dict(checkpoint["model"])
        self.epoch, self.epoch_step, self.step = checkpoint["epoch"], checkpoint["epoch_step"], checkpoint["step"]
        self.best, self.history = checkpoint.get("best"), list(checkpoint.get("history", []))
        self.evaluations_without_improvement = int(checkpoint.get("evaluations_without_improvement", 0))
        self.stopped_early = bool(checkpoint.get("stopped_early", False))
        world = distributed.get_world_size()
        current = ProcessLayout(world, self.batch_size)
        saved = ProcessLayout(checkpoint.get("world_size", world), checkpoint.get("batch_size", self.batch_size))
        if saved != current:
            self._continue_in_layout(saved, current, path)
        rng = checkpoint.get("rng") or []
        if len(rng) == world:
            set_rng_state(rng[distributed.get_rank()])
        elif rng:
            logger.warning("the checkpoint holds random states of %d processes, not %d: not restored", len(rng), world)
        logger.info("resumed from %s at epoch %d, step %d of %d in the epoch (%d steps in total)",
                    path, self.epoch, self.epoch_step, self.steps_per_epoch, self.step)

    def _continue_in_layout(self, saved: ProcessLayout, current: ProcessLayout, path: str) -> None:
        """Continue the epoch a run of another layout stopped in (see ``resume_layout``), renumbered in this layout's steps."""
        self.epoch_step = continued_epoch_step(self.epoch, self.epoch_step, saved, current, accumulate=self.accumulate, path=path)
        self.step = self.epoch * self.steps_per_epoch + self.epoch_step
        # the schedule is a function of the step; its lambdas were built for this layout's epochs
        self.scheduler.last_epoch = self.step - 1
        skip_schedule_step(self.scheduler)  # sets every group's rate for step ``self.step``
        logger.warning(
            "resuming with %d process(es) x batch %d instead of %d x %d: continuing epoch %d after the same %d images "
            "(step %d of %d); the run is renumbered to %d steps per epoch",
            current.world_size, current.batch_size, saved.world_size, saved.batch_size, self.epoch,
            self.epoch_step * current.images_per_step, self.epoch_step, self.steps_per_epoch, self.steps_per_epoch,
        )

    def save(self, *, finished_epoch: bool, is_best: bool = False) -> None:
        state = self.state_dict()  # a collective: every rank builds it
        if distributed.is_main_process():
            for path in self.keeper.save(state, finished_epoch=self.epoch - 1 if finished_epoch else None, is_best=is_best):
                logger.info("saved %s", path)
        distributed.barrier()

    # -------------------------------------------------------------- training
    def fit(self) -> Optional[Dict[str, float]]:
        """Train from the current state to the last epoch, or until ``max_steps`` or a signal (then
        ``stop_signal`` holds it); returns the last evaluation's COCO stats (main process; None
        elsewhere or when stopped before the end)."""
        settings = self.settings
        if self.epoch >= settings.epochs or self.stopped_early:
            logger.info("the run already finished (%s)", f"stopped early after epoch {self.epoch - 1}" if self.stopped_early
                        else f"its {settings.epochs} epochs")
            return self.last_stats()
        with StopRequest() as stop, contextlib.closing(self.reporter):
            while self.epoch < settings.epochs:
                if not self._train_epoch(stop):
                    self.save(finished_epoch=False)
                    self._log_stop()
                    return None
                self.epoch += 1
                self.epoch_step = 0
                stats = self.evaluate() if self._evaluation_due() else None
                is_best = self._record(stats)
                self.save(finished_epoch=True, is_best=is_best)
                if self.stopped_early:
                    return self.last_stats()
                if self.epoch < settings.epochs and self._stop_due(stop):
                    self._log_stop()
                    return None
        return self.last_stats()

    def _record(self, stats: Optional[Dict[str, float]]) -> bool:
        """Account an evaluation's ``stats`` (None: no evaluation): whether they are the best so far,
        and whether early stopping ends the run (``stopped_early``, logged with why)."""
        if stats is None:
            return False
        settings, value = self.settings, stats[self.settings.metric]
        is_best = self.best is None or value > self.best
        improved = self.best is None or value > self.best + settings.early_stopping_min_delta
        self.evaluations_without_improvement = 0 if improved else self.evaluations_without_improvement + 1
        best_before = self.best
        if is_best:
            self.best = value
        patience = settings.early_stopping_patience
        if patience is not None and self.evaluations_without_improvement >= patience and self.epoch < settings.epochs:
            self.stopped_early = True
            logger.info(
                "early stopping after epoch %d: %s has not improved on its best, %.4f, by more than %g in %d evaluation(s) "
                "(trainer.early_stopping_patience=%d); checkpoint_best.pth holds the best %s", self.epoch - 1, settings.metric,
                best_before, settings.early_stopping_min_delta, self.evaluations_without_improvement, patience,
                "EMA weights" if self.ema is not None else "weights",
            )
        return is_best

    def _max_steps_reached(self) -> bool:
        return self.settings.max_steps is not None and self.step >= self.settings.max_steps

    def _stop_due(self, stop: StopRequest) -> bool:
        """Stop now? At ``max_steps``, or on a signal any rank received (recorded in ``stop_signal``)."""
        if self._max_steps_reached():
            return True
        if stop.agreed(self.device):
            self.stop_signal = stop.signum
            return True
        return False

    def _log_stop(self) -> None:
        """Where the run stopped, why, and how to resume it."""
        why = ""
        if self.stop_signal is not None:
            why = f" on {describe_signal(self.stop_signal)}"
        elif self._max_steps_reached():
            why = f" at trainer.max_steps={self.settings.max_steps}"
        logger.info(
            "stopped%s at epoch %d, step %d of the epoch (%d steps in total); run again with the same "
            "hydra.run.dir to resume", why, self.epoch, self.epoch_step, self.step,
        )

    def _train_epoch(self, stop: StopRequest) -> bool:
        """Train the rest of the current epoch; False when stopped before its end (with
        ``epoch_step`` the steps done in it)."""
        self._start_epoch()
        for micro_batches in optimizer_step_batches(self.train_loader, self.accumulate):
            step_start = time.perf_counter()
            result = self.train_step.accumulate(micro_batches)
            self.step += 1
            self.epoch_step += 1
            self.reporter.step(result, self.step, self.epoch_step, seconds=time.perf_counter() - step_start)
            if self.epoch_step == self.steps_per_epoch:
                break  # fit() checkpoints the finished epoch and checks for stops
            if self._stop_due(stop):
                break
            if self.settings.checkpoint_every_steps and self.step % self.settings.checkpoint_every_steps == 0:
                self.save(finished_epoch=False)
        finished = self.epoch_step == self.steps_per_epoch
        entry = self.reporter.end_epoch(self.epoch, finished)
        if entry is not None:
            self.history.append(entry)
        return finished

    def _start_epoch(self) -> None:
        """Position the data at ``epoch_step`` of ``epoch``, exactly as an uninterrupted run would be."""
        self.train_model.train()  # an evaluation left the model in eval mode
        loader = self.train_loader
        loader.dataset.set_epoch(self.epoch)
        loader.sampler.set_epoch(self.epoch, start=self.epoch_step * self.batch_size)
        if getattr(loader, "generator", None) is not None:
            # worker seeds come from here; reseed so a resumed epoch draws the same ones
            loader.generator.manual_seed(self.seed + self.epoch)
        self.reporter.start_epoch(self.epoch, self.epoch_step, self._evaluations_left())

    def _evaluation_due(self) -> bool:
        """After finishing an epoch (``epoch`` already counts it): evaluate now?"""
        every, epochs = self.settings.eval_every, self.settings.epochs
        return self.val_loader is not None and (self.epoch == epochs or self.epoch % every == 0)

    def _evaluations_left(self) -> int:
        """Evaluations still to come, counting the one after the epoch in progress."""
        if self.val_loader is None:
            return 0
        every, epochs = self.settings.eval_every, self.settings.epochs
        return sum(1 for e in range(self.epoch + 1, epochs + 1) if e == epochs or e % every == 0)

    # ------------------------------------------------------------ evaluation
    def evaluate(self) -> Optional[Dict[str, float]]:
        """Evaluate the epoch just finished (``epoch - 1``); its COCO stats on the main process, None elsewhere."""
        on_batch = self.reporter.start_evaluation()
        evaluation = evaluate(self.evaluation_model, self.postprocess, self.val_loader, self.val_coco, self.device,
                              amp=self.settings.amp, on_batch=on_batch)
        entry = self.reporter.evaluation(evaluation, self.epoch - 1, self.step)
        if evaluation is None:
            return None
        self.last_evaluation = evaluation
        if self.history and self.history[-1].get("epoch") == self.epoch - 1:
            self.history[-1].update(entry)
        return evaluation.stats

    def last_stats(self) -> Optional[Dict[str, float]]:
        return self.last_evaluation.stats if self.last_evaluation is not None else None
