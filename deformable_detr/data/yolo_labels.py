"""YOLO label files: one object per line, normalized to the image, read as pixel boxes; every
mistake is an error naming the file and line.

A line is ``class cx cy w h``: ``class`` an index into data.yaml's names (0..n-1), the box centre and
size as fractions of the image's width and height. Also read, as the box around the object:
segmentation lines ``class x1 y1 x2 y2 x3 y3 ...`` (three points or more) and, with ``kpt_shape``
in data.yaml, pose lines ``class cx cy w h`` followed by the keypoint values (not checked: they may
hold visibility flags). Coordinates may leave [0, 1] by ``COORDINATE_TOLERANCE`` (exporters' float
rounding); boxes are clipped to the image. Blank lines are skipped.
"""
from __future__ import annotations

from typing import List, Tuple

from ..errors import DataError

__all__ = ["COORDINATE_TOLERANCE", "read_label_file"]

# 1e-4 of the image: beyond float32 and 4-decimal rounding, under 0.1 px for images up to 1000 px
COORDINATE_TOLERANCE = 1e-4
_FORMAT = "a line is 'class cx cy w h' (5 numbers) or a polygon 'class x1 y1 x2 y2 x3 y3 ...'"

Box = Tuple[int, List[float]]  # (class index, [x, y, width, height] pixels)


def read_label_file(path: str, num_classes: int, width: int, height: int, *, keypoint_values: int = 0,
                    names_source: str = "data.yaml") -> List[Box]:
    """The objects of the label file ``path`` of a ``width`` x ``height`` image (as displayed):
    [(class index, [x, y, w, h] pixels clipped to the image)]. ``num_classes``: the names of
    ``names_source``; ``keypoint_values``: numbers after the box on a pose line (0: not pose data)."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not a text file ({error}); {_FORMAT}, one object per line") from None
    boxes = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            boxes.append(_read_line(line, f"{path}:{number}", num_classes, width, height, keypoint_values, names_source))
    return boxes


def _read_line(line: str, where: str, num_classes: int, width: int, height: int, keypoint_values: int, names_source: str) -> Box:
    try:
        values = [float(token) for token in line.split()]
    except ValueError:
        raise DataError(f"{where}: {line.strip()!r} is not all numbers; {_FORMAT}, normalized to [0, 1]") from None
    count = len(values) - 1
    if keypoint_values:
        if count != 4 + keypoint_values:
            raise DataError(f"{where}: {len(values)} numbers, but kpt_shape in {names_source} makes a line 'class cx cy w h' "
                            f"and {keypoint_values} keypoint values ({5 + keypoint_values} numbers); fix the line or kpt_shape")
        coordinates = values[1:5]
    elif count == 4 or (count >= 6 and count % 2 == 0):
        coordinates = values[1:]
    else:
        raise DataError(f"{where}: {len(values)} numbers; {_FORMAT} (a class and at least three x y pairs)")
    label = values[0]
    if not label.is_integer() or not 0 <= label < num_classes:
        raise DataError(f"{where}: class {line.split()[0]} is not a class index 0..{num_classes - 1} of the {num_classes} names in "
                        f"{names_source}; fix the index, or add the class to names there")
    for value in coordinates:
        if not -COORDINATE_TOLERANCE <= value <= 1 + COORDINATE_TOLERANCE:  # NaN fails too
            raise DataError(f"{where}: coordinate {value:g} is outside [0, 1]; YOLO labels are fractions of the image's "
                            "width and height (divide pixel values by them)")
    if count == 4 or keypoint_values:
        cx, cy, w, h = coordinates
        left, top, right, bottom = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    else:
        xs, ys = coordinates[0::2], coordinates[1::2]
        left, top, right, bottom = min(xs), min(ys), max(xs), max(ys)
    # clipped to the image, in pixels of the image as displayed
    x0, x1 = (min(max(v, 0.0), 1.0) * width for v in (left, right))
    y0, y1 = (min(max(v, 0.0), 1.0) * height for v in (top, bottom))
    return int(label), [x0, y0, x1 - x0, y1 - y0]
