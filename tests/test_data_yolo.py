"""YOLO-format folders read as COCO-format data: the COCO view (sizes, pixel boxes, ids, names), the
forms of data.yaml, one-line errors naming the label file and line, and training, evaluation and
inference end to end."""
import json
import os

import numpy as np
import PIL.Image
import pytest
import torch

from cli import assert_ok, compose_config, run_tool_in_process, tiny
from deformable_detr import Detector
from deformable_detr.cli import runtime
from deformable_detr.cli.checks import check_config
from deformable_detr.cli.schema import TrainConfig
from deformable_detr.data import build_yolo_dataset, make_eval_transforms
from deformable_detr.data.coco import UnreadableImageError
from deformable_detr.data.settings import DatasetSettings
from deformable_detr.data.yolo import yolo_view
from deformable_detr.data.yolo_layout import YoloLayout, label_dir_of
from deformable_detr.errors import ConfigError, DataError, MissingFileError
from deformable_detr.inference.checkpoint_recipe import categories_of

NAMES = ["cat", "dog", "bird"]
EXIF_ORIENTATION = 0x0112


def write_image(path, width=80, height=64, seed=0, orientation=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))
    if orientation is None:
        image.save(path)
    else:
        exif = PIL.Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        image.save(path, exif=exif)


def write_split(root, split, labels, size=(80, 64), images="images/{split}", label_folder="labels/{split}"):
    """Images ``name`` of ``labels`` under ``root/images/split`` and, where the text is not None, their
    label files ``stem.txt`` under ``root/labels/split``."""
    for seed, (name, text) in enumerate(labels.items()):
        write_image(os.path.join(root, images.format(split=split), name), *size, seed=seed)
        if text is not None:
            label = os.path.join(root, label_folder.format(split=split), os.path.splitext(name)[0] + ".txt")
            os.makedirs(os.path.dirname(label), exist_ok=True)
            with open(label, "w") as handle:
                handle.write(text)


def write_data_yaml(root, text="names: [cat, dog, bird]\nnc: 3\ntrain: images/train\nval: images/val\n", name="data.yaml"):
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, name), "w") as handle:
        handle.write(text)
    return os.path.join(root, name)


def view(root, split="train", **kwargs):
    layout = YoloLayout.read(str(root))
    return yolo_view(layout, layout.image_dir(split), **kwargs)


def test_the_coco_view_has_each_image_size_pixel_boxes_and_the_names_as_ids(tmp_path):
    write_data_yaml(tmp_path)
    write_split(tmp_path, "train", {
        "a.png": "0 0.5 0.5 0.5 0.25\n2 0.25 0.75 0.5 0.5\n",
        "b.png": "",  # empty: an image without objects
        "c.png": None,  # no label file: the same
    })
    write_split(tmp_path, "train", {"sub/d.jpg": "1 0.5 0.5 1.0 1.0\n\n"}, size=(40, 20))  # sub-folders, blank lines
    # stored 80 x 64 with "rotate 90" in EXIF: displayed (and annotated) 64 wide, 80 high
    write_image(str(tmp_path / "images" / "train" / "e.jpg"), 80, 64, orientation=6)
    (tmp_path / "labels" / "train" / "e.txt").write_text("0 0.5 0.25 0.5 0.5\n")
    coco = view(tmp_path)
    images = {image["file_name"]: image for image in coco.dataset["images"]}
    assert list(images) == ["a.png", "b.png", "c.png", "e.jpg", os.path.join("sub", "d.jpg")]
    assert [image["id"] for image in coco.dataset["images"]] == [1, 2, 3, 4, 5]
    assert (images["a.png"]["width"], images["a.png"]["height"]) == (80, 64)
    assert (images["e.jpg"]["width"], images["e.jpg"]["height"]) == (64, 80)
    assert coco.cats == {0: {"id": 0, "name": "cat"}, 1: {"id": 1, "name": "dog"}, 2: {"id": 2, "name": "bird"}}

    def boxes(name):
        return [(a["category_id"], pytest.approx(a["bbox"]), pytest.approx(a["area"])) for a in coco.imgToAnns[images[name]["id"]]]

    assert boxes("a.png") == [(0, [20, 24, 40, 16], 640), (2, [0, 32, 40, 32], 1280)]
    assert boxes("b.png") == [] and boxes("c.png") == []
    assert boxes(os.path.join("sub", "d.jpg")) == [(1, [0, 0, 40, 20], 800)]
    assert boxes("e.jpg") == [(0, [16, 0, 32, 40], 1280)]
    assert len(coco.dataset["annotations"]) == 4 and {a["iscrowd"] for a in coco.dataset["annotations"]} == {0}


def test_the_dataset_reads_items_like_coco_data(tmp_path):
    write_data_yaml(tmp_path)
    write_split(tmp_path, "val", {"a.png": "1 0.5 0.5 0.5 0.25\n", "b.png": ""})
    write_image(str(tmp_path / "images" / "val" / "c.jpg"), 80, 64, orientation=6)
    dataset = build_yolo_dataset(str(tmp_path), "val", make_eval_transforms(64, 128), context="dataset.root")
    assert len(dataset) == 3 and dataset.category_ids == [0, 1, 2] and dataset.category_names == dict(enumerate(NAMES))
    assert dataset.annotation_file == str(tmp_path / "data.yaml")
    image, target = dataset[0]
    assert image.shape == (3, 64, 80) and target["labels"].tolist() == [1]
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.5, 0.5, 0.5, 0.25]]))
    assert dataset[1][1]["labels"].tolist() == []
    assert dataset[2][1]["orig_size"].tolist() == [80, 64]  # decoded upright, as the view says


def test_polygons_count_as_their_box_and_pose_lines_as_theirs(tmp_path):
    write_data_yaml(tmp_path)
    write_split(tmp_path, "train", {"a.png": "1 0.1 0.25 0.6 0.25 0.5 0.75 0.2 0.5\n"})
    assert [a["bbox"] for a in view(tmp_path).dataset["annotations"]] == [pytest.approx([8, 16, 40, 32])]
    pose = tmp_path / "pose"
    write_data_yaml(pose, "names: [person]\nkpt_shape: [2, 3]\n")
    # keypoint values are not coordinates of the box: visibility flags (2) are not checked
    write_split(pose, "train", {"a.png": "0 0.5 0.5 0.5 0.25 0.4 0.4 2 0.6 0.6 2\n"})
    assert [a["bbox"] for a in view(pose).dataset["annotations"]] == [pytest.approx([20, 24, 40, 16])]
    (pose / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.5 0.25\n")
    with pytest.raises(DataError, match=r"a\.txt:1: 5 numbers, but kpt_shape in .*data\.yaml makes a line 'class cx cy w h' and 6 keypoint values"):
        view(pose)


def test_coordinates_may_leave_the_image_by_the_tolerance_and_are_clipped(tmp_path):
    write_data_yaml(tmp_path)
    write_split(tmp_path, "train", {"a.png": "0 0.5 0.5 1.00005 1.0\n0 0.9 0.5 0.4 0.5\n"})
    assert [a["bbox"] for a in view(tmp_path).dataset["annotations"]] == [pytest.approx([0, 0, 80, 64]), pytest.approx([56, 16, 24, 32])]


@pytest.mark.parametrize(
    "line,message",
    [
        ("3 0.5 0.5 0.2 0.2", r"class 3 is not a class index 0\.\.2 of the 3 names in .*data\.yaml; fix the index, or add the class to names there"),
        ("-1 0.5 0.5 0.2 0.2", r"class -1 is not a class index 0\.\.2"),
        ("1.5 0.5 0.5 0.2 0.2", r"class 1\.5 is not a class index 0\.\.2"),
        ("0 1.2 0.5 0.2 0.2", r"coordinate 1\.2 is outside \[0, 1\]; YOLO labels are fractions of the image's width and height"),
        ("0 0.5 -0.01 0.2 0.2", r"coordinate -0\.01 is outside \[0, 1\]"),
        ("0 40 32 20 10", r"coordinate 40 is outside \[0, 1\].*\(divide pixel values by them\)"),
        ("0 nan 0.5 0.2 0.2", r"coordinate nan is outside \[0, 1\]"),
        ("0 0.1 0.1 0.2 0.1 0.3 0.3 0.5", r"8 numbers; a line is 'class cx cy w h' \(5 numbers\) or a polygon"),
        ("0 0.5 0.5 0.2", r"4 numbers; a line is 'class cx cy w h' \(5 numbers\) or a polygon 'class x1 y1 x2 y2 x3 y3 \.\.\.'"),
        ("0 0.5 0.5 0.2 0.2 0.3", r"6 numbers; .*\(a class and at least three x y pairs\)"),
        ("cat 0.5 0.5 0.2 0.2", r"'cat 0\.5 0\.5 0\.2 0\.2' is not all numbers; a line is 'class cx cy w h'"),
    ],
)
def test_a_bad_label_line_is_one_error_naming_the_file_and_line(tmp_path, line, message):
    write_data_yaml(tmp_path)
    write_split(tmp_path, "train", {"a.png": f"0 0.5 0.5 0.2 0.2\n{line}\n"})
    with pytest.raises(DataError, match=f"^{tmp_path / 'labels' / 'train' / 'a.txt'}:2: {message}") as error:
        view(tmp_path)
    assert "\n" not in str(error.value)


def test_a_label_file_that_is_not_text_is_an_error_naming_it(tmp_path):
    write_data_yaml(tmp_path)
    write_split(tmp_path, "train", {"a.png": ""})
    (tmp_path / "labels" / "train" / "a.txt").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(DataError, match=f"^{tmp_path / 'labels' / 'train' / 'a.txt'} is not a text file .*one object per line$"):
        view(tmp_path)


def test_a_label_file_without_its_image_is_an_error_naming_it(tmp_path):
    write_data_yaml(tmp_path)
    write_split(tmp_path, "train", {"a.png": "0 0.5 0.5 0.2 0.2\n"})
    (tmp_path / "labels" / "train" / "classes.txt").write_text("cat\ndog\nbird\n")  # LabelImg's names: not a label file
    (tmp_path / "labels" / "train" / "ghost.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DataError, match=f"^{tmp_path / 'labels' / 'train' / 'ghost.txt'} has no image {tmp_path / 'images' / 'train' / 'ghost'}"
                                        r"\.\* .*; restore the image, or remove the label file$"):
        view(tmp_path)


def test_a_split_without_label_folder_has_no_objects_and_without_images_is_an_error(tmp_path):
    write_data_yaml(tmp_path)
    write_split(tmp_path, "train", {"a.png": None})
    assert len(view(tmp_path).dataset["images"]) == 1 and view(tmp_path).dataset["annotations"] == []
    os.makedirs(tmp_path / "images" / "val")
    with pytest.raises(DataError, match=r"images/val holds no images \(\.jpg, .*\); put them there, or point .*data\.yaml's train/val"):
        view(tmp_path, "val")


def test_an_unreadable_image_fails_or_is_left_out_with_skip_unreadable(tmp_path):
    write_data_yaml(tmp_path)
    write_split(tmp_path, "train", {"a.png": "0 0.5 0.5 0.2 0.2\n"})
    (tmp_path / "images" / "train" / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(UnreadableImageError, match=r"broken\.jpg cannot be read .*dataset\.skip_unreadable=true"):
        view(tmp_path)
    assert [image["file_name"] for image in view(tmp_path, skip_unreadable=True).dataset["images"]] == ["a.png"]


@pytest.mark.parametrize(
    "text,error,message",
    [
        (None, MissingFileError, r"dataset\.root=.* has no data\.yaml; write .*data\.yaml with the class names in class-index order"),
        ("nc: 3\n", DataError, r"data\.yaml has no names; add the class names in class-index order, e.g\. names: \[cat, dog\]"),
        ("names: []\n", DataError, r"data\.yaml: names is \[\]; list the class names"),
        ("names: [a, b]\nnc: 3\n", DataError, r"data\.yaml: nc is 3 but names has 2 classes; make them agree"),
        ("names: {0: a, 2: c}\n", DataError, r"data\.yaml: names has class indices \[0, 2\]; they must be 0\.\.1"),
        ("names: [a, b\n", DataError, r"data\.yaml is not valid YAML \(.*line \d+.*\); fix the file"),
        ("- a\n- b\n", DataError, r"data\.yaml is not a mapping of keys"),
        ("names: [a]\ntrain: [images/a, images/b]\n", DataError, r"data\.yaml: train: \['images/a', 'images/b'\] is not a folder; point train at"),
        ("names: [a]\ntrain: train.txt\n", DataError, r"data\.yaml: train: train\.txt is not a folder"),
        ("names: [a]\nkpt_shape: 17\n", DataError, r"data\.yaml: kpt_shape: 17 is not \[keypoints, values per keypoint\]"),
    ],
)
def test_a_bad_data_yaml_is_one_error_naming_it(tmp_path, text, error, message):
    if text is not None:
        write_data_yaml(tmp_path, text)
    with pytest.raises(error, match=message) as raised:
        YoloLayout.read(str(tmp_path))
    assert "\n" not in str(raised.value)


def test_data_yaml_forms_names_as_a_dict_path_and_ultralytics_relative_folders(tmp_path):
    # Roboflow's export: ROOT/{train,valid}/{images,labels} and "../train/images", read as "train/images"
    roboflow = tmp_path / "roboflow"
    write_data_yaml(roboflow, "train: ../train/images\nval: ../valid/images\nnc: 2\nnames: {'0': a, '1': b}\n")
    write_split(roboflow, "train", {"x.png": "1 0.5 0.5 0.5 0.5\n"}, images="train/images", label_folder="train/labels")
    layout = YoloLayout.read(str(roboflow))
    assert layout.names == ["a", "b"] and layout.image_dir("train") == str(roboflow / "train" / "images")
    assert [a["category_id"] for a in view(roboflow).dataset["annotations"]] == [1]
    with pytest.raises(MissingFileError, match=r"data\.yaml: val: \.\./valid/images is no folder .*; point val at the folder of the val images"):
        layout.image_dir("val")
    # path: another folder (absolute); a path of another machine's datasets folder falls back to data.yaml's
    elsewhere = tmp_path / "elsewhere"
    write_split(elsewhere, "val", {"y.png": ""})
    assert YoloLayout.read(write_data_yaml(tmp_path / "p", f"path: {elsewhere}\nnames: [a]\n")).image_dir("val") == str(elsewhere / "images" / "val")
    write_split(tmp_path / "q", "val", {"y.png": ""})
    write_data_yaml(tmp_path / "q", "path: ../datasets/coco8\nval: images/val\nnames: [a]\n", name="coco8.yaml")
    assert YoloLayout.read(str(tmp_path / "q" / "coco8.yaml")).image_dir("val") == str(tmp_path / "q" / "images" / "val")
    with pytest.raises(MissingFileError, match=r"names no train folder and .*images/train does not exist; add train: "):
        YoloLayout.read(str(tmp_path / "q" / "coco8.yaml")).image_dir("train")


def test_label_folders_replace_the_last_images_folder():
    assert label_dir_of("/d/images/train") == "/d/labels/train"
    assert label_dir_of("/d/train/images") == "/d/train/labels"
    assert label_dir_of("/images/x/images/y") == "/images/x/labels/y"
    assert label_dir_of("/d/pictures") == "/d/pictures"


def test_the_dataset_kind_switch(tmp_path):
    write_data_yaml(tmp_path)
    write_split(tmp_path, "val", {"a.png": ""})
    cfg = compose_config("train", ["dataset=yolo", f"dataset.root={tmp_path}"])
    check_config(cfg, TrainConfig)
    data = runtime.dataset_settings(cfg.dataset)
    assert data.kind == "yolo" and data.default_num_classes() == 3
    assert runtime.build_dataset(data, "val", runtime.dataset_root(data), 0).category_ids == [0, 1, 2]
    with pytest.raises(ConfigError, match=r"dataset\.root=.* is a YOLO-format dataset \(data\.yaml, images/, labels/\), not COCO: add dataset=yolo"):
        runtime.build_dataset(DatasetSettings(kind="coco", root=str(tmp_path)), "val", str(tmp_path), 0)
    with pytest.raises(ConfigError, match=r"dataset\.root is required: dataset=yolo dataset\.root=DIR with DIR/data\.yaml"):
        runtime.dataset_root(DatasetSettings(kind="yolo"))
    with pytest.raises(ConfigError, match=r"dataset\.val_annotations is for COCO-format data; with dataset=yolo, .* remove it"):
        DatasetSettings(kind="yolo", root=str(tmp_path), val_annotations="x.json")


def test_a_checkpoint_without_categories_names_them_from_data_yaml(tmp_path):
    write_data_yaml(tmp_path)
    assert categories_of({"model": {}}, {"dataset": {"kind": "yolo", "root": str(tmp_path)}}) == [{"id": i, "name": n} for i, n in enumerate(NAMES)]
    assert categories_of({"model": {}}, {"dataset": {"kind": "yolo", "root": str(tmp_path / "gone")}}) is None


def write_dataset(root):
    write_data_yaml(root)
    for split, count in (("train", 4), ("val", 3)):
        write_split(root, split, {f"{i}.png": f"{i % 3} 0.4 0.5 0.5 0.5\n{(i + 1) % 3} 0.7 0.3 0.25 0.25\n" for i in range(count)})


@pytest.fixture(scope="module")
def yolo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("yolo")
    write_dataset(root / "data")
    run = root / "run"
    result = run_tool_in_process("train", *tiny(run, root / "data", "dataset=yolo", "trainer.epochs=1"))
    assert_ok(result)
    return root, run, result


def test_training_on_a_yolo_folder_carries_its_ids_and_names(yolo_run):
    root, run, result = yolo_run
    assert "3 categories (ids up to 2; 3 logits, one per id)" in result.stdout
    checkpoint = torch.load(run / "checkpoint_last.pth", weights_only=True)
    assert checkpoint["categories"] == [{"id": i, "name": n} for i, n in enumerate(NAMES)] and checkpoint["num_classes"] == 3
    predictions = json.loads((run / "predictions.json").read_text())
    assert predictions and {p["category_id"] for p in predictions} <= {0, 1, 2}
    metrics = json.loads((run / "metrics.json").read_text())
    assert [(row["id"], row["name"], row["instances"]) for row in metrics["per_category"]] == [(0, "cat", 2), (1, "dog", 2), (2, "bird", 2)]


def test_a_yolo_checkpoint_evaluates_and_names_its_classes(yolo_run):
    root, run, _ = yolo_run
    evaluation = root / "evaluation"
    assert_ok(run_tool_in_process("eval", f"checkpoint={run / 'checkpoint_last.pth'}", f"hydra.run.dir={evaluation}", "device=cpu"))
    assert {p["category_id"] for p in json.loads((evaluation / "predictions.json").read_text())} <= {0, 1, 2}
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert [row["name"] for row in metrics["per_category"]] == NAMES and metrics["dataset"]["annotations"].endswith("data.yaml")
    named = root / "evaluation_named"  # the dataset named on the command line, by its .yaml file
    assert_ok(run_tool_in_process("eval", f"checkpoint={run / 'checkpoint_last.pth'}", "dataset=yolo", f"dataset.root={root / 'data' / 'data.yaml'}",
                                  f"hydra.run.dir={named}", "device=cpu"))
    assert [row["id"] for row in json.loads((named / "metrics.json").read_text())["per_category"]] == [0, 1, 2]
    inference = root / "inference"
    assert_ok(run_tool_in_process("infer", f"checkpoint={run / 'checkpoint_last.pth'}", f"input={root / 'data' / 'images' / 'val'}",
                                  "score_threshold=0", f"hydra.run.dir={inference}", "device=cpu"))
    detections = [d for image in json.loads((inference / "predictions.json").read_text()) for d in image["detections"]]
    assert detections and {(d["category_id"], d["category_name"]) for d in detections} <= set(enumerate(NAMES))
    result = Detector.from_checkpoint(str(run / "checkpoint_last.pth"), device="cpu").predict(str(root / "data" / "images" / "val" / "0.png"),
                                                                                            score_threshold=0)
    assert set(result.names) <= set(NAMES) and len(result.names) == len(result.labels) > 0


def test_a_bad_label_stops_the_tool_with_one_line(tmp_path):
    write_dataset(tmp_path / "data")
    (tmp_path / "data" / "labels" / "val" / "1.txt").write_text("0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.2 0.2\n")
    result = run_tool_in_process("train", *tiny(tmp_path / "run", tmp_path / "data", "dataset=yolo"))
    assert result.returncode == 2
    assert f"error: {tmp_path / 'data' / 'labels' / 'val' / '1.txt'}:2: class 7 is not a class index 0..2" in result.stderr
    coco = run_tool_in_process("train", *tiny(tmp_path / "coco_run", tmp_path / "data", "dataset=coco"))
    assert coco.returncode == 2 and "not COCO: add dataset=yolo" in coco.stderr
