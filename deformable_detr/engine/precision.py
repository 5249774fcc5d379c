"""Mixed precision: the ``amp`` setting of train/eval/infer, autocast, and float32 outputs."""
import contextlib
from typing import Optional

import torch

AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: Optional[str]):
    """Autocast to ``amp`` ("bf16" or "fp16") on ``device``'s type; a no-op for None."""
    if AMP_DTYPES[amp] is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def outputs_to_float(outputs):
    """Autocast leaves half-precision outputs; the matcher and losses run in float32 (or the
    model's own precision when that is higher, e.g. float64)."""
    if torch.is_tensor(outputs):
        return outputs.float() if outputs.dtype in (torch.float16, torch.bfloat16) else outputs
    if isinstance(outputs, dict):
        return {k: outputs_to_float(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(outputs_to_float(v) for v in outputs)
    return outputs


def to_device(images, masks, targets, device: torch.device):
    """A collated batch -- images (B, 3, H, W), masks (B, H, W), targets (list of dicts) -- on ``device``."""
    non_blocking = device.type == "cuda"
    images = images.to(device, non_blocking=non_blocking)
    masks = masks.to(device, non_blocking=non_blocking)
    targets = [{k: v.to(device, non_blocking=non_blocking) for k, v in t.items()} for t in targets]
    return images, masks, targets
