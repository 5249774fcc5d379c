"""tools/train.py and tools/eval.py end to end on the tiny synthetic set."""
import json
import os

import pytest
import torch

from cli import assert_ok, run_tool, tiny, torchrun
from deformable_detr.evaluation.coco_evaluator import STAT_NAMES


def stats_of(metrics):
    """The 12 COCO stats of a metrics.json (which may also hold ``per_category``)."""
    return {name: metrics[name] for name in STAT_NAMES}


@pytest.mark.slow
def test_train_then_evaluate(tmp_path, data_root):
    run = tmp_path / "train"
    assert_ok(run_tool("train", *tiny(run, data_root, "trainer.keep_every=1")))
    for name in ("checkpoint_last.pth", "checkpoint_best.pth", "checkpoint_epoch0000.pth", "checkpoint_epoch0001.pth",
                 "config.yaml", "train.log", "metrics.json", "predictions.json", "log.jsonl"):
        assert (run / name).is_file(), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run / "tensorboard"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics)[:len(STAT_NAMES)] == list(STAT_NAMES)
    history = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history if "train_loss" in h] == [0, 1]
    checkpoint = torch.load(run / "checkpoint_last.pth", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["epoch_step"] == 0 and checkpoint["step"] == 8

    evaluation = tmp_path / "eval"
    result = run_tool("eval", f"checkpoint={run / 'checkpoint_last.pth'}", f"hydra.run.dir={evaluation}", "device=cpu")
    assert_ok(result)
    assert "AP50" in result.stdout and "circle" in result.stdout
    predictions = json.loads((evaluation / "predictions.json").read_text())
    assert {p["image_id"] for p in predictions} <= {1, 2, 3, 4}
    assert set(predictions[0]) == {"image_id", "category_id", "bbox", "score"}
    # the checkpoint's own config (tiny model, its synthetic set) was used: same numbers as training
    evaluated = json.loads((evaluation / "metrics.json").read_text())
    assert stats_of(evaluated) == stats_of(metrics)
    assert {row["name"] for row in evaluated["per_category"]} >= {"circle"}
    assert all({"id", "name", "instances", "AP", "AP50", "AP75"} <= set(row) for row in evaluated["per_category"])


@pytest.mark.slow
def test_run_finished_is_not_retrained(tmp_path, data_root):
    run = tmp_path / "train"
    assert_ok(run_tool("train", *tiny(run, data_root, "trainer.epochs=1")))
    result = run_tool("train", *tiny(run, data_root, "trainer.epochs=1"))
    assert_ok(result)
    assert "already finished" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("group_window", [0, 4])
def test_stopping_and_resuming_is_bit_identical(tmp_path, data_root, group_window):
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = ["trainer.epochs=3", "trainer.eval_every=10", "dataset.num_workers=1", f"dataset.size_group_window={group_window}"]
    result = run_tool("train", *tiny(whole, data_root, *common))
    assert_ok(result)
    assert ("batched by size" in result.stdout) == (group_window > 1)
    # stop mid-epoch after 5 of 12 steps, then once more at the end of an epoch, then finish
    assert_ok(run_tool("train", *tiny(split, data_root, *common, "trainer.max_steps=5")))
    stopped = torch.load(split / "checkpoint_last.pth", weights_only=True)
    assert (stopped["epoch"], stopped["epoch_step"], stopped["step"]) == (1, 1, 5)
    assert_ok(run_tool("train", *tiny(split, data_root, *common, "trainer.max_steps=8")))
    assert_ok(run_tool("train", *tiny(split, data_root, *common)))
    a = torch.load(whole / "checkpoint_last.pth", weights_only=True)
    b = torch.load(split / "checkpoint_last.pth", weights_only=True)
    assert a["step"] == b["step"] == 12
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][index][name])), (index, name)
    assert a["scheduler"] == b["scheduler"]


@pytest.mark.slow
def test_init_weights_fine_tunes_from_another_class_count(tmp_path, data_root):
    source = tmp_path / "source"
    assert_ok(run_tool("train", *tiny(source, data_root, "trainer.epochs=1", "dataset.num_classes=30")))
    target = tmp_path / "target"
    result = run_tool("train", *tiny(target, data_root, "trainer.epochs=1", f"init_weights={source / 'checkpoint_last.pth'}"))
    assert_ok(result)
    # The source checkpoint records its category names, so the heads are re-initialized by name.
    assert "the class heads (class_embed.*) are re-initialized for the dataset's categories, 6 of them copied" in result.stdout
    assert "6 of the dataset's 6 categories start from the checkpoint's category of the same name" in result.stdout


@pytest.mark.slow
def test_resume_refuses_another_model(tmp_path, data_root):
    run = tmp_path / "run"
    assert_ok(run_tool("train", *tiny(run, data_root, "trainer.epochs=2", "trainer.max_steps=2")))
    result = run_tool("train", *tiny(run, data_root, "trainer.epochs=2", "model.transformer.two_stage=true"))
    assert result.returncode != 0
    assert "resume with the run's original config" in result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_gloo_run(tmp_path, tmp_path_factory):
    run = tmp_path / "ddp"
    # 5 val images (the shared data_root has 4): a set of its own, outside tmp_path
    data_root = str(tmp_path_factory.mktemp("synthetic_5_val") / "data")
    result = run_tool("train", *tiny(run, data_root, "trainer.epochs=1", "dataset.synthetic.num_val_images=5"), launcher=torchrun(2), timeout=900)
    assert_ok(result)
    assert sorted(p for p in os.listdir(run) if p.endswith(".pth")) == ["checkpoint_best.pth", "checkpoint_last.pth"]
    assert len(os.listdir(tmp_path)) == 1  # one run directory for both ranks
    predictions = json.loads((run / "predictions.json").read_text())
    evaluated = "COCO box evaluation on 5 images"
    assert evaluated in (run / "train.log").read_text()
    checkpoint = torch.load(run / "checkpoint_last.pth", weights_only=True)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng"]) == 2
    # 8 training images over 2 ranks x batch 2: 2 steps per epoch
    assert checkpoint["step"] == 2
    assert {p["image_id"] for p in predictions} <= set(range(1, 6))

    evaluation = tmp_path / "ddp_eval"
    result = run_tool("eval", f"checkpoint={run / 'checkpoint_last.pth'}", f"hydra.run.dir={evaluation}", "device=cpu", launcher=torchrun(2), timeout=600)
    assert_ok(result)
    assert "COCO box evaluation on 5 images" in result.stdout
    assert stats_of(json.loads((evaluation / "metrics.json").read_text())) == stats_of(json.loads((run / "metrics.json").read_text()))
