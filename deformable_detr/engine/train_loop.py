"""One epoch of training: data -> loss dict -> backward -> clipped step, with non-finite guards."""
import logging
import re
import warnings
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from ..utils import distributed
from ..utils.metric_logger import ProgressMeter

logger = logging.getLogger(__name__)

AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive steps whose loss was NaN or infinite."""


def to_device(images, masks, targets, device):
    non_blocking = device.type == "cuda"
    images = images.to(device, non_blocking=non_blocking)
    masks = masks.to(device, non_blocking=non_blocking)
    targets = [{k: v.to(device, non_blocking=non_blocking) for k, v in t.items()} for t in targets]
    return images, masks, targets


def outputs_to_float(outputs):
    """Autocast leaves half-precision outputs; the matcher and losses run in float32."""
    if torch.is_tensor(outputs):
        return outputs.float()
    if isinstance(outputs, dict):
        return {k: outputs_to_float(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(outputs_to_float(v) for v in outputs)
    return outputs


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
        "orig_size": torch.tensor([64, 64]), "size": torch.tensor([64, 64]), "area": torch.zeros(0), "iscrowd": torch.zeros(0, dtype=torch.int64),
    }
    return torch.zeros(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool), [target]


def all_ranks_finite(value: torch.Tensor) -> bool:
    """True when ``value`` is finite on every rank, so all ranks skip or step together."""
    flag = torch.isfinite(value.detach()).all().to(torch.float32).reshape(1)
    if distributed.get_world_size() > 1:
        flag = flag.to(value.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def train_one_epoch(
    model: torch.nn.Module,
    criterion,
    loader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    device: torch.device,
    epoch: int,
    *,
    total_steps: int,
    start_step: int = 0,
    max_norm: float = 0.1,
    amp: Optional[str] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
    log_every: int = 20,
    max_nonfinite_steps: int = 5,
    on_step: Optional[Callable[[int], bool]] = None,
    describe_images: Optional[Callable[[List[int]], str]] = None,
    writer=None,
    global_step: int = 0,
) -> Dict[str, float]:
    """Train until ``loader`` is exhausted or ``on_step`` asks to stop.

    Args:
        total_steps: steps of a whole epoch (for the progress line); the loader yields
            ``total_steps - start_step`` batches when resuming mid-epoch.
        max_norm: gradient clipping max-norm (0: no clipping; the norm is still logged).
        amp: None, "bf16" or "fp16" autocast; fp16 needs ``scaler``.
        max_nonfinite_steps: a NaN/inf loss skips the step on every rank; this many in a row abort.
        on_step: called after every step (skipped ones too) with the steps done in this epoch;
            returning True stops the epoch there (to checkpoint and exit).
        describe_images: image ids -> readable names, for the non-finite error.
        writer: a TensorBoard SummaryWriter (main process) or None.
        global_step: optimizer steps done before this epoch started (TensorBoard x axis).
    Returns:
        epoch averages of the logged values (every loss, weighted total, grad norm, lr).
    """
    model.train()
    criterion.train()
    amp_dtype = AMP_DTYPES[amp]
    meter = ProgressMeter(total_steps, prefix=f"[epoch {epoch}]")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    skipped_in_a_row = 0
    step = start_step
    for images, masks, targets in loader:
        weight = 1.0
        if images.shape[0] == 0:
            # every image of this batch was unreadable and skipped
            if distributed.get_world_size() == 1:
                skip_schedule_step(scheduler)
                step += 1
                if on_step is not None and on_step(step):
                    break
                continue
            # the other ranks step: join them with a placeholder that contributes no gradient
            images, masks, targets = placeholder_batch()
            weight = 0.0
        images, masks, targets = to_device(images, masks, targets, device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            outputs = model(images, masks)
        losses = criterion(outputs_to_float(outputs), targets)
        total = criterion.total_loss(losses) * weight

        optimizer.zero_grad(set_to_none=True)
        if not all_ranks_finite(total):
            # every rank skips this step together; the batch's images (of all ranks) are named
            gathered = distributed.all_gather_object([int(t["image_id"]) for t in targets])
            image_ids = [i for rank_ids in gathered for i in rank_ids]
            names = describe_images(image_ids) if describe_images else str(image_ids)
            skipped_in_a_row += 1
            logger.warning("epoch %d step %d: non-finite loss, step skipped (images %s)", epoch, step, names)
            if skipped_in_a_row >= max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"the loss was NaN or infinite for {skipped_in_a_row} steps in a row (last batch: images {names}); "
                    "lower the learning rate, check those images' annotations, or train without amp"
                )
            if distributed.get_world_size() > 1:
                # DistributedDataParallel expects the backward of every forward; the gradients
                # are discarded below
                total.nan_to_num(0.0, 0.0, 0.0).mul(0.0).backward()
                optimizer.zero_grad(set_to_none=True)
            skip_schedule_step(scheduler)
            step += 1
            if on_step is not None and on_step(step):
                break
            continue
        skipped_in_a_row = 0

        if scaler is not None:
            scaler.scale(total).backward()
            scaler.unscale_(optimizer)
        else:
            total.backward()
        if max_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params if p.grad is not None]))
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        step += 1

        # one host sync per step for logging: stack every value and read them together
        names = sorted(losses)
        values = torch.stack([losses[k].detach().float() for k in names] + [total.detach().float(), grad_norm.detach().float()])
        values = dict(zip(names + ["loss", "grad_norm"], values.tolist()))
        values["lr"] = optimizer.param_groups[0]["lr"]
        meter.update(images.shape[0] * distributed.get_world_size(), **values)
        if step % log_every == 0 or step == total_steps:
            reduced = distributed.reduce_dict({k: torch.tensor(v) for k, v in values.items()})
            if distributed.is_main_process():
                logger.info(meter.line(step, keys=["loss", "loss_ce", "loss_bbox", "loss_giou", "class_error", "grad_norm", "lr"]))
                if writer is not None:
                    for name, value in reduced.items():
                        writer.add_scalar(f"train/{name}", float(value), global_step + step - start_step)
                    for group in optimizer.param_groups:
                        writer.add_scalar(f"lr/{group.get('name', 'group')}", group["lr"], global_step + step - start_step)
                    writer.add_scalar("train/images_per_second", meter.images_per_second(), global_step + step - start_step)
        if on_step is not None and on_step(step):
            break
    return meter.averages()
