import json
import os
import random

import numpy as np
import PIL.Image
import pytest
import torch
from torch.utils.data import DataLoader

from deformable_detr.data.coco import CocoDetection, UnreadableImageError, build_coco_dataset
from deformable_detr.errors import DataError
from deformable_detr.data.coco_annotations import AnnotationFormatError
from deformable_detr.data.collate import collate
from deformable_detr.data.transforms import Compose, Normalize, RandomSelect, ToTensor, make_train_transforms

PLAIN = Compose([ToTensor(), Normalize()])


def _annotation(annotation_id, image_id, category_id, bbox, iscrowd=0, area=None):
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "area": area if area is not None else bbox[2] * bbox[3],
        "iscrowd": iscrowd,
        "segmentation": [[bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]]],
    }


def _write_layout(root, split="val", images=None, annotations=None, categories=None):
    """COCO layout with three 40x30 images: 1 with objects, 2 without, 3 with only a crowd."""
    image_dir = os.path.join(root, f"{split}2017")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    if images is None:
        images = [{"id": i, "file_name": f"{i:03d}.png", "width": 40, "height": 30} for i in (1, 2, 3)]
    for position, image in enumerate(images):
        pixels = np.full((image["height"], image["width"], 3), 40 * position, dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(os.path.join(image_dir, image["file_name"]))
    if annotations is None:
        annotations = [
            _annotation(1, 1, 7, [4, 3, 10, 6], area=37.5),
            _annotation(2, 1, 1, [30, 20, 20, 20]),  # runs past the right/bottom edge: clipped
            _annotation(3, 1, 7, [10, 10, 0, 5]),  # zero width: dropped
            _annotation(4, 1, 1, [45, 5, 5, 5]),  # entirely right of the image: empty after clipping
            _annotation(5, 1, 1, [0, 0, 40, 30], iscrowd=1),  # crowd: not a target
            _annotation(6, 3, 7, [0, 0, 10, 10], iscrowd=1),
        ]
    if categories is None:
        categories = [{"id": 1, "name": "one", "supercategory": "x"}, {"id": 7, "name": "seven", "supercategory": "x"}]
    annotation_file = os.path.join(root, "annotations", f"instances_{split}2017.json")
    with open(annotation_file, "w") as handle:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, handle)
    return image_dir, annotation_file


def test_targets_follow_the_reference_conversion(tmp_path):
    _write_layout(str(tmp_path))
    dataset = build_coco_dataset(str(tmp_path), "val", PLAIN)
    assert len(dataset) == 3
    assert dataset.num_classes == 8
    assert dataset.category_names == {1: "one", 7: "seven"}
    image, target = dataset[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32
    assert target["labels"].tolist() == [7, 1]
    assert target["labels"].dtype == torch.int64
    # xyxy [4, 3, 14, 9] and clipped [30, 20, 40, 30], as cxcywh fractions of 40 x 30.
    expected = torch.tensor([[9 / 40, 6 / 30, 10 / 40, 6 / 30], [35 / 40, 25 / 30, 10 / 40, 10 / 30]])
    torch.testing.assert_close(target["boxes"], expected)
    assert target["boxes"].dtype == torch.float32
    # Area comes from the annotation file, not from the box.
    assert target["area"].tolist() == [37.5, 400.0] and target["area"].dtype == torch.float32
    assert target["iscrowd"].tolist() == [0, 0] and target["iscrowd"].dtype == torch.int64
    assert target["image_id"].shape == () and int(target["image_id"]) == 1
    assert target["orig_size"].tolist() == [30, 40] and target["size"].tolist() == [30, 40]
    assert target["orig_size"].dtype == torch.int64 and target["size"].dtype == torch.int64


@pytest.mark.parametrize("index", [1, 2])
def test_images_without_targets_have_empty_tensors(tmp_path, index):
    _write_layout(str(tmp_path))
    dataset = build_coco_dataset(str(tmp_path), "val", PLAIN)
    _, target = dataset[index]  # image 2 has no annotation, image 3 only a crowd
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    assert target["area"].shape == (0,) and target["iscrowd"].shape == (0,)


def test_empty_images_survive_training_transforms(tmp_path):
    _write_layout(str(tmp_path))
    transforms = make_train_transforms(
        scales=[24, 32], max_size=64, crop_resize_sizes=[30], crop_min_size=16, crop_max_size=24
    )
    dataset = build_coco_dataset(str(tmp_path), "val", transforms)
    for epoch in range(3):
        dataset.set_epoch(epoch)
        _, target = dataset[1]
        assert target["boxes"].shape == (0, 4)


def test_missing_root(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="dataset.root=.*nowhere does not exist; expected the COCO 2017 layout"):
        build_coco_dataset(missing, "val", PLAIN, context="dataset.root")


def test_missing_annotation_file(tmp_path):
    os.makedirs(tmp_path / "val2017")
    with pytest.raises(FileNotFoundError) as error:
        build_coco_dataset(str(tmp_path), "val", PLAIN, context="dataset.root")
    message = str(error.value)
    assert message.startswith(f"dataset.root={tmp_path} has no annotations/instances_val2017.json")
    assert "expected the COCO 2017 layout" in message


def test_missing_image_directory(tmp_path):
    _write_layout(str(tmp_path), split="train")
    os.rename(tmp_path / "train2017", tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="has no train2017/ image directory"):
        build_coco_dataset(str(tmp_path), "train", PLAIN)
    with pytest.raises(FileNotFoundError, match="image directory .*train2017 does not exist"):
        CocoDetection(str(tmp_path / "train2017"), str(tmp_path / "annotations" / "instances_train2017.json"), PLAIN)


def test_missing_annotation_file_for_any_coco_set(tmp_path):
    os.makedirs(tmp_path / "images")
    with pytest.raises(FileNotFoundError, match=r"labels\.json does not exist"):
        CocoDetection(str(tmp_path / "images"), str(tmp_path / "labels.json"), PLAIN, context="custom set")


def test_malformed_json_names_the_file(tmp_path):
    _, annotation_file = _write_layout(str(tmp_path))
    with open(annotation_file, "w") as handle:
        handle.write('{"images": [')
    with pytest.raises(AnnotationFormatError, match="instances_val2017.json is not valid JSON"):
        build_coco_dataset(str(tmp_path), "val", PLAIN)


@pytest.mark.parametrize(
    "content, problem",
    [
        ([], "the top level is a list"),
        ({"images": [], "annotations": []}, 'missing list "categories"'),
        (
            {"images": [{"id": 1}], "annotations": [], "categories": [{"id": 1}]},
            r'images\[0\] needs "id" and "file_name"',
        ),
        (
            {"images": [], "annotations": [{"id": 1, "image_id": 1, "category_id": 1}], "categories": [{"id": 1}]},
            r'annotations\[0\] has no "bbox"',
        ),
    ],
)
def test_structurally_wrong_annotation_file(tmp_path, content, problem):
    _, annotation_file = _write_layout(str(tmp_path))
    with open(annotation_file, "w") as handle:
        json.dump(content, handle)
    with pytest.raises(AnnotationFormatError, match=f"instances_val2017.json is not in COCO format: {problem}"):
        build_coco_dataset(str(tmp_path), "val", PLAIN)


def test_missing_image_file(tmp_path):
    image_dir, _ = _write_layout(str(tmp_path))
    os.remove(os.path.join(image_dir, "002.png"))
    dataset = build_coco_dataset(str(tmp_path), "val", PLAIN)
    message = r"image .*002\.png \(id 2 in .*instances_val2017\.json\) does not exist"
    with pytest.raises(FileNotFoundError, match=message):
        dataset[1]


def _corrupt(image_dir):
    with open(os.path.join(image_dir, "002.png"), "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n this is not an image")


def test_corrupt_image_raises_naming_the_file(tmp_path):
    image_dir, _ = _write_layout(str(tmp_path))
    _corrupt(image_dir)
    dataset = build_coco_dataset(str(tmp_path), "val", PLAIN)
    with pytest.raises(UnreadableImageError, match=r"002\.png \(id 2\) cannot be decoded"):
        dataset[1]


def test_truncated_image_raises(tmp_path):
    image_dir, _ = _write_layout(str(tmp_path))
    path = os.path.join(image_dir, "001.png")
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path)
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
    dataset = build_coco_dataset(str(tmp_path), "val", PLAIN)
    with pytest.raises(UnreadableImageError, match="001.png"):
        dataset[0]


def test_unreadable_images_skipped_and_counted(tmp_path):
    image_dir, _ = _write_layout(str(tmp_path))
    _corrupt(image_dir)
    os.remove(os.path.join(image_dir, "003.png"))
    dataset = build_coco_dataset(str(tmp_path), "val", PLAIN, skip_unreadable=True)
    assert dataset[1] is None and dataset[2] is None
    assert dataset[0] is not None
    assert dataset.skipped.value == 2
    images, masks, targets = collate([dataset[i] for i in range(3)])
    assert images.shape[0] == 1 and [int(t["image_id"]) for t in targets] == [1]


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_skip_counter_sees_worker_processes(tmp_path, context):
    image_dir, _ = _write_layout(str(tmp_path))
    _corrupt(image_dir)
    dataset = build_coco_dataset(str(tmp_path), "val", PLAIN, skip_unreadable=True)
    loader = DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=collate, multiprocessing_context=context)
    batches = list(loader)
    assert sum(len(targets) for _, _, targets in batches) == 2
    assert dataset.skipped.value == 1


def _sideways_photo(path):
    """A JPEG stored 96 wide x 64 high with EXIF "rotate 90 clockwise" (orientation 6), as phones
    write them: displayed 64 wide x 96 high. A red patch at the stored top-left shows top-right."""
    pixels = np.zeros((64, 96, 3), dtype=np.uint8)
    pixels[:16, :16] = (255, 0, 0)
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    PIL.Image.fromarray(pixels).save(path, exif=exif, quality=95)


def test_exif_orientation_is_applied(tmp_path):
    images = [{"id": 1, "file_name": "photo.jpg", "width": 64, "height": 96}]
    annotations = [_annotation(1, 1, 1, [48, 0, 16, 16])]  # the red patch, as a labelling tool shows it
    image_dir, _ = _write_layout(str(tmp_path), images=images, annotations=annotations)
    _sideways_photo(os.path.join(image_dir, "photo.jpg"))
    image, target = build_coco_dataset(str(tmp_path), "val", ToTensor())[0]
    assert image.shape == (3, 96, 64)
    assert target["orig_size"].tolist() == [96, 64]
    x0, y0, x1, y1 = target["boxes"][0].round().int().tolist()  # xyxy pixels of the displayed image
    red = image[0, y0 + 2:y1 - 2, x0 + 2:x1 - 2]
    assert red.min() > 0.8 and image[1:, y0 + 2:y1 - 2, x0 + 2:x1 - 2].max() < 0.2


def test_image_of_another_size_than_its_annotation_raises_naming_both(tmp_path):
    images = [{"id": 1, "file_name": "001.png", "width": 40, "height": 30}]
    image_dir, _ = _write_layout(str(tmp_path), images=images, annotations=[])
    PIL.Image.new("RGB", (30, 40)).save(os.path.join(image_dir, "001.png"))  # the annotation's size, transposed
    dataset = build_coco_dataset(str(tmp_path), "val", PLAIN, context="dataset.root")
    message = r"dataset.root: image .*001\.png \(id 1\) is 30x40 .* but .*instances_val2017\.json says 40x30"
    with pytest.raises(DataError, match=message):
        dataset[0]


def test_image_of_another_size_is_skipped_and_counted(tmp_path):
    image_dir, _ = _write_layout(str(tmp_path))
    PIL.Image.new("RGB", (41, 30)).save(os.path.join(image_dir, "002.png"))
    dataset = build_coco_dataset(str(tmp_path), "val", PLAIN, skip_unreadable=True)
    assert dataset[1] is None and dataset[0] is not None and dataset[2] is not None
    assert dataset.skipped.value == 1


def test_category_ids_are_those_of_the_file(tmp_path):
    _write_layout(str(tmp_path), categories=[{"id": 42, "name": "x"}, {"id": 7, "name": "y"}, {"id": 1, "name": "z"}])
    assert build_coco_dataset(str(tmp_path), "val", PLAIN).category_ids == [1, 7, 42]


def _train_dataset(root):
    images = [{"id": i, "file_name": f"{i:03d}.png", "width": 64 + i, "height": 48} for i in range(1, 7)]
    annotations = [_annotation(i, i, 1 + (i % 2) * 6, [5, 5, 30, 20]) for i in range(1, 7)]
    _write_layout(root, split="train", images=images, annotations=annotations)
    for image in images:  # textured pixels so that flips and crops change the tensors
        pixels = np.random.default_rng(image["id"]).integers(0, 256, (48, image["width"], 3), dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(os.path.join(root, "train2017", image["file_name"]))
    transforms = make_train_transforms(
        scales=[32, 40, 48], max_size=80, crop_resize_sizes=[40, 50], crop_min_size=24, crop_max_size=40
    )
    return build_coco_dataset(root, "train", transforms, seed=3)


def _same(first, second):
    return torch.equal(first[0], second[0]) and all(torch.equal(first[1][k], second[1][k]) for k in first[1])


def test_items_are_determined_by_seed_epoch_and_index(tmp_path):
    dataset = _train_dataset(str(tmp_path))
    other = _train_dataset(str(tmp_path))
    dataset.set_epoch(2)
    other.set_epoch(2)
    random.seed(0)
    torch.manual_seed(0)
    for index in range(len(dataset)):
        assert _same(dataset[index], other[index])
    # Another epoch or another seed changes the augmentation.
    other.set_epoch(3)
    assert not all(_same(dataset[i], other[i]) for i in range(len(dataset)))
    other.set_epoch(2)
    other.seed = 4
    assert not all(_same(dataset[i], other[i]) for i in range(len(dataset)))


def test_items_do_not_depend_on_worker_or_order(tmp_path):
    dataset = _train_dataset(str(tmp_path))
    dataset.set_epoch(1)
    expected = [dataset[i] for i in range(len(dataset))]
    order = [5, 2, 0, 4, 1, 3]
    loader = DataLoader(dataset, batch_size=None, sampler=order, num_workers=2)
    for index, item in zip(order, loader):
        assert _same(item, expected[index])


def test_dataset_can_be_copied_and_pickled(tmp_path):
    import copy
    import pickle

    image_dir, _ = _write_layout(str(tmp_path))
    _corrupt(image_dir)
    dataset = build_coco_dataset(str(tmp_path), "val", PLAIN, skip_unreadable=True)
    assert dataset[1] is None
    restored = pickle.loads(pickle.dumps(dataset))
    duplicate = copy.deepcopy(dataset)
    # Copies start from the current count but no longer share it.
    assert restored.skipped.value == duplicate.skipped.value == 1
    assert restored[1] is None and restored.skipped.value == 2 and dataset.skipped.value == 1
    assert _same(restored[0], dataset[0])


def test_output_sizes_are_the_loaded_sizes_without_reading_pixels(tmp_path, monkeypatch):
    dataset = _train_dataset(str(tmp_path))
    for epoch in (0, 5):
        dataset.set_epoch(epoch)
        loaded = [tuple(dataset[index][0].shape[-2:]) for index in range(len(dataset))]
        monkeypatch.setattr(PIL.Image, "open", None)  # prediction must not open an image
        assert dataset.output_sizes(epoch) == loaded
        monkeypatch.undo()
    assert dataset.output_sizes(0) != dataset.output_sizes(5)


def test_output_sizes_read_headers_when_the_annotations_give_no_size(tmp_path):
    written = [{"id": 2, "file_name": "002.png", "width": 40, "height": 30},
               {"id": 3, "file_name": "003.png", "width": 50, "height": 20}]
    image_dir, annotation_file = _write_layout(str(tmp_path), images=written, annotations=[])
    _sideways_photo(os.path.join(image_dir, "photo.jpg"))  # stored 96x64, displayed 64x96
    images = [{"id": 1, "file_name": "photo.jpg"}, written[0], {"id": 3, "file_name": "003.png"},
              {"id": 4, "file_name": "gone.png"}]
    with open(annotation_file, "w") as handle:
        json.dump({"images": images, "annotations": [], "categories": [{"id": 1, "name": "x"}]}, handle)
    dataset = build_coco_dataset(str(tmp_path), "val", PLAIN)
    assert dataset.source_sizes() == [(64, 96), (40, 30), (50, 20), None]
    assert dataset.output_sizes(0) == [(96, 64), (30, 40), (20, 50), (0, 0)]
    assert [tuple(dataset[index][0].shape[-2:]) for index in range(3)] == [(96, 64), (30, 40), (20, 50)]


def test_output_sizes_are_unknown_for_transforms_that_cannot_tell(tmp_path):
    _write_layout(str(tmp_path))
    dataset = build_coco_dataset(str(tmp_path), "val", lambda image, target, rng: (image, target))
    assert dataset.output_sizes(0) is None
    # a user's transform inside a Compose, or in a branch of a RandomSelect
    user = Compose([ToTensor(), lambda image, target, rng: (image, target)])
    assert build_coco_dataset(str(tmp_path), "val", user).output_sizes(0) is None
    branch = Compose([RandomSelect(ToTensor(), Compose([lambda image, target, rng: (image, target), ToTensor()]))])
    assert build_coco_dataset(str(tmp_path), "val", branch).output_sizes(0) is None
    assert build_coco_dataset(str(tmp_path), "val", Compose([RandomSelect(ToTensor(), PLAIN)])).output_sizes(0) == [(30, 40)] * 3


def test_the_training_loader_batches_by_size_when_asked(tmp_path):
    from deformable_detr.cli import runtime

    from deformable_detr.data.sampler import group_by_size
    from deformable_detr.errors import ConfigError

    dataset = _train_dataset(str(tmp_path))
    cpu = torch.device("cpu")
    plain = runtime.make_loader(dataset, 2, 0, True, 0, cpu)
    grouped = runtime.make_loader(dataset, 2, 0, True, 0, cpu, group_window=6)
    dataset.set_epoch(1)
    for loader in (plain, grouped):
        loader.sampler.set_epoch(1)
    sizes = dataset.output_sizes(1)
    order = group_by_size(list(plain.sampler), sizes, 6)
    assert list(grouped.sampler) == order != list(plain.sampler)
    batches = list(grouped)
    assert [tuple(images.shape[-2:]) for images, _, _ in batches] == [
        tuple(max(side) for side in zip(*(sizes[i] for i in order[k : k + 2]))) for k in range(0, 6, 2)
    ]
    assert runtime.describe_grouping(grouped) == ", batched by size (windows of 6 images)"
    assert runtime.describe_grouping(plain) == ""
    with pytest.raises(ConfigError, match="dataset.size_group_window=-1"):
        runtime.make_loader(dataset, 2, 0, True, 0, cpu, group_window=-1)


@pytest.mark.parametrize("workers", [0, 1])
def test_the_training_loader_pads_to_a_multiple_when_asked(tmp_path, workers):
    from deformable_detr.cli import runtime

    from deformable_detr.errors import ConfigError

    dataset = _train_dataset(str(tmp_path))
    cpu = torch.device("cpu")
    plain = runtime.make_loader(dataset, 2, workers, True, 0, cpu)
    padded = runtime.make_loader(dataset, 2, workers, True, 0, cpu, pad_multiple=32)
    for (images, masks, targets), (padded_images, padded_masks, padded_targets) in zip(plain, padded):
        h, w = images.shape[-2:]
        assert padded_images.shape[-2:] == (-(-h // 32) * 32, -(-w // 32) * 32)
        # the same images, targets and valid pixels: only masked zero rows and columns are added
        assert torch.equal(padded_images[..., :h, :w], images) and not padded_images[..., h:, :].any()
        assert torch.equal(padded_masks[:, :h, :w], masks) and padded_masks[:, h:].all() and padded_masks[..., w:].all()
        assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(targets, padded_targets))
    assert runtime.describe_padding(32) == ", padded to multiples of 32 px"
    assert runtime.describe_padding(0) == ""
    with pytest.raises(ConfigError, match="dataset.train_pad_multiple=-8"):
        runtime.make_loader(dataset, 2, 0, True, 0, cpu, pad_multiple=-8)


@pytest.mark.parametrize(
    "images, annotations, categories, problem",
    [
        ([{"id": i, "file_name": f"{i:03d}.png", "width": 40, "height": 30} for i in (1, 2, 1, 3, 2, 2)], [], None,
         r'2 image ids occur more than once in "images" \(1, 2\); give every image its own id'),
        (None, [_annotation(i, 1, 7, [4, 3, 10, 6]) for i in (9, 1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6, 9)], None,
         r'7 annotation ids occur more than once in "annotations" \(9, 1, 2, 3, 4, \.\.\.\); give every annotation its own id'),
        (None, None, [{"id": 1, "name": "one"}, {"id": 7, "name": "seven"}, {"id": 7, "name": "again"}],
         r'1 category id occurs more than once in "categories" \(7\); give every category its own id'),
    ],
    ids=["images", "annotations", "categories"],
)
def test_repeated_ids_name_the_file_the_ids_and_their_count(tmp_path, images, annotations, categories, problem):
    _write_layout(str(tmp_path), images=images, annotations=annotations, categories=categories)
    with pytest.raises(AnnotationFormatError, match=f"dataset.root: annotation file .*instances_val2017.json is not in COCO format: {problem}$"):
        build_coco_dataset(str(tmp_path), "val", PLAIN, context="dataset.root")
