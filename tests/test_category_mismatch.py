"""A checkpoint meeting data of other categories: resume refuses, evaluation and inference warn
naming both lists, and an id the model has no logit for is refused."""
import os

import pytest

from cli import assert_ok, run_tool_in_process, tiny, write_coco_split
from deformable_detr.data.category_diff import category_differences

PERSON, KITE, ZEBRA = {"id": 1, "name": "person"}, {"id": 2, "name": "kite"}, {"id": 3, "name": "zebra"}


def test_the_differences_are_named():
    assert category_differences([PERSON, KITE], [KITE, PERSON]) == []
    assert category_differences([PERSON, KITE], [PERSON, {"id": 2, "name": "kites"}]) == [
        "id 2 is 'kite' in the checkpoint but 'kites' in the dataset"]
    renumbered = category_differences([PERSON, KITE], [PERSON, {"id": 5, "name": "kite"}])
    assert renumbered == ["'kite' is id 2 in the checkpoint but id 5 in the dataset"]
    fewer = category_differences([PERSON, KITE, ZEBRA], [PERSON, KITE], names=("checkpoint", "run's dataset"))
    assert fewer == ["only the checkpoint has 3 'zebra'"]
    assert category_differences([PERSON], [PERSON, ZEBRA]) == ["only the dataset has 3 'zebra'"]


def write_dataset(root, categories, seed=0):
    """A tiny COCO-format dataset at ``root`` (train2017 and val2017, three images each) with ``categories``."""
    for split, count in (("train", 4), ("val", 3)):
        write_coco_split(root, split, count, categories, seed)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of one step on a dataset of person, kite and zebra (ids 1, 2, 3)."""
    root = tmp_path_factory.mktemp("mismatch")
    data = write_dataset(root / "data", [PERSON, KITE, ZEBRA])
    run = root / "run"
    assert_ok(run_tool_in_process("train", *tiny(run, data, "dataset=coco", "trainer.epochs=2", "trainer.max_steps=1")))
    return root, run


@pytest.mark.parametrize("categories, difference", [
    ([PERSON, {"id": 2, "name": "bird"}, ZEBRA], "id 2 is 'kite' in the checkpoint but 'bird' in the run's dataset"),
    ([PERSON, {"id": 3, "name": "kite"}, {"id": 2, "name": "zebra"}], "'kite' is id 2 in the checkpoint but id 3 in the run's dataset"),
    ([PERSON, KITE], "only the checkpoint has 3 'zebra'"),
    ([PERSON, KITE, ZEBRA, {"id": 4, "name": "boat"}], "only the run's dataset has 4 'boat'"),
])
def test_resuming_with_other_categories_is_refused_naming_the_difference(trained, tmp_path, categories, difference):
    root, run = trained
    copy = tmp_path / "run"
    os.makedirs(copy)
    for name in ("checkpoint_last.pth",):
        (copy / name).write_bytes((run / name).read_bytes())
    data = write_dataset(tmp_path / "other", categories)
    result = run_tool_in_process("train", *tiny(copy, data, "dataset=coco", "trainer.epochs=2"))
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "was trained on other categories than this run's dataset" in line and difference in line, line


def test_evaluating_on_other_categories_warns_naming_both_lists(trained, tmp_path):
    root, run = trained
    data = write_dataset(tmp_path / "renamed", [PERSON, {"id": 2, "name": "bird"}, ZEBRA])
    result = run_tool_in_process("eval", f"checkpoint={run / 'checkpoint_last.pth'}", "dataset=coco", f"dataset.root={data}",
                                 f"hydra.run.dir={tmp_path / 'eval'}", "device=cpu")
    assert_ok(result)
    warning = next(line for line in result.stdout.splitlines() if "differ from those checkpoint=" in line)
    assert "id 2 is 'kite' in the checkpoint but 'bird' in the dataset" in warning
    assert "The checkpoint's: 1 'person', 2 'kite', 3 'zebra' (3 categories); the dataset's: 1 'person', 2 'bird', 3 'zebra'" in warning


def test_evaluating_on_ids_the_model_has_no_logit_for_is_refused(trained, tmp_path):
    root, run = trained
    data = write_dataset(tmp_path / "beyond", [PERSON, {"id": 7, "name": "boat"}])
    result = run_tool_in_process("eval", f"checkpoint={run / 'checkpoint_last.pth'}", "dataset=coco", f"dataset.root={data}",
                                 f"hydra.run.dir={tmp_path / 'eval'}", "device=cpu")
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "has categories the model of checkpoint=" in line and "no logit for (7 'boat'" in line
    assert "the checkpoint predicts 1 'person', 2 'kite', 3 'zebra'" in line and "the dataset has 1 'person', 7 'boat'" in line


def test_inference_warns_when_the_dataset_named_has_other_categories(trained, tmp_path):
    root, run = trained
    data = write_dataset(tmp_path / "renamed", [PERSON, {"id": 2, "name": "bird"}, ZEBRA])
    result = run_tool_in_process("infer", f"checkpoint={run / 'checkpoint_last.pth'}", f"input={data / 'val2017' / '1.png'}",
                                 f"dataset.root={data}", f"hydra.run.dir={tmp_path / 'infer'}", "device=cpu", "num_workers=0")
    assert_ok(result)
    assert any("id 2 is 'kite' in the checkpoint but 'bird' in the dataset" in line for line in result.stdout.splitlines())
    same = run_tool_in_process("infer", f"checkpoint={run / 'checkpoint_last.pth'}", f"input={data / 'val2017' / '1.png'}",
                               f"hydra.run.dir={tmp_path / 'infer2'}", "device=cpu", "num_workers=0")
    assert_ok(same)
    assert not any("differ from those" in line for line in same.stdout.splitlines())
