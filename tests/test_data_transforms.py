import random

import numpy as np
import PIL.Image
import pytest
import torch
import torchvision.transforms.functional as F

from deformable_detr.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RandomSizeCrop,
    crop,
    get_size_with_aspect_ratio,
    hflip,
    make_eval_transforms,
    make_train_transforms,
    resize,
)
from deformable_detr.utils.box_ops import box_cxcywh_to_xyxy


def _image(width, height, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def _target(boxes, labels=None):
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    n = len(boxes)
    return {
        "boxes": boxes,
        "labels": torch.as_tensor(labels if labels is not None else list(range(1, n + 1)), dtype=torch.int64),
        "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
        "iscrowd": torch.zeros(n, dtype=torch.int64),
    }


# (w, h), size, max_size -> (h, w), computed by hand from the reference formula.
SIZE_CASES = [
    ((640, 480), 800, 1333, (800, 1066)),  # landscape: int(800 * 640 / 480) = int(1066.67)
    ((480, 640), 800, 1333, (1066, 800)),  # portrait
    ((333, 500), 800, 1333, (1201, 800)),  # truncation: int(800 * 500 / 333) = int(1201.2)
    ((500, 500), 800, 1333, (800, 800)),  # square
    ((1000, 400), 800, 1333, (533, 1332)),  # max-size: round(1333 * 0.4) = 533; int(533 * 2.5) = int(1332.5)
    ((200, 100), 800, 1333, (666, 1332)),  # max-size, round half to even: round(666.5) = 666
    ((1066, 800), 800, 1333, (800, 1066)),  # early return: shorter side already 800
    ((1333, 500), 800, 1333, (500, 1333)),  # early return after the max-size adjustment gives 500
    ((3000, 1000), 800, None, (800, 2400)),  # no max size
    ((300, 200), 160, 400, (160, 240)),  # small CPU recipe
    ((320, 192), 256, 400, (240, 400)),  # small recipe, max-size: round(400 * 192 / 320) = 240
]


@pytest.mark.parametrize("image_size, size, max_size, expected", SIZE_CASES)
def test_size_formula(image_size, size, max_size, expected):
    assert get_size_with_aspect_ratio(image_size, size, max_size) == expected


@pytest.mark.parametrize("image_size, size, max_size, expected", SIZE_CASES[:8])
def test_resize_output_and_box_scaling(image_size, size, max_size, expected):
    w, h = image_size
    image = _image(w, h)
    target = _target([[0, 0, w, h], [w / 4, h / 4, w / 2, h / 2]])
    out, out_target = resize(image, target, size, max_size)
    assert out.size == (expected[1], expected[0])
    assert out_target["size"].tolist() == list(expected)
    ratio_w, ratio_h = expected[1] / w, expected[0] / h
    scale = torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h])
    torch.testing.assert_close(out_target["boxes"], target["boxes"] * scale)
    torch.testing.assert_close(out_target["area"], target["area"] * ratio_w * ratio_h)


def test_eval_transforms_equal_plain_torchvision_pipeline():
    image = _image(500, 375, seed=3)
    target = _target([[10, 20, 110, 220]])
    tensor, out = make_eval_transforms()(image, target, random.Random(0))
    expected = F.normalize(F.to_tensor(F.resize(image, [800, 1066])), IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(tensor, expected)
    assert out["size"].tolist() == [800, 1066]
    # Normalized cxcywh boxes map back to the original pixels through orig size scaling.
    xyxy = box_cxcywh_to_xyxy(out["boxes"]) * torch.tensor([500, 375, 500, 375])
    torch.testing.assert_close(xyxy, target["boxes"], atol=1e-3, rtol=0)


def test_hflip_boxes_and_pixels():
    image = _image(100, 50)
    flipped, target = hflip(image, _target([[10, 20, 30, 40], [0, 0, 100, 50]]))
    assert target["boxes"].tolist() == [[70, 20, 90, 40], [0, 0, 100, 50]]
    assert np.array_equal(np.asarray(flipped), np.asarray(image)[:, ::-1])


def test_crop_clips_and_drops_empty_boxes():
    image = _image(100, 100)
    target = _target([[10, 10, 50, 50], [60, 60, 90, 90], [0, 0, 5, 5], [20, 75, 40, 95]], labels=[3, 5, 7, 9])
    target["iscrowd"] = torch.tensor([0, 1, 0, 0])
    cropped, out = crop(image, target, (20, 20, 50, 50))  # top, left, height, width
    assert cropped.size == (50, 50)
    assert out["size"].tolist() == [50, 50]
    # Third box lies outside (dropped); fourth becomes a zero-height line at the bottom (dropped).
    assert out["boxes"].tolist() == [[0, 0, 30, 30], [40, 40, 50, 50]]
    assert out["labels"].tolist() == [3, 5]
    assert out["area"].tolist() == [900, 100]
    assert out["iscrowd"].tolist() == [0, 1]


def test_random_size_crop_respects_bounds():
    rng = random.Random(5)
    transform = RandomSizeCrop(20, 40)
    for _ in range(50):
        image, target = transform(_image(64, 48), _target([[0, 0, 64, 48]]), rng)
        assert 20 <= image.size[0] <= 40 and 20 <= image.size[1] <= 40
        assert target["size"].tolist() == [image.size[1], image.size[0]]
    # An image smaller than min_size is kept whole instead of failing.
    image, _ = transform(_image(15, 12), _target([[0, 0, 15, 12]]), rng)
    assert image.size == (15, 12)


@pytest.mark.parametrize(
    "kwargs, scales, max_size",
    [
        ({}, list(range(480, 801, 32)), 1333),
        (
            dict(
                scales=[160, 192, 224, 256],
                max_size=400,
                crop_resize_sizes=[160, 200],
                crop_min_size=128,
                crop_max_size=200,
            ),
            [160, 192, 224, 256],
            400,
        ),
    ],
)
def test_train_transforms_output_sizes_and_boxes(kwargs, scales, max_size):
    transform = make_train_transforms(**kwargs)
    rng = random.Random(11)
    seen_sizes = set()
    for trial in range(30):
        image = _image(320 + trial, 240)
        tensor, target = transform(image, _target([[40, 30, 200, 180], [300, 200, 319, 239]]), rng)
        h, w = tensor.shape[-2:]
        assert target["size"].tolist() == [h, w]
        short, long = min(h, w), max(h, w)
        # Either the shorter side is one of the scales or the longer side was capped.
        assert short in scales or long <= max_size
        assert long <= max_size
        seen_sizes.add(short)
        boxes = target["boxes"]
        assert boxes.dtype == torch.float32 and boxes.shape[1] == 4
        assert torch.all((boxes >= 0) & (boxes <= 1))
        assert torch.all(boxes[:, 2:] > 0)
        assert len(boxes) == len(target["labels"]) == len(target["area"]) == len(target["iscrowd"])
    assert len(seen_sizes) > 2


def test_train_transforms_are_a_function_of_the_random_source():
    transform = make_train_transforms(
        scales=[96, 128, 160], max_size=300, crop_resize_sizes=[120], crop_min_size=64, crop_max_size=100
    )
    image = _image(200, 150, seed=1)
    target = _target([[10, 10, 120, 100]])
    first = transform(image, target, random.Random("7:0:3"))
    second = transform(image, target, random.Random("7:0:3"))
    assert torch.equal(first[0], second[0])
    for key in first[1]:
        assert torch.equal(first[1][key], second[1][key])
    # Global generators do not influence the result.
    random.seed(123)
    torch.manual_seed(123)
    third = transform(image, target, random.Random("7:0:3"))
    assert torch.equal(first[0], third[0])
    outcomes = {tuple(transform(image, target, random.Random(f"7:0:{i}"))[0].shape) for i in range(20)}
    assert len(outcomes) > 1


@pytest.mark.parametrize("width, height", [(200, 150), (150, 200), (90, 90), (400, 60), (61, 260)])
def test_output_size_predicts_the_output_and_leaves_the_random_source_where_calling_does(width, height):
    # crop sides from below the image side to above it, and a max_size that caps long images
    transform = make_train_transforms(
        scales=[64, 80, 96], max_size=180, crop_resize_sizes=[70, 120], crop_min_size=50, crop_max_size=100
    )
    image = _image(width, height, seed=2)
    target = _target([[10, 10, 50, 40]])
    branches = set()
    for seed in range(40):
        called, predicted = random.Random(seed), random.Random(seed)
        tensor, _ = transform(image, target, called)
        out_w, out_h = transform.output_size((width, height), predicted)
        assert (out_h, out_w) == tuple(tensor.shape[-2:])
        assert called.random() == predicted.random()  # the same number of draws was made
        branches.add(tensor.shape[-1] * tensor.shape[-2])
    assert len(branches) > 3
