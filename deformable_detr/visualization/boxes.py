"""Detections (and ground truth) drawn on an image: a box, class name and score per object, a colour per class."""
from typing import Mapping, Optional, Sequence

import PIL.Image
import PIL.ImageDraw
import torch

from .canvas import category_colour, draw_label, font_size, line_width, to_pil, to_tensor


def _name(names: Optional[Mapping[int, str]], label: int) -> str:
    return names.get(label, str(label)) if names else str(label)


def _dashed_rectangle(draw: PIL.ImageDraw.ImageDraw, box: Sequence[float], colour, width: int, dash: int) -> None:
    x0, y0, x1, y1 = box
    for (ax, ay), (bx, by) in (((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))):
        length = max(abs(bx - ax), abs(by - ay))
        steps = max(1, int(length // dash))
        for i in range(0, steps, 2):
            t0, t1 = i / steps, min(1.0, (i + 1) / steps)
            draw.line([(ax + (bx - ax) * t0, ay + (by - ay) * t0), (ax + (bx - ax) * t1, ay + (by - ay) * t1)], fill=colour, width=width)


def render_detections(
    image: PIL.Image.Image,
    boxes_xyxy: torch.Tensor,
    labels: torch.Tensor,
    scores: Optional[torch.Tensor] = None,
    names: Optional[Mapping[int, str]] = None,
    gt_boxes: Optional[torch.Tensor] = None,
    gt_labels: Optional[torch.Tensor] = None,
) -> PIL.Image.Image:
    """A copy of ``image`` with the boxes drawn.

    Args:
        image: RGB picture the boxes are in pixels of.
        boxes_xyxy: (n, 4) predicted boxes (x0, y0, x1, y1) in pixels; labels (n,) category ids;
            scores (n,) or None. Drawn solid, with a "name score" tag, lowest score first so the best is on top.
        names: category id -> name (ids without a name are written as numbers).
        gt_boxes, gt_labels: (g, 4) pixels xyxy and (g,) ground truth, drawn dashed with the class colour.
    """
    picture = image.convert("RGB").copy()
    draw = PIL.ImageDraw.Draw(picture)
    width = line_width(*picture.size)
    text = font_size(*picture.size)
    if gt_boxes is not None:
        for box, label in zip(gt_boxes.tolist(), (gt_labels if gt_labels is not None else torch.zeros(len(gt_boxes))).tolist()):
            _dashed_rectangle(draw, box, category_colour(int(label)), width, dash=4 * width + 4)
    order = torch.argsort(scores) if scores is not None else torch.arange(len(boxes_xyxy))
    for index in order.tolist():
        box = boxes_xyxy[index].tolist()
        label = int(labels[index])
        colour = category_colour(label)
        # a dark outline under the coloured box keeps it visible on any background
        draw.rectangle(box, outline=(0, 0, 0), width=width + 2)
        draw.rectangle(box, outline=colour, width=width)
        tag = _name(names, label) if scores is None else f"{_name(names, label)} {float(scores[index]):.2f}"
        draw_label(draw, picture.size, (box[0] - width / 2, box[1] - width / 2), tag, colour, text)
    return picture


def draw_detections(
    image_chw_float01: torch.Tensor,
    boxes_xyxy: torch.Tensor,
    labels: torch.Tensor,
    scores: Optional[torch.Tensor] = None,
    names: Optional[Mapping[int, str]] = None,
    gt_boxes: Optional[torch.Tensor] = None,
    gt_labels: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``render_detections`` on a (3, H, W) float image in [0, 1]; returns (3, H, W) uint8 (for TensorBoard's ``add_image``)."""
    return to_tensor(render_detections(to_pil(image_chw_float01), boxes_xyxy.cpu(), labels.cpu(),
                                       None if scores is None else scores.cpu(), names,
                                       None if gt_boxes is None else gt_boxes.cpu(), None if gt_labels is None else gt_labels.cpu()))
