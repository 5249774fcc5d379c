"""tools/infer.py on a tiny random model and tiny images, and the image-file and drawing helpers.

Two runs start the tool as a command (``run_tool``); the others run it in this process, which takes
seconds instead of an interpreter's start-up each."""
import json
import os

import PIL.Image
import pytest
import torch

from cli import assert_ok, run_tool, run_tool_in_process
from deformable_detr.data.image_files import list_image_files, read_image
from deformable_detr.errors import DataError, MissingFileError
from deformable_detr.visualization import draw_detections
from inference_fixtures import CATEGORIES, make_checkpoint, make_image

CATEGORY_IDS = {c["id"] for c in CATEGORIES}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny.pth")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    make_image(folder / "b_wide.png", 96, 64, seed=1)
    make_image(folder / "a_small.jpg", 160, 120, seed=2)
    # stored 80 wide, 48 high; the EXIF tag says to view it turned 90 degrees: 48 wide, 80 high
    make_image(folder / "c_rotated.jpg", 80, 48, seed=3, exif_orientation=6)
    (folder / "notes.txt").write_text("not an image")
    return folder


def infer(checkpoint, source, run_dir, *extra, command=False):
    arguments = [f"checkpoint={checkpoint}", f"input={source}", f"hydra.run.dir={run_dir}", "device=cpu", "score_threshold=0"]
    if command:
        return run_tool("infer", *arguments, *extra)
    return run_tool_in_process("infer", *arguments, "num_workers=0", *extra)


def assert_one_line_error(result, *needles):
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.slow
def test_folder_writes_pictures_and_predictions(checkpoint, images, tmp_path):
    run = tmp_path / "run"
    assert_ok(infer(checkpoint, images, run, "batch_size=2", command=True))
    predictions = json.loads((run / "predictions.json").read_text())
    assert [p["file_name"] for p in predictions] == ["a_small.jpg", "b_wide.png", "c_rotated.jpg"]
    sizes = {p["file_name"]: (p["width"], p["height"]) for p in predictions}
    assert sizes == {"a_small.jpg": (160, 120), "b_wide.png": (96, 64), "c_rotated.jpg": (48, 80)}
    for entry in predictions:
        picture = PIL.Image.open(run / entry["picture"])
        assert picture.size == (entry["width"], entry["height"])
        assert entry["detections"], entry
        # only the dataset's categories, with their names; 10 queries x 6 categories at most
        assert len(entry["detections"]) <= 60
        for detection in entry["detections"]:
            assert set(detection) == {"category_id", "category_name", "score", "bbox"}
            assert detection["category_id"] in CATEGORY_IDS
            assert detection["category_name"] == {c["id"]: c["name"] for c in CATEGORIES}[detection["category_id"]]
        scores = [d["score"] for d in entry["detections"]]
        assert scores == sorted(scores, reverse=True)


def test_boxes_are_in_original_pixels(checkpoint, images, tmp_path):
    """The same numbers as running the model by hand and scaling its normalized boxes by the original size."""
    import random

    from deformable_detr.data import make_eval_transforms, pad_images
    from deformable_detr.models.category_mask import keep_categories
    from deformable_detr.models.postprocess import PostProcess
    from model_builders import instantiate_checkpoint_model

    run = tmp_path / "run"
    assert_ok(infer(checkpoint, images / "c_rotated.jpg", run))
    detections = json.loads((run / "predictions.json").read_text())[0]["detections"]
    model, cfg = instantiate_checkpoint_model(checkpoint)
    image = read_image(str(images / "c_rotated.jpg"))
    tensor, _ = make_eval_transforms(cfg["dataset"]["eval_transforms"]["size"], cfg["dataset"]["eval_transforms"]["max_size"])(image, None, random.Random(0))
    with torch.no_grad():
        outputs = model(*pad_images([tensor]))
    outputs["pred_logits"] = keep_categories(outputs["pred_logits"], CATEGORY_IDS)
    best = PostProcess(100)(outputs, torch.tensor([[80, 48]]))[0]
    x0, y0, x1, y1 = best["boxes"][0].tolist()
    assert detections[0]["category_id"] == int(best["labels"][0])
    assert detections[0]["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=0.01)


def test_glob_and_single_file(checkpoint, images, tmp_path):
    assert_ok(infer(checkpoint, images / "*.jpg", tmp_path / "glob", "picture_format=jpg", "amp=bf16"))
    predictions = json.loads((tmp_path / "glob" / "predictions.json").read_text())
    assert [p["file_name"] for p in predictions] == ["a_small.jpg", "c_rotated.jpg"]
    assert sorted(f for f in os.listdir(tmp_path / "glob") if f.endswith(".jpg")) == ["a_small.jpg", "c_rotated.jpg"]

    assert_ok(infer(checkpoint, images / "b_wide.png", tmp_path / "single", "score_threshold=0.99"))
    predictions = json.loads((tmp_path / "single" / "predictions.json").read_text())
    assert len(predictions) == 1 and predictions[0]["detections"] == []
    assert (tmp_path / "single" / "b_wide.png").is_file()


def test_empty_folder_unmatched_glob_and_bad_checkpoint_are_one_line_errors(checkpoint, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(infer(checkpoint, empty, tmp_path / "a"), f"input={empty}", "without images")
    assert_one_line_error(infer(checkpoint, tmp_path / "*.png", tmp_path / "b"), "matches no image")
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    make_image(tmp_path / "one.png", 32, 32)
    assert_one_line_error(infer(text, tmp_path / "one.png", tmp_path / "c"), f"checkpoint={text}", "not a readable PyTorch checkpoint")


@pytest.mark.slow
def test_unreadable_file_is_an_error_or_skipped(checkpoint, images, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    make_image(folder / "good.png", 64, 64)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    # decoded in a worker process: the message still comes back as one line naming the file
    result = infer(checkpoint, folder, tmp_path / "a", "num_workers=1", command=True)
    assert_one_line_error(result, str(folder / "broken.jpg"), "cannot be decoded", "skip_unreadable=true")
    result = infer(checkpoint, folder, tmp_path / "b", "skip_unreadable=true")
    assert_ok(result)
    assert "1 unreadable image(s) skipped" in result.stdout
    assert [p["file_name"] for p in json.loads((tmp_path / "b" / "predictions.json").read_text())] == ["good.png"]


def test_list_image_files(images, tmp_path):
    assert [os.path.basename(p) for p in list_image_files(str(images))] == ["a_small.jpg", "b_wide.png", "c_rotated.jpg"]
    assert list_image_files(str(images / "notes.txt")) == [str(images / "notes.txt")]  # a file named explicitly is taken
    with pytest.raises(MissingFileError, match="does not exist"):
        list_image_files(str(tmp_path / "missing.png"))
    with pytest.raises(DataError, match="matches no image"):
        list_image_files(str(tmp_path / "*.jpg"))
    assert read_image(str(images / "c_rotated.jpg")).size == (48, 80)


@pytest.mark.parametrize("size", [(160, 120), (1333, 750)])
def test_draw_detections(size):
    width, height = size
    image = torch.rand(3, height, width)
    boxes = torch.tensor([[10.0, 10.0, width / 2, height / 2], [width / 3, height / 3, width - 5.0, height - 5.0]])
    drawn = draw_detections(image, boxes, torch.tensor([2, 5]), torch.tensor([0.9, 0.4]), {2: "circle", 5: "triangle"},
                            gt_boxes=boxes[:1] + 3, gt_labels=torch.tensor([2]))
    assert drawn.dtype == torch.uint8 and drawn.shape == (3, height, width)
    plain = (image * 255).round().to(torch.uint8)
    changed = (drawn != plain).any(0)
    # the box outlines are drawn, the image far from any box is untouched
    assert changed[height // 3 + 1 :, width // 3].any() and not changed[height - 2, 2]


def test_every_category_with_restriction_off(checkpoint, images, tmp_path):
    """``postprocess.restrict_to_dataset_categories=false`` selects over every logit, as the official code does."""
    assert_ok(infer(checkpoint, images / "b_wide.png", tmp_path, "postprocess.restrict_to_dataset_categories=false"))
    detections = json.loads((tmp_path / "predictions.json").read_text())[0]["detections"]
    assert len(detections) == 100 and {d["category_id"] for d in detections} - CATEGORY_IDS


def test_categories_come_from_the_checkpoint_else_the_recipe(tmp_path):
    from deformable_detr.data.coco_categories import COCO_CATEGORIES
    from deformable_detr.inference.checkpoint_recipe import categories_of

    stored = [{"id": 1, "name": "cat"}, {"id": 4, "name": "dog"}]
    synthetic = {"dataset": {"kind": "synthetic", "root": None}}
    assert categories_of({"model": {}, "categories": stored}, synthetic) == stored
    assert categories_of({"model": {}}, synthetic) == CATEGORIES
    official = {"model": {"backbone.0.body.conv1.weight": torch.zeros(1)}}
    assert categories_of(official, synthetic) == COCO_CATEGORIES and len(COCO_CATEGORIES) == 80
    annotations = tmp_path / "instances.json"
    annotations.write_text(json.dumps({"categories": [{"id": 7, "name": "kite", "supercategory": "x"}]}))
    own = {"dataset": {"kind": "coco", "root": None, "val_annotations": str(annotations)}}
    assert categories_of({"model": {}}, own) == [{"id": 7, "name": "kite"}]
    assert categories_of({"model": {}}, {"dataset": {"kind": "coco", "root": str(tmp_path)}}) is None


@pytest.mark.parametrize("tool", ["infer", "visualize"])
def test_configs_compose_for_every_experiment_and_reject_typos(tool):
    from cli import compose_config
    from deformable_detr.cli.checks import ConfigError, check_config
    from deformable_detr.cli.schema import InferConfig, VisualizeConfig
    from deformable_detr.models.weights import OFFICIAL_EXPERIMENTS

    schema = InferConfig if tool == "infer" else VisualizeConfig
    for experiment in list(OFFICIAL_EXPERIMENTS) + ["small"]:
        cfg = compose_config(tool, [f"experiment={experiment}", "checkpoint=x.pth", "input=x.png"])
        assert cfg.name == experiment and cfg.postprocess.restrict_to_dataset_categories is True
        if experiment in OFFICIAL_EXPERIMENTS:  # the official preprocessing
            assert cfg.dataset.eval_transforms.size == 800 and cfg.dataset.eval_transforms.max_size == 1333
    cfg = compose_config(tool, ["checkpoint=x.pth", "input=x.png", "+postprocess.num_selekt=3"])
    with pytest.raises(ConfigError, match="postprocess.num_selekt is not a parameter"):
        check_config(cfg, schema)


def test_jpeg_in_jpeg_out_and_the_format_can_be_chosen(checkpoint, images, tmp_path):
    assert_ok(infer(checkpoint, images, tmp_path / "auto"))
    pictures = {p["file_name"]: p["picture"] for p in json.loads((tmp_path / "auto" / "predictions.json").read_text())}
    assert pictures == {"a_small.jpg": "a_small.jpg", "b_wide.png": "b_wide.png", "c_rotated.jpg": "c_rotated.jpg"}
    assert PIL.Image.open(tmp_path / "auto" / "a_small.jpg").format == "JPEG"
    assert PIL.Image.open(tmp_path / "auto" / "b_wide.png").format == "PNG"
    assert_ok(infer(checkpoint, images, tmp_path / "png", "picture_format=png"))
    assert sorted(p.name for p in (tmp_path / "png").glob("*.png")) == ["a_small.png", "b_wide.png", "c_rotated.png"]


def test_nothing_above_the_threshold_says_the_best_score_and_how_to_lower_it(checkpoint, images, tmp_path):
    result = infer(checkpoint, images / "b_wide.png", tmp_path / "run", "score_threshold=0.99")
    assert_ok(result)
    assert json.loads((tmp_path / "run" / "predictions.json").read_text())[0]["detections"] == []
    line = next(line for line in result.stdout.splitlines() if "no detection scored above" in line)
    best = float(line.split("the best scored ")[1].split(")")[0])
    assert 0 < best < 0.99 and "lower it, e.g. score_threshold=" in line

