"""One training step, readable top to bottom: forward -> loss -> backward -> clip -> step.

The two rare cases are kept off that path: a batch whose every image was unreadable (skipped,
or under DDP replaced by a blank image that contributes no gradient, so the other ranks' all-reduce
is joined), and a NaN/inf loss (the step is skipped on every rank; too many in a row abort).
"""
import contextlib
import dataclasses
import logging
import re
import warnings
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..errors import UserError
from ..utils import distributed
from .precision import autocast, outputs_to_float, to_device

logger = logging.getLogger(__name__)


# a collated batch: images (B, 3, H, W), masks (B, H, W), one target dict per image
Batch = Tuple[torch.Tensor, torch.Tensor, List[Dict]]


class NonFiniteLossError(UserError, RuntimeError):
    """Raised after too many consecutive steps whose loss was NaN or infinite: the recipe diverged
    (a learning rate too high, bad annotations), which the tools report in one line."""


@dataclasses.dataclass
class StepResult:
    """What one step did. ``values``: detached 0-d tensors (every loss, ``loss``, ``grad_norm``),
    empty when the step was skipped; ``grad_norm`` is inf or NaN when fp16's GradScaler skipped the
    optimizer's step for overflowing gradients. ``images``: images this rank trained on."""

    values: Dict[str, torch.Tensor]
    images: int

    @property
    def skipped(self) -> bool:
        return not self.values


class TrainStep:
    """Trains ``model`` on one batch (or a few micro-batches) per call; the caller counts steps
    and decides what follows.

    Args:
        model: the module to train (e.g. a DistributedDataParallel wrapper of the detector, or
            the ``torch.compile`` wrapper of either).
        criterion: outputs, targets -> loss dict, with ``total_loss(losses)`` and ``normalizer(targets, device)``.
        optimizer, scheduler: stepped once per call (the schedule also over skipped steps, so an
            epoch keeps its length in steps).
        amp: None, "bf16" or "fp16" autocast; fp16 needs ``scaler``.
        max_norm: gradient clipping max-norm (0: no clipping; the norm is still reported).
        ema: a ``torch.optim.swa_utils.AveragedModel`` of the detector, updated after every
            optimizer step (None: no EMA).
        max_nonfinite_steps: consecutive NaN/inf losses before ``NonFiniteLossError``.
        describe_images: image ids -> readable names, for the non-finite warnings and error.
    """

    def __init__(self, model, criterion, optimizer, scheduler, device: torch.device, *, amp: Optional[str] = None,
                 scaler: Optional[torch.amp.GradScaler] = None, max_norm: float = 0.1, ema=None, max_nonfinite_steps: int = 5,
                 describe_images: Optional[Callable[[List[int]], str]] = None):
        self.model, self.criterion, self.optimizer, self.scheduler = model, criterion, optimizer, scheduler
        self.device, self.amp, self.scaler, self.ema = device, amp, scaler, ema
        self.max_norm, self.max_nonfinite_steps = max_norm, max_nonfinite_steps
        self.describe_images = describe_images or (lambda ids: ", ".join(map(str, ids)))
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.nonfinite_in_a_row = 0
        unwrapped = getattr(model, "_orig_mod", model)  # torch.compile's wrapper shares the module's weights
        self.detector = unwrapped.module if hasattr(unwrapped, "no_sync") else unwrapped

    def __call__(self, images: torch.Tensor, masks: torch.Tensor, targets: List[Dict]) -> StepResult:
        """One batch: images (B, 3, H, W), masks (B, H, W) True on padding, targets: one dict per image."""
        return self.accumulate([(images, masks, targets)])

    def accumulate(self, micro_batches: Sequence[Batch]) -> StepResult:
        """One optimizer step over ``micro_batches``, equivalent to one batch of all their images:
        the losses are normalized by the target boxes of all of them, gradients are summed (under
        DDP all-reduced only with the last backward), then clipped once."""
        micro_batches = [batch for batch in micro_batches if batch[0].shape[0] > 0]
        if not micro_batches:
            return self._empty_batch()
        micro_batches = [to_device(*batch, self.device) for batch in micro_batches]
        return self._step(micro_batches)

    def _step(self, micro_batches: List[Batch], loss_weight: float = 1.0) -> StepResult:
        all_targets = [t for _, _, targets in micro_batches for t in targets]
        num_boxes = self.criterion.normalizer(all_targets, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        summed: Dict[str, torch.Tensor] = {}
        for index, (images, masks, targets) in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            with self._gradient_sync(last):
                with autocast(self.device, self.amp):
                    outputs = self.model(images, masks)
                losses = self.criterion(outputs_to_float(outputs), targets, num_boxes=num_boxes)
                total = self.criterion.total_loss(losses) * loss_weight
                if not all_ranks_finite(total):
                    return self._skip_non_finite(total, all_targets, synchronized=last)
                # named ranges for the profiler (tools/benchmark.py measure=[profile]); free otherwise
                with torch.autograd.profiler.record_function("backward"):
                    if self.scaler is None:
                        total.backward()
                    else:
                        self.scaler.scale(total).backward()
            _add(summed, losses, total, len(micro_batches))
        self.nonfinite_in_a_row = 0

        with torch.autograd.profiler.record_function("optimizer"):
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            grad_norm = clip_gradients(self.params, self.max_norm)
            if self.scaler is None:
                self.optimizer.step()
                self.scheduler.step()
            else:
                self.scaler.step(self.optimizer)
                self.scaler.update()
                skip_schedule_step(self.scheduler)  # quietly: the scaler skips the optimizer's step when gradients overflowed
        if self.ema is not None:
            self.ema.update_parameters(self.detector)

        summed["grad_norm"] = grad_norm.detach()
        return StepResult(summed, len(all_targets) if loss_weight else 0)

    def _gradient_sync(self, synchronize: bool):
        """DDP all-reduces gradients in every backward; accumulation needs it only in the last."""
        if synchronize or not hasattr(self.model, "no_sync"):
            return contextlib.nullcontext()
        return self.model.no_sync()

    # ------------------------------------------------------------------ rare cases
    def _empty_batch(self) -> StepResult:
        """Every image of the batch was unreadable and skipped."""
        if distributed.get_world_size() == 1:
            skip_schedule_step(self.scheduler)
            return StepResult({}, 0)
        # the other ranks step: join them with a placeholder that contributes no gradient
        return self._step([to_device(*placeholder_batch(), self.device)], loss_weight=0.0)

    def _skip_non_finite(self, total: torch.Tensor, targets: List[Dict], synchronized: bool = True) -> StepResult:
        """Every rank skips this step together; the batch's images (of all ranks) are named."""
        gathered = distributed.all_gather_object([int(t["image_id"]) for t in targets])
        names = self.describe_images([i for rank_ids in gathered for i in rank_ids])
        self.nonfinite_in_a_row += 1
        logger.warning("non-finite loss, step skipped (images %s)", names)
        if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"the loss was NaN or infinite for {self.nonfinite_in_a_row} steps in a row (last batch: images {names}); "
                "lower the learning rate, check those images' annotations, or train without amp"
            )
        if distributed.get_world_size() > 1 and synchronized:
            # DistributedDataParallel expects the backward of every forward; the gradients are discarded
            total.nan_to_num(0.0, 0.0, 0.0).mul(0.0).backward()
            self.optimizer.zero_grad(set_to_none=True)
        skip_schedule_step(self.scheduler)
        return StepResult({}, 0)


def _add(summed: Dict[str, torch.Tensor], losses: Dict[str, torch.Tensor], total: torch.Tensor, count: int) -> None:
    """Accumulate one micro-batch's values: losses add up (each is already normalized by every
    micro-batch's boxes), logged metrics such as ``class_error`` are averaged."""
    for name, value in list(losses.items()) + [("loss", total)]:
        value = value.detach() if name.startswith("loss") else value.detach() / count
        summed[name] = summed[name] + value if name in summed else value


def optimizer_step_batches(batches: Iterable[Batch], accumulate: int) -> Iterator[List[Batch]]:
    """The micro-batches of each optimizer step: consecutive lists of ``accumulate`` batches (a
    shorter last one is dropped, as an epoch counts whole optimizer steps)."""
    group: List[Batch] = []
    for batch in batches:
        group.append(batch)
        if len(group) == accumulate:
            yield group
            group = []


def clip_gradients(params: List[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip to ``max_norm`` (0: off) and return the total gradient norm before clipping."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params if p.grad is not None]))


def all_ranks_finite(value: torch.Tensor) -> bool:
    """True when ``value`` is finite on every rank, so all ranks skip or step together."""
    flag = torch.isfinite(value.detach()).all().to(torch.float32).reshape(1)
    if distributed.get_world_size() > 1:
        flag = flag.to(value.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def skip_schedule_step(scheduler) -> None:
    """Advance the schedule over a skipped step, so epochs keep their length in steps."""
    with warnings.catch_warnings():
        # the scheduler warns when it runs ahead of the optimizer, which is the point here
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
        scheduler.step()


def placeholder_batch():
    """One blank 64x64 image without objects: (1, 3, 64, 64), (1, 64, 64), [target]."""
    target = {
        "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": torch.tensor(-1),
        "orig_size": torch.tensor([64, 64]), "size": torch.tensor([64, 64]),
        "area": torch.zeros(0), "iscrowd": torch.zeros(0, dtype=torch.int64),
    }
    return torch.zeros(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool), [target]
