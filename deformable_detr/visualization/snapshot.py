"""One picture of where the model looks, made in a single call (e.g. for TensorBoard at each evaluation)."""
from typing import Mapping, Optional

import torch

from ..models.sampling_recorder import record_sampling
from ..utils.box_ops import box_cxcywh_to_xyxy
from .canvas import denormalize
from .sampling import draw_sampling


@torch.no_grad()
def sampling_snapshot(model: torch.nn.Module, image: torch.Tensor, mask: torch.Tensor, layer: int = -1,
                      names: Optional[Mapping[int, str]] = None) -> torch.Tensor:
    """Run ``model`` on one image and draw the sampling points of its best-scoring query in decoder layer ``layer``.

    Args:
        model: a ``DeformableDETR`` (not a DDP wrapper: pass ``.module``), in eval mode.
        image: (3, H, W) normalized as at evaluation, possibly padded; mask: (H, W) bool, True on padding.
        names: category id -> name for the title.
    Returns:
        (3, h, w) uint8 picture of the unpadded image, with the query's box, reference point and sampling points.
    """
    device = next(model.parameters()).device
    with record_sampling(model) as records:
        outputs = model(image[None].to(device), mask[None].to(device))
    decoder = [r for r in records if r.layer.startswith("decoder.")][layer]
    scores, labels = outputs["pred_logits"][0].float().sigmoid().max(-1)
    query = int(scores.argmax())
    picture = denormalize(image.cpu(), mask.cpu())
    h, w = picture.shape[-2:]
    box = (box_cxcywh_to_xyxy(outputs["pred_boxes"][0, query].float().cpu()) * torch.tensor([w, h, w, h])).tolist()
    label = int(labels[query])
    title = f"{decoder.layer} query {query}: {(names or {}).get(label, label)} {float(scores[query]):.2f}"
    return draw_sampling(picture, decoder, query, box_xyxy=box, label=label, title=title)
