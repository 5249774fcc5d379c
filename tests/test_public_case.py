"""The official implementation's detections on the public case are reproduced through tools/eval.py."""
import json
import os

import pytest

from cli import run_tool
from official_files import PUBLIC_CASE, public_case_checkpoint


def matched_fraction(reference, candidate):
    """A reference detection matches a candidate of the same image and category with box IoU >= 0.999
    and score within 2e-4."""
    def iou(a, b):
        iw = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
        union = a[2] * a[3] + b[2] * b[3] - iw * ih
        return iw * ih / union if union > 0 else float(a == b)

    hits = 0
    for r in reference:
        pool = [c for c in candidate if c["image_id"] == r["image_id"] and c["category_id"] == r["category_id"]]
        hits += any(abs(c["score"] - r["score"]) <= 2e-4 and iou(c["bbox"], r["bbox"]) >= 0.999 for c in pool)
    return hits / len(reference)


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
def test_public_case_matches_the_official_detections(tmp_path, compiled):
    """compiled: the same through torch.compile's generated code (inductor, dynamic sizes)."""
    checkpoint = public_case_checkpoint(str(tmp_path / "single_scale.pth"))
    run = tmp_path / "run"
    result = run_tool(
        "eval", "experiment=r50_deformable_detr_single_scale", f"checkpoint={checkpoint}", "dataset=coco",
        f"dataset.root={os.path.join(PUBLIC_CASE, 'minicoco')}", f"hydra.run.dir={run}", "device=cpu",
        f"compile={str(compiled).lower()}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    compiled_line = [line for line in (run / "eval.log").read_text().splitlines() if "torch.compile: " in line]
    assert bool(compiled_line) == compiled and (not compiled or " 0 graph" not in compiled_line[0])
    reference = json.loads(open(os.path.join(PUBLIC_CASE, "r50_deformable_detr_single_scale.detections.json")).read())
    candidate = json.loads((run / "predictions.json").read_text())
    assert len(candidate) == len(reference) == 200
    assert matched_fraction(reference, candidate) == 1.0
    metrics = json.loads((run / "metrics.json").read_text())
    stats = {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"}
    assert set(metrics) == stats | {"per_category", "checkpoint", "precision", "dataset"}
    assert {row["id"] for row in metrics["per_category"]} <= set(range(1, 91))
    # what was measured: the checkpoint, the precision and the dataset
    assert metrics["checkpoint"] == {"path": checkpoint, "recipe": "r50_deformable_detr_single_scale", "epoch": 49, "step": None}
    assert metrics["precision"] == "float32"
    assert metrics["dataset"] == {"annotations": os.path.join(PUBLIC_CASE, "minicoco", "annotations", "instances_val2017.json"), "images": 2}


@pytest.mark.slow
def test_official_files_need_no_experiment_flag(tmp_path):
    checkpoint = public_case_checkpoint(str(tmp_path / "single_scale.pth"))
    result = run_tool(
        "eval", f"checkpoint={checkpoint}", "dataset=coco", f"dataset.root={os.path.join(PUBLIC_CASE, 'minicoco')}",
        f"hydra.run.dir={tmp_path / 'run'}", "device=cpu", "dataset.eval_batch_size=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "using experiment=r50_deformable_detr_single_scale" in result.stdout
