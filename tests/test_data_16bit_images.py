"""16-bit PNGs (grey, grey+alpha, RGB, RGBA) come out as 8-bit RGB scaled from 0..65535 to 0..255,
wherever images are read: the COCO dataset, image files for infer/visualize, the Python API."""
import json
import struct
import zlib

import numpy as np
import PIL.Image
import pytest

from deformable_detr.data.coco import CocoDetection
from deformable_detr.data.image_files import read_image, to_rgb
from deformable_detr.inference.images import as_rgb_image

# PNG colour types: 0 grey, 4 grey+alpha, 2 RGB, 6 RGBA
COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}


def write_16bit_png(path, samples):
    """A 16-bit PNG of ``samples`` (H, W) or (H, W, C) uint16, written by hand: PIL writes 16 bits only for grey."""
    height, width = samples.shape[:2]
    channels = 1 if samples.ndim == 2 else samples.shape[2]
    rows = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(height))  # filter 0 per row

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, COLOUR_TYPES[channels], 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def scaled(samples):
    """0..65535 -> 0..255, rounded."""
    return np.round(samples.astype(np.float64) * 255 / 65535).astype(np.uint8)


GREY = np.array([[0, 1, 128, 129, 257], [32767, 32768, 40000, 65279, 65535]], dtype=np.uint16)


def test_16bit_grey_pngs_are_scaled_not_clipped_to_white(tmp_path):
    path = tmp_path / "grey16.png"
    PIL.Image.fromarray(GREY).save(path)
    assert PIL.Image.open(path).mode == "I;16"  # what PIL decodes it as
    pixels = np.asarray(read_image(str(path)))
    assert pixels.dtype == np.uint8 and pixels.shape == (2, 5, 3)
    for channel in range(3):
        np.testing.assert_array_equal(pixels[..., channel], scaled(GREY))
    assert pixels[0, :, 0].tolist() == [0, 0, 0, 1, 1] and pixels[1, -1, 0] == 255


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_every_16bit_grey_mode_is_scaled(mode):
    image = PIL.Image.fromarray(GREY).convert("I") if mode == "I" else PIL.Image.fromarray(GREY.astype(">u2" if mode == "I;16B" else "<u2"))
    assert image.mode == mode
    np.testing.assert_array_equal(np.asarray(to_rgb(image))[..., 1], scaled(GREY))


@pytest.mark.parametrize("channels", [2, 3, 4])
def test_16bit_colour_and_grey_alpha_pngs_keep_their_high_byte(tmp_path, channels):
    samples = np.random.default_rng(channels).integers(0, 65536, size=(6, 7, channels), dtype=np.uint16)
    path = tmp_path / f"colour16_{channels}.png"
    write_16bit_png(path, samples)
    assert PIL.Image.open(path).mode == ("RGB" if channels == 3 else "RGBA")  # PIL reduces these to 8 bits itself
    pixels = np.asarray(read_image(str(path)))
    high = (samples >> 8).astype(np.uint8)
    expected = np.repeat(high[..., :1], 3, axis=2) if channels == 2 else high[..., :3]
    np.testing.assert_array_equal(pixels, expected)
    assert np.abs(pixels.astype(int) - scaled(samples[..., :3] if channels > 2 else np.repeat(samples[..., :1], 3, axis=2))).max() <= 1


def test_the_coco_dataset_and_the_api_scale_16bit_grey(tmp_path):
    (tmp_path / "images").mkdir()
    PIL.Image.fromarray(GREY).save(tmp_path / "images" / "grey16.png")
    annotations = tmp_path / "annotations.json"
    annotations.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "grey16.png", "width": 5, "height": 2}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], "area": 4, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "thing"}],
    }))
    dataset = CocoDetection(str(tmp_path / "images"), str(annotations), lambda image, target, rng: (image, target))
    image, _ = dataset[0]
    np.testing.assert_array_equal(np.asarray(image)[..., 2], scaled(GREY))
    np.testing.assert_array_equal(np.asarray(as_rgb_image(PIL.Image.open(tmp_path / "images" / "grey16.png")))[..., 0], scaled(GREY))
    np.testing.assert_array_equal(np.asarray(as_rgb_image(tmp_path / "images" / "grey16.png"))[..., 0], scaled(GREY))
