"""One training step, readable top to bottom: forward -> loss -> backward -> clip -> step.

The two rare cases are kept off that path: a batch whose every image was unreadable (skipped,
or under DDP replaced by a blank image that contributes no gradient, so the other ranks' all-reduce
is joined), and a NaN/inf loss (the step is skipped on every rank; too many in a row abort).
"""
import dataclasses
import logging
import re
import warnings
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from ..utils import distributed
from .precision import autocast, outputs_to_float, to_device

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive steps whose loss was NaN or infinite."""


@dataclasses.dataclass
class StepResult:
    """What one step did. ``values``: detached 0-d tensors (every loss, ``loss``, ``grad_norm``),
    empty when the step was skipped; ``images``: images this rank trained on."""

    values: Dict[str, torch.Tensor]
    images: int

    @property
    def skipped(self) -> bool:
        return not self.values


class TrainStep:
    """Trains ``model`` on one batch per call; the caller counts steps and decides what follows.

    Args:
        model: the module to train (e.g. a DistributedDataParallel wrapper of the detector).
        criterion: outputs, targets -> loss dict, with ``total_loss(losses)``.
        optimizer, scheduler: stepped once per call (the schedule also over skipped steps, so an
            epoch keeps its length in steps).
        amp: None, "bf16" or "fp16" autocast; fp16 needs ``scaler``.
        max_norm: gradient clipping max-norm (0: no clipping; the norm is still reported).
        max_nonfinite_steps: consecutive NaN/inf losses before ``NonFiniteLossError``.
        describe_images: image ids -> readable names, for the non-finite warnings and error.
    """

    def __init__(self, model, criterion, optimizer, scheduler, device: torch.device, *, amp: Optional[str] = None,
                 scaler: Optional[torch.amp.GradScaler] = None, max_norm: float = 0.1, max_nonfinite_steps: int = 5,
                 describe_images: Optional[Callable[[List[int]], str]] = None):
        self.model, self.criterion, self.optimizer, self.scheduler = model, criterion, optimizer, scheduler
        self.device, self.amp, self.scaler = device, amp, scaler
        self.max_norm, self.max_nonfinite_steps = max_norm, max_nonfinite_steps
        self.describe_images = describe_images or (lambda ids: ", ".join(map(str, ids)))
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.nonfinite_in_a_row = 0

    def __call__(self, images: torch.Tensor, masks: torch.Tensor, targets: List[Dict]) -> StepResult:
        """images (B, 3, H, W), masks (B, H, W) True on padding, targets: one dict per image."""
        if images.shape[0] == 0:
            return self._empty_batch()
        images, masks, targets = to_device(images, masks, targets, self.device)
        return self._step(images, masks, targets)

    def _step(self, images, masks, targets, loss_weight: float = 1.0) -> StepResult:
        with autocast(self.device, self.amp):
            outputs = self.model(images, masks)
        losses = self.criterion(outputs_to_float(outputs), targets)
        total = self.criterion.total_loss(losses) * loss_weight
        self.optimizer.zero_grad(set_to_none=True)
        if not all_ranks_finite(total):
            return self._skip_non_finite(total, targets)
        self.nonfinite_in_a_row = 0

        if self.scaler is None:
            total.backward()
        else:
            self.scaler.scale(total).backward()
            self.scaler.unscale_(self.optimizer)
        grad_norm = clip_gradients(self.params, self.max_norm)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()

        values = {name: value.detach() for name, value in losses.items()}
        values.update(loss=total.detach(), grad_norm=grad_norm.detach())
        return StepResult(values, images.shape[0] if loss_weight else 0)

    # ------------------------------------------------------------------ rare cases
    def _empty_batch(self) -> StepResult:
        """Every image of the batch was unreadable and skipped."""
        if distributed.get_world_size() == 1:
            skip_schedule_step(self.scheduler)
            return StepResult({}, 0)
        # the other ranks step: join them with a placeholder that contributes no gradient
        images, masks, targets = to_device(*placeholder_batch(), self.device)
        return self._step(images, masks, targets, loss_weight=0.0)

    def _skip_non_finite(self, total: torch.Tensor, targets: List[Dict]) -> StepResult:
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
        if distributed.get_world_size() > 1:
            # DistributedDataParallel expects the backward of every forward; the gradients are discarded
            total.nan_to_num(0.0, 0.0, 0.0).mul(0.0).backward()
            self.optimizer.zero_grad(set_to_none=True)
        skip_schedule_step(self.scheduler)
        return StepResult({}, 0)


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
