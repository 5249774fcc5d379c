"""tools/eval.py on a tiny COCO-format set with sparse category ids and unreadable images,
with a randomly initialized tiny model (no training needed)."""
import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
from hydra.utils import instantiate

from cli import compose_config, run_tool

CATEGORY_IDS = [1, 7, 42]  # a model for this set has 43 logits, 40 of them for no category


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """DIR/val2017 with four 64x48 images (two batches of two) and DIR/tiny.pth, a tiny_test model."""
    root = tmp_path_factory.mktemp("sparse_ids")
    os.makedirs(root / "val2017")
    os.makedirs(root / "annotations")
    images, annotations = [], []
    for image_id in range(1, 5):
        pixels = np.random.default_rng(image_id).integers(0, 256, (48, 64, 3), dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(root / "val2017" / f"{image_id:03d}.png")
        images.append({"id": image_id, "file_name": f"{image_id:03d}.png", "width": 64, "height": 48})
        category = CATEGORY_IDS[image_id % 3]
        annotations.append({"id": image_id, "image_id": image_id, "category_id": category, "bbox": [8, 8, 30, 20], "area": 600, "iscrowd": 0})
    categories = [{"id": i, "name": f"category{i}"} for i in CATEGORY_IDS]
    with open(root / "annotations" / "instances_val2017.json", "w") as handle:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, handle)
    torch.manual_seed(0)
    model = instantiate(compose_config("eval", ["experiment=tiny_test", "checkpoint=unused"]).model, num_classes=43)
    torch.save({"model": model.state_dict(), "num_classes": 43}, root / "tiny.pth")
    return root


def evaluate(root, run_dir, *extra):
    return run_tool(
        "eval", f"checkpoint={root / 'tiny.pth'}", "experiment=tiny_test", "dataset=coco", f"dataset.root={root}",
        "dataset.num_workers=0", "dataset.eval_batch_size=2", "device=cpu", f"hydra.run.dir={run_dir}", *extra,
    )


def predicted_ids(run_dir):
    return {p["category_id"] for p in json.loads((run_dir / "predictions.json").read_text())}


@pytest.mark.slow
def test_predictions_carry_only_the_dataset_category_ids(tiny_set, tmp_path):
    result = evaluate(tiny_set, tmp_path / "restricted")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert predicted_ids(tmp_path / "restricted") == set(CATEGORY_IDS)

    result = evaluate(tiny_set, tmp_path / "official", "postprocess.restrict_to_dataset_categories=false")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not predicted_ids(tmp_path / "official") <= set(CATEGORY_IDS)  # the official selection, every logit


@pytest.mark.slow
def test_a_batch_of_only_unreadable_images_is_skipped_and_counted(tiny_set, tmp_path):
    broken = tmp_path / "broken"
    os.makedirs(broken / "val2017")
    os.symlink(tiny_set / "annotations", broken / "annotations")
    os.symlink(tiny_set / "tiny.pth", broken / "tiny.pth")
    for image_id in range(1, 5):
        target = broken / "val2017" / f"{image_id:03d}.png"
        if image_id <= 2:  # the whole first batch
            target.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
        else:
            os.symlink(tiny_set / "val2017" / target.name, target)
    result = evaluate(broken, tmp_path / "failing")
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        f"error: dataset.root: image {broken / 'val2017' / '001.png'} (id 1) cannot be decoded (cannot identify image file "
        f"'{broken / 'val2017' / '001.png'}'); replace the file, or enable skipping of unreadable images (dataset.skip_unreadable=true)"
    ]

    run = tmp_path / "run"
    result = evaluate(broken, run, "dataset.skip_unreadable=true")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "evaluation: 2 unreadable images skipped" in result.stdout
    assert {p["image_id"] for p in json.loads((run / "predictions.json").read_text())} == {3, 4}
    assert (run / "metrics.json").is_file()
