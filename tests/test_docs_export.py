"""docs/export.md's onnxruntime example runs on an exported model and reproduces tools/infer.py's detections."""
import json
import os
import random
import re

import numpy as np
import pytest

from cli import run_tool
from deformable_detr.data import make_eval_transforms
from deformable_detr.data.image_files import read_image
from deformable_detr_ops import library_loaded
from inference_fixtures import make_checkpoint, make_image

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "export.md")


def onnxruntime_block():
    with open(DOC, encoding="utf-8") as markdown:
        blocks = re.findall(r"^```python\n(.*?)^```$", markdown.read(), flags=re.DOTALL | re.MULTILINE)
    return next(block for block in blocks if "onnxruntime.InferenceSession" in block)


def test_the_example_needs_neither_torch_nor_this_project():
    imported = set(re.findall(r"^(?:import|from) (\w+)", onnxruntime_block(), flags=re.MULTILINE))
    assert imported == {"json", "numpy", "onnxruntime", "PIL"}


def unmatched(expected, found, box_tolerance=0.1, score_tolerance=1e-4):
    """Infer's detections (bbox [x, y, w, h]) that no detection of the example (box xyxy) reproduces:
    the same category, each box coordinate within ``box_tolerance`` px, the score within ``score_tolerance``."""
    free = list(found)
    missing = []
    for detection in expected:
        x, y, w, h = detection["bbox"]
        for candidate in free:
            if (candidate["category_id"] == detection["category_id"] and candidate["name"] == detection["category_name"]
                    and abs(candidate["score"] - detection["score"]) <= score_tolerance
                    and np.abs(np.subtract(candidate["box"], [x, y, x + w, y + h])).max() <= box_tolerance):
                free.remove(candidate)
                break
        else:
            missing.append(detection)
    return missing


@pytest.mark.slow
@pytest.mark.skipif(not library_loaded(), reason="export needs the compiled op")
def test_the_example_reproduces_infer(tmp_path, monkeypatch, capsys):
    checkpoint = make_checkpoint(str(tmp_path / "checkpoint.pth"))
    images = tmp_path / "images"
    images.mkdir()
    make_image(str(images / "photo.jpg"), 96, 72, seed=1)
    make_image(str(images / "wide.png"), 250, 90, seed=2)  # the longer side caps the resize: 127 x 46
    export = run_tool("export", f"checkpoint={checkpoint}", f"input={images}", "latency_runs=0", f"hydra.run.dir={tmp_path / 'export'}")
    assert export.returncode == 0, export.stdout[-3000:] + export.stderr[-3000:]
    infer = run_tool("infer", f"checkpoint={checkpoint}", f"input={images}", "score_threshold=0", "batch_size=1", "num_workers=0",
                     "device=cpu", f"hydra.run.dir={tmp_path / 'infer'}")
    assert infer.returncode == 0, infer.stdout[-3000:] + infer.stderr[-3000:]
    with open(tmp_path / "infer" / "predictions.json") as f:
        predictions = {p["file_name"]: p["detections"] for p in json.load(f)}

    monkeypatch.chdir(tmp_path / "export")
    transforms = make_eval_transforms(64, 128)
    for name in ("photo.jpg", "wide.png"):
        path = str(images / name)
        namespace = {}
        exec(compile(onnxruntime_block().replace('"photo.jpg"', repr(path)), DOC, "exec"), namespace)
        expected = transforms(read_image(path), None, random.Random(0))[0].numpy()
        assert np.array_equal(namespace["pixels"].transpose(2, 0, 1), expected), name  # the same pixels as evaluation
        found, wanted = namespace["detections"], predictions[name]
        assert len(found) == len(wanted) == 60  # 10 queries x 6 categories, all kept at threshold 0
        assert found[0]["category_id"] == wanted[0]["category_id"]
        assert unmatched(wanted, found) == [], name
    assert len(capsys.readouterr().out.splitlines()) == 6
