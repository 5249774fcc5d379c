import json
import multiprocessing
import os

import numpy as np
import PIL.Image
import pytest
from pycocotools.coco import COCO

from deformable_detr.data.coco import build_coco_dataset
from deformable_detr.data.synthetic import (
    MANIFEST_NAME,
    SyntheticConfig,
    ensure_synthetic_dataset,
    object_size_counts,
)
from deformable_detr.data.transforms import make_eval_transforms

SMALL = SyntheticConfig(
    num_train_images=6, num_val_images=3, min_image_size=64, max_image_size=96, empty_image_fraction=0.2
)


def _files(root):
    found = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, root)] = handle.read()
    return found


def _annotations(root, split):
    with open(os.path.join(root, "annotations", f"instances_{split}2017.json")) as handle:
        return json.load(handle)


def test_same_parameters_give_identical_bytes(tmp_path):
    first = ensure_synthetic_dataset(str(tmp_path / "a"), SMALL)
    second = ensure_synthetic_dataset(str(tmp_path / "b"), SMALL)
    files = _files(first)
    assert files == _files(second)
    expected = {MANIFEST_NAME, "annotations/instances_train2017.json", "annotations/instances_val2017.json"}
    expected |= {f"train2017/{i:012d}.png" for i in range(1, 7)} | {f"val2017/{i:012d}.png" for i in range(1, 4)}
    assert set(files) == expected
    assert sorted(os.listdir(tmp_path)) == [".a.lock", ".b.lock", "a", "b"]  # no staging left behind


def test_existing_dataset_is_reused(tmp_path):
    root = ensure_synthetic_dataset(str(tmp_path / "synthetic"), SMALL)
    stamps = {path: os.stat(os.path.join(root, path)).st_mtime_ns for path in _files(root)}
    inode = os.stat(root).st_ino
    assert ensure_synthetic_dataset(str(tmp_path / "synthetic"), SMALL) == root
    assert os.stat(root).st_ino == inode
    assert {path: os.stat(os.path.join(root, path)).st_mtime_ns for path in _files(root)} == stamps


def test_changed_parameters_regenerate(tmp_path):
    root = ensure_synthetic_dataset(str(tmp_path / "synthetic"), SMALL)
    before = _files(root)
    changed = SyntheticConfig(**{**SMALL.__dict__, "seed": 1, "num_train_images": 4})
    ensure_synthetic_dataset(root, changed)
    after = _files(root)
    assert after != before
    assert len([path for path in after if path.startswith("train2017")]) == 4
    with open(os.path.join(root, MANIFEST_NAME)) as handle:
        assert json.load(handle)["parameters"]["seed"] == 1
    assert sorted(os.listdir(tmp_path)) == [".synthetic.lock", "synthetic"]
    # The regenerated files equal a fresh generation with the new parameters.
    assert after == _files(ensure_synthetic_dataset(str(tmp_path / "fresh"), changed))


def test_refuses_to_overwrite_a_foreign_directory(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="is not a synthetic dataset"):
        ensure_synthetic_dataset(str(tmp_path / "data"), SMALL)
    assert (tmp_path / "data" / "mine.txt").read_text() == "keep"


def test_invalid_parameters_are_named():
    with pytest.raises(ValueError, match="max_image_size=50 must be >= min_image_size=64"):
        SyntheticConfig(min_image_size=64, max_image_size=50)
    with pytest.raises(ValueError, match="size_probabilities"):
        SyntheticConfig(size_probabilities=(0.5, 0.5, 0.5))


def _ensure(args):
    root, config = args
    return ensure_synthetic_dataset(root, config)


@pytest.mark.multiprocess
def test_concurrent_callers_share_one_generation(tmp_path):
    root = str(tmp_path / "synthetic")
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.map(_ensure, [(root, SMALL)] * 2)
    assert results == [root] * 2
    assert _files(root) == _files(ensure_synthetic_dataset(str(tmp_path / "reference"), SMALL))
    assert sorted(os.listdir(tmp_path)) == [".reference.lock", ".synthetic.lock", "reference", "synthetic"]


def test_content_is_a_valid_and_varied_coco_set(tmp_path):
    config = SyntheticConfig(num_train_images=40, num_val_images=10, empty_image_fraction=0.1)
    root = ensure_synthetic_dataset(str(tmp_path / "synthetic"), config)
    data = _annotations(root, "train")
    categories = {category["id"]: category["name"] for category in data["categories"]}
    assert len(categories) >= 6
    ids = sorted(categories)
    assert ids != list(range(ids[0], ids[0] + len(ids)))  # ids have gaps
    assert all(category["supercategory"] for category in data["categories"])

    annotations = data["annotations"]
    counts = object_size_counts(annotations)
    assert all(count > 0 for count in counts.values()), counts
    assert {annotation["category_id"] for annotation in annotations} == set(categories)
    assert len({annotation["id"] for annotation in annotations}) == len(annotations)

    images = {image["id"]: image for image in data["images"]}
    with_objects = {annotation["image_id"] for annotation in annotations}
    assert len(set(images) - with_objects) == 4  # 10% of 40 images are empty

    for image in data["images"]:
        low, high = config.min_image_size, config.max_image_size
        assert low <= image["width"] <= high and low <= image["height"] <= high
        with PIL.Image.open(os.path.join(root, "train2017", image["file_name"])) as stored:
            assert stored.size == (image["width"], image["height"]) and stored.mode == "RGB"
    for annotation in annotations:
        x, y, w, h = annotation["bbox"]
        image = images[annotation["image_id"]]
        assert x >= 0 and y >= 0 and w > 0 and h > 0
        assert x + w <= image["width"] and y + h <= image["height"]
        assert 0 < annotation["area"] <= w * h
        assert annotation["iscrowd"] == 0
        assert len(annotation["segmentation"][0]) >= 6

    coco = COCO(os.path.join(root, "annotations", "instances_val2017.json"))
    assert len(coco.getImgIds()) == 10
    dataset = build_coco_dataset(root, "train", make_eval_transforms(size=128, max_size=256))
    assert dataset.num_classes == max(ids) + 1
    image, target = dataset[0]
    assert image.shape[0] == 3 and min(image.shape[1:]) == 128


def test_backgrounds_are_textured(tmp_path):
    root = ensure_synthetic_dataset(str(tmp_path / "synthetic"), SMALL)
    data = _annotations(root, "train")
    empty = set(image["id"] for image in data["images"]) - {a["image_id"] for a in data["annotations"]}
    assert empty
    for image in data["images"]:
        if image["id"] in empty:
            pixels = np.asarray(PIL.Image.open(os.path.join(root, "train2017", image["file_name"])), dtype=np.float32)
            assert pixels.std() > 1.0


def test_home_directory_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    root = ensure_synthetic_dataset("~/cache/synthetic", SMALL)
    assert root == str(tmp_path / "cache" / "synthetic")
    assert build_coco_dataset("~/cache/synthetic", "val", make_eval_transforms(size=64, max_size=128)).num_classes == 22


def _hue_vote_accuracy(colour_by_category, scenes=24):
    """Share of single-shape scenes whose category is the one whose hue most of the shape's
    saturated pixels are near (pixels inside the shape's outline)."""
    import PIL.ImageDraw

    from deformable_detr.data.synthetic_scene import render_scene
    from deformable_detr.data.synthetic_shapes import SHAPE_CATEGORIES

    hues = {category_id: index / len(SHAPE_CATEGORIES) for index, (category_id, _) in enumerate(SHAPE_CATEGORIES)}
    correct = 0
    for index in range(scenes):
        rng = np.random.default_rng(index)
        image, objects = render_scene(rng, 96, 96, 1, (0.0, 0.0, 1.0), 0.3, colour_by_category=colour_by_category)
        assert len(objects) == 1
        inside = PIL.Image.new("L", (96, 96))
        PIL.ImageDraw.Draw(inside).polygon(objects[0].outline, fill=1)
        hsv = np.asarray(PIL.Image.fromarray(image).convert("HSV"))[np.asarray(inside, dtype=bool)]
        pixel_hues = hsv[hsv[:, 1] > 0.4 * 255, 0] / 256.0  # hue in [0, 1) of the saturated pixels

        def votes(hue):
            distance = np.abs(pixel_hues - hue)
            return int((np.minimum(distance, 1 - distance) < 0.07).sum())

        correct += max(hues, key=lambda category_id: votes(hues[category_id])) == objects[0].category_id
    return correct / scenes


def test_colour_by_category_makes_hue_a_class_cue():
    assert _hue_vote_accuracy(True) >= 0.9
    assert _hue_vote_accuracy(False) <= 0.6


def test_colour_choice_is_part_of_the_manifest(tmp_path):
    root = ensure_synthetic_dataset(str(tmp_path / "synthetic"), SMALL)
    with open(os.path.join(root, MANIFEST_NAME)) as handle:
        assert json.load(handle)["parameters"]["colour_by_category"] is True
    random_colours = SyntheticConfig(**{**SMALL.__dict__, "colour_by_category": False})
    ensure_synthetic_dataset(root, random_colours)
    with open(os.path.join(root, MANIFEST_NAME)) as handle:
        assert json.load(handle)["parameters"]["colour_by_category"] is False


def test_min_small_area_bounds_the_smallest_shapes():
    from deformable_detr.data.synthetic_scene import render_scene

    def smallest(min_small_area):
        areas = []
        for index in range(30):
            # one small shape per scene: no occlusion, so the area is the drawn shape's
            _, objects = render_scene(np.random.default_rng(index), 96, 96, 1, (1.0, 0.0, 0.0), 0.3, min_small_area=min_small_area)
            areas += [scene_object.area for scene_object in objects]
        return min(areas), max(areas)

    low, high = smallest(300.0)
    assert 0.85 * 300 <= low and high < 32**2
    assert smallest(80.0)[0] < 300 * 0.85
    with pytest.raises(ValueError, match="min_small_area"):
        SyntheticConfig(min_small_area=1000)
