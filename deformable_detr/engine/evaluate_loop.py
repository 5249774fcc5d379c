"""One pass over an evaluation set: predictions of every image, COCO box AP over all ranks."""
import logging
from typing import Optional

import torch

from ..evaluation.coco_evaluator import CocoEvaluation, CocoEvaluator
from ..utils import distributed
from ..utils.metric_logger import ProgressMeter
from .precision import autocast, outputs_to_float, to_device

logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    postprocess,
    loader,
    coco_gt,
    device: torch.device,
    *,
    amp: Optional[str] = None,
    log_every: int = 50,
    on_batch=None,
) -> Optional[CocoEvaluation]:
    """Run ``model`` on every image of ``loader`` (each rank its shard) and score with COCOeval.

    Boxes are scaled to each image's original size. ``on_batch(images, masks, targets, results)``
    sees every batch (e.g. to draw a few predictions). Returns the evaluation on the main
    process and None elsewhere (every rank must call this).

    Images the dataset skipped as unreadable (``skip_unreadable``) have no predictions; a batch
    of only such images is passed over (the ranks need not agree: no collective runs per
    batch), and their number, over all ranks, is logged as a warning at the end.

    The model runs in eval mode and is returned to the mode it was in.
    """
    was_training = model.training
    model.eval()
    try:
        return _evaluate(model, postprocess, loader, coco_gt, device, amp, log_every, on_batch)
    finally:
        model.train(was_training)


def _evaluate(model, postprocess, loader, coco_gt, device, amp, log_every, on_batch) -> Optional[CocoEvaluation]:
    evaluator = CocoEvaluator(coco_gt)
    meter = ProgressMeter(len(loader), prefix="[eval]")
    skipped = getattr(loader.dataset, "skipped", None)
    skipped_before = skipped.value if skipped is not None else 0
    for step, (images, masks, targets) in enumerate(loader, 1):
        if images.shape[0] > 0:  # else every image of this batch was unreadable and skipped
            images, masks, targets = to_device(images, masks, targets, device)
            with autocast(device, amp):
                outputs = model(images, masks)
            orig_sizes = torch.stack([t["orig_size"] for t in targets])
            results = postprocess(outputs_to_float(outputs), orig_sizes)
            evaluator.update({int(t["image_id"]): r for t, r in zip(targets, results)})
            if on_batch is not None:
                on_batch(images, masks, targets, results)
        meter.update(images.shape[0])
        if distributed.is_main_process() and (step % log_every == 0 or step == len(loader)):
            logger.info(meter.line(step))
    skipped_now = skipped.value - skipped_before if skipped is not None else 0
    skipped_total = sum(distributed.all_gather_object(skipped_now))
    if skipped_total and distributed.is_main_process():
        logger.warning("evaluation: %d unreadable images skipped, without predictions (see the warnings above)", skipped_total)
    return evaluator.summarize(main_process_only=True)
