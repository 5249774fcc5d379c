"""What every picture needs: tensor <-> PIL, sizes of lines and text that read well at any image size, colours, tiling."""
import colorsys
import functools
from typing import Sequence, Tuple

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch

Colour = Tuple[int, int, int]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# golden-ratio steps around the hue circle: any run of consecutive ids gets well separated hues
_GOLDEN = 0.618033988749895
# feature levels, fine to coarse: red, yellow, cyan, magenta, then more
LEVEL_COLOURS: Tuple[Colour, ...] = ((255, 64, 64), (255, 214, 0), (0, 220, 255), (235, 80, 255), (80, 255, 80), (255, 140, 0))


def category_colour(category_id: int) -> Colour:
    """A bright colour of its own for each category id."""
    hue = (0.05 + int(category_id) * _GOLDEN) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def head_colour(head: int, num_heads: int) -> Colour:
    """Heads spread evenly around the hue circle."""
    r, g, b = colorsys.hsv_to_rgb(head / max(1, num_heads), 0.9, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def level_colour(level: int) -> Colour:
    return LEVEL_COLOURS[level % len(LEVEL_COLOURS)]


def text_colour(background: Colour) -> Colour:
    """Black on light backgrounds, white on dark ones."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def line_width(width: int, height: int) -> int:
    """1 px on a 160 px image, 3 px at 1333 px: visible, never covering small objects."""
    return max(1, round(max(width, height) / 450))


def font_size(width: int, height: int) -> int:
    """11 px text on small images (still legible), growing to ~24 px on 1333 px images."""
    return max(11, round(max(width, height) / 55))


@functools.lru_cache(maxsize=16)
def font(size: int) -> PIL.ImageFont.ImageFont:
    """Pillow's built-in scalable font (no font files needed)."""
    return PIL.ImageFont.load_default(size=size)


def draw_label(draw: PIL.ImageDraw.ImageDraw, picture_size: Tuple[int, int], xy: Tuple[float, float], text: str, colour: Colour, size: int) -> None:
    """``text`` on a filled tag of ``colour`` whose bottom-left corner is ``xy``, moved inside the picture
    (of ``picture_size`` (w, h)) when it would leave it."""
    typeface = font(size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=typeface)
    pad = max(1, size // 6)
    tag_w, tag_h = right - left + 2 * pad, bottom - top + 2 * pad
    width, height = picture_size
    x = min(max(0.0, xy[0]), max(0.0, width - tag_w))
    y = xy[1] - tag_h
    if y < 0:
        y = xy[1]  # no room above the box: put the tag just inside it
    y = min(max(0.0, y), max(0.0, height - tag_h))
    draw.rectangle([x, y, x + tag_w, y + tag_h], fill=colour)
    draw.text((x + pad - left, y + pad - top), text, fill=text_colour(colour), font=typeface)


def denormalize(image: torch.Tensor, mask: torch.Tensor = None) -> torch.Tensor:
    """A normalized (3, H, W) image (ImageNet mean/std), cropped to its unpadded area when ``mask`` (H, W) is given
    (True on padding), back to (3, h, w) float in [0, 1]."""
    if mask is not None:
        h, w = int((~mask).sum(0).max()), int((~mask).sum(1).max())
        image = image[:, :h, :w]
    mean = torch.tensor(_IMAGENET_MEAN, device=image.device)[:, None, None]
    std = torch.tensor(_IMAGENET_STD, device=image.device)[:, None, None]
    return (image.float() * std + mean).clamp(0, 1)


def to_pil(image: torch.Tensor) -> PIL.Image.Image:
    """(3, H, W) float in [0, 1] or uint8 -> RGB PIL image."""
    if image.dtype != torch.uint8:
        image = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return PIL.Image.fromarray(image.cpu().permute(1, 2, 0).contiguous().numpy(), "RGB")


def to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) uint8 (what TensorBoard's ``add_image`` takes as is)."""
    return torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8).view(image.height, image.width, 3).permute(2, 0, 1)


def tile(pictures: Sequence[PIL.Image.Image], columns: int = 2, cell: int = 640, gap: int = 6) -> PIL.Image.Image:
    """Pictures side by side in a grid on a dark background, each scaled to fit a cell ``cell`` pixels wide
    (and as high as the tallest picture's aspect needs)."""
    if not pictures:
        raise ValueError("tile needs at least one picture")
    columns = max(1, min(columns, len(pictures)))
    rows = (len(pictures) + columns - 1) // columns
    cell_w = cell
    cell_h = max(1, round(cell * max(p.height / p.width for p in pictures)))
    sheet = PIL.Image.new("RGB", (columns * cell_w + (columns + 1) * gap, rows * cell_h + (rows + 1) * gap), (24, 24, 24))
    for index, picture in enumerate(pictures):
        scale = min(cell_w / picture.width, cell_h / picture.height)
        fitted = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))), PIL.Image.BILINEAR)
        row, column = divmod(index, columns)
        x = gap + column * (cell_w + gap) + (cell_w - fitted.width) // 2
        y = gap + row * (cell_h + gap) + (cell_h - fitted.height) // 2
        sheet.paste(fitted, (x, y))
    return sheet
