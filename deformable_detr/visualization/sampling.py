"""Deformable attention sampling points drawn on the image: where one query looked, on every level and head.

Legend: M heads, L levels, P points per head and level. Records come from ``models.record_sampling``.
"""
from typing import Dict, List, Optional, Sequence

import PIL.Image
import PIL.ImageDraw
import torch

from ..models.sampling_recorder import SamplingRecord
from .canvas import category_colour, font, font_size, head_colour, level_colour, line_width, text_colour, to_pil, to_tensor


def sampling_points(record: SamplingRecord, query: int, width: int, height: int, batch_index: int = 0) -> Dict[str, torch.Tensor]:
    """One query's reference point and sampling points in pixels of an image of ``width`` x ``height`` showing
    the unpadded (valid) image area, e.g. the original image.

    The op reads level l at ``sampling_locations`` in [0, 1] of the padded map; the unpadded image fills
    ``valid_ratios[l]`` of it, so dividing by that ratio gives fractions of the valid image (the inverse of
    the transformer's scaling of reference points).

    Returns:
        ``reference`` (2,) (x, y) pixels; ``reference_box`` (4,) xyxy pixels or None when the reference is a point;
        ``points`` (M, L, P, 2) (x, y) pixels; ``weights`` (M, L, P).
    """
    ratios = record.valid_ratios()[batch_index].cpu()  # (L, 2)
    scale = torch.tensor([float(width), float(height)])
    locations = record.sampling_locations[batch_index, query].float().cpu()  # (M, L, P, 2)
    points = locations / ratios[None, :, None, :] * scale
    reference = record.reference_points[batch_index, query, 0].float().cpu()  # level 0's copy; every level maps back to the same point
    centre = reference[:2] / ratios[0] * scale
    box = None
    if reference.shape[-1] == 4:
        size = reference[2:] / ratios[0] * scale
        box = torch.cat([centre - size / 2, centre + size / 2])
    return {"reference": centre, "reference_box": box, "points": points, "weights": record.attention_weights[batch_index, query].float().cpu()}


def encoder_query_at(record: SamplingRecord, x: float, y: float, width: int, height: int, batch_index: int = 0) -> int:
    """Index of the encoder query (a pixel of the finest level) whose centre is nearest (``x``, ``y``) in pixels
    of a ``width`` x ``height`` picture of the valid image area."""
    shapes = record.spatial_shapes.tolist()
    level = max(range(len(shapes)), key=lambda i: shapes[i][0] * shapes[i][1])
    h, w = shapes[level]
    ratio_w, ratio_h = record.valid_ratios()[batch_index, level].tolist()
    valid_w, valid_h = max(1, round(ratio_w * w)), max(1, round(ratio_h * h))
    column = min(valid_w - 1, max(0, int(x / width * valid_w)))
    row = min(valid_h - 1, max(0, int(y / height * valid_h)))
    return int(record.level_start_index[level]) + row * w + column


def _cross(draw: PIL.ImageDraw.ImageDraw, centre: Sequence[float], arm: float, width: int) -> None:
    x, y = centre
    for colour, stroke in (((0, 0, 0), width + 2), ((255, 255, 255), width)):
        draw.line([(x - arm, y - arm), (x + arm, y + arm)], fill=colour, width=stroke)
        draw.line([(x - arm, y + arm), (x + arm, y - arm)], fill=colour, width=stroke)


def _wrap(draw: PIL.ImageDraw.ImageDraw, text: str, typeface, width: float) -> List[str]:
    """``text`` broken at spaces into lines at most ``width`` pixels wide (a longer word keeps its own line)."""
    lines: List[str] = []
    for word in text.split(" "):
        if lines and draw.textlength(f"{lines[-1]} {word}", font=typeface) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def with_header(picture: PIL.Image.Image, title: Optional[str], entries, size: int) -> PIL.Image.Image:
    """``picture`` below a dark band holding ``title`` and the legend ``entries`` [(text, colour)], wrapped to its
    width: nothing of the image is hidden, even on a 160 px picture."""
    typeface = font(size)
    probe = PIL.ImageDraw.Draw(picture)
    pad = max(2, size // 4)
    line = size + 2 * pad
    title_lines = _wrap(probe, title, typeface, picture.width - 2 * pad) if title else []
    rows, x = [[]], pad
    for text, colour in entries:
        width = probe.textlength(text, font=typeface) + 2 * pad
        if rows[-1] and x + width > picture.width:
            rows.append([])
            x = pad
        rows[-1].append((x, text, colour))
        x += width + pad
    height = (len(rows) + len(title_lines)) * line + pad
    framed = PIL.Image.new("RGB", (picture.width, picture.height + height), (24, 24, 24))
    framed.paste(picture, (0, height))
    draw = PIL.ImageDraw.Draw(framed)
    y = pad
    for text in title_lines:
        draw.text((pad, y), text, fill=(255, 255, 255), font=typeface)
        y += line
    for row in rows:
        for x, text, colour in row:
            draw.rectangle([x, y, x + probe.textlength(text, font=typeface) + 2 * pad, y + size + pad], fill=colour)
            draw.text((x + pad, y), text, fill=text_colour(colour), font=typeface)
        y += line
    return framed


def render_sampling(
    image: PIL.Image.Image,
    record: SamplingRecord,
    query: int,
    batch_index: int = 0,
    colour_by: str = "level",
    box_xyxy: Optional[Sequence[float]] = None,
    label: Optional[int] = None,
    title: Optional[str] = None,
) -> PIL.Image.Image:
    """``image`` (the valid image area, any size) with query ``query``'s sampling points, below a header band
    with ``title`` and the legend (so the picture is taller than ``image`` by that band).

    Each point is a disc coloured by level (``colour_by="level"``) or head (``"head"``), its radius and
    opacity growing with its attention weight (relative to the query's largest); the reference point is a
    white cross (and its box, dotted, for box references). ``box_xyxy`` (pixels) and ``label`` draw the
    prediction; ``title`` heads the picture; a legend names the colours.
    """
    if colour_by not in ("level", "head"):
        raise ValueError(f"colour_by={colour_by} is not one of level, head")
    picture = image.convert("RGB").copy()
    sample = sampling_points(record, query, picture.width, picture.height, batch_index)
    stroke = line_width(*picture.size)
    text = font_size(*picture.size)
    draw = PIL.ImageDraw.Draw(picture)
    if box_xyxy is not None:
        colour = category_colour(label) if label is not None else (255, 255, 255)
        draw.rectangle(list(box_xyxy), outline=(0, 0, 0), width=stroke + 2)
        draw.rectangle(list(box_xyxy), outline=colour, width=stroke)
    if sample["reference_box"] is not None:
        draw.rectangle(sample["reference_box"].tolist(), outline=(255, 255, 255), width=1)

    overlay = PIL.Image.new("RGBA", picture.size, (0, 0, 0, 0))
    dots = PIL.ImageDraw.Draw(overlay)
    heads, levels, points = sample["weights"].shape
    weights = sample["weights"]
    relative = weights / weights.max().clamp_min(1e-12)
    radius = max(2.5, max(picture.size) / 160)
    # faint points first, so the strong ones stay on top
    for flat in torch.argsort(relative.flatten()).tolist():
        head, rest = divmod(flat, levels * points)
        level, point = divmod(rest, points)
        strength = float(relative[head, level, point])
        x, y = sample["points"][head, level, point].tolist()
        r = radius * (0.6 + 1.4 * strength**0.5)
        colour = level_colour(level) if colour_by == "level" else head_colour(head, heads)
        alpha = int(70 + 185 * strength)
        dots.ellipse([x - r, y - r, x + r, y + r], fill=(*colour, alpha), outline=(0, 0, 0, alpha))
    picture = PIL.Image.alpha_composite(picture.convert("RGBA"), overlay).convert("RGB")
    draw = PIL.ImageDraw.Draw(picture)
    _cross(draw, sample["reference"].tolist(), arm=radius * 2.5, width=stroke)

    shapes = record.spatial_shapes.tolist()
    if colour_by == "level":
        entries = [(f"level {i} ({shapes[i][1]}x{shapes[i][0]})", level_colour(i)) for i in range(levels)]
    else:
        entries = [(f"head {i}", head_colour(i, heads)) for i in range(heads)]
    return with_header(picture, title, entries, text)


def draw_sampling(
    image_chw_float01: torch.Tensor,
    record: SamplingRecord,
    query: int,
    batch_index: int = 0,
    colour_by: str = "level",
    box_xyxy: Optional[Sequence[float]] = None,
    label: Optional[int] = None,
    title: Optional[str] = None,
) -> torch.Tensor:
    """``render_sampling`` on a (3, h, w) float image in [0, 1] of the valid (unpadded) area; returns (3, h + band, w) uint8."""
    return to_tensor(render_sampling(to_pil(image_chw_float01), record, query, batch_index, colour_by, box_xyxy, label, title))

