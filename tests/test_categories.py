"""Which logit is which category: COCO's layout (ids as logit indices) where ids are dense, one logit
per category where they are sparse or large; training, evaluation, the API and fine-tuning by
category name on top of it."""
import json

import pytest
import torch

from cli import assert_ok, run_tool_in_process, tiny, write_coco_split
from deformable_detr import Detector
from deformable_detr.data.coco_categories import COCO_CATEGORIES
from deformable_detr.data.synthetic_shapes import SHAPE_CATEGORIES
from deformable_detr.inference.checkpoint_recipe import class_rows_by_name
from deformable_detr.models import PostProcess
from deformable_detr.utils.category_layout import CategoryLayout
from inference_fixtures import make_checkpoint

SPARSE_IDS = [3, 17, 1042]


def test_dense_ids_are_logit_indices_sparse_ones_get_a_logit_each():
    coco = CategoryLayout.for_category_ids([c["id"] for c in COCO_CATEGORIES])
    assert coco == CategoryLayout(91) and coco.by_id
    assert CategoryLayout.for_category_ids([i for i, _ in SHAPE_CATEGORIES]) == CategoryLayout(22)  # ids up to 21
    assert CategoryLayout.for_category_ids(range(10)) == CategoryLayout(10)
    sparse = CategoryLayout.for_category_ids(SPARSE_IDS)
    assert sparse == CategoryLayout(3, (3, 17, 1042)) and not sparse.by_id
    assert CategoryLayout.for_category_ids(SPARSE_IDS, num_classes=2000) == CategoryLayout(2000)  # dataset.num_classes


def test_labels_map_to_logits_and_back():
    sparse = CategoryLayout.for_category_ids(SPARSE_IDS)
    labels = torch.tensor([1042, 3, 17, 17])
    assert sparse.logits_of(labels).tolist() == [2, 0, 1, 1]
    assert sparse.ids_of(sparse.logits_of(labels)).tolist() == labels.tolist()
    with pytest.raises(ValueError, match=r"category ids \[5, 2000\] have no logit"):
        sparse.logits_of(torch.tensor([3, 5, 2000]))
    assert sparse.logit_indices([1042, 4, 3]) == [2, 0] and CategoryLayout(91).logit_indices([1, 90, 91]) == [1, 90]
    assert CategoryLayout.from_dict(sparse.to_dict(), 3) == sparse
    assert CategoryLayout.from_dict(None, 91) == CategoryLayout(91)  # files without a layout are by id
    rows = sparse.categories_by_logit([{"id": 17, "name": "b"}, {"id": 3, "name": "a"}, {"id": 8, "name": "x"}])
    assert rows == [{"id": 3, "name": "a", "logit": 0}, {"id": 17, "name": "b", "logit": 1}]


def test_postprocess_returns_category_ids_of_a_one_logit_per_category_head():
    logits = torch.full((1, 2, 3), -10.0)
    logits[0, 0, 2] = 5.0  # the best: query 0, logit 2 (category 1042)
    logits[0, 1, 0] = 4.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]]])
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    result = PostProcess(2, category_ids=SPARSE_IDS, logit_ids=SPARSE_IDS)(outputs, torch.tensor([[100, 200]]))[0]
    assert result["labels"].tolist() == [1042, 3]
    only_some = PostProcess(2, category_ids=[3, 17], logit_ids=SPARSE_IDS)(outputs, torch.tensor([[100, 200]]))[0]
    assert set(only_some["labels"].tolist()) <= {3, 17}


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse")
    categories = [{"id": i, "name": name} for i, name in zip(SPARSE_IDS, ["person", "kite", "zebra"])]
    write_coco_split(root / "data", "train", 4, categories, seed=0)
    write_coco_split(root / "data", "val", 3, categories, seed=1)
    run = root / "run"
    result = run_tool_in_process("train", *tiny(run, root / "data", "dataset=coco", "trainer.epochs=1"))
    assert_ok(result)
    return root, run, result


@pytest.mark.slow
def test_sparse_ids_train_a_head_of_one_logit_per_category(sparse_run):
    root, run, result = sparse_run
    assert "3 categories (ids up to 1042; 3 logits, one per category)" in result.stdout
    checkpoint = torch.load(run / "checkpoint_last.pth", weights_only=True)
    assert checkpoint["num_classes"] == 3 and checkpoint["category_layout"] == {"num_logits": 3, "logit_ids": SPARSE_IDS}
    assert checkpoint["model"]["class_embed.0.weight"].shape[0] == 3
    predictions = json.loads((run / "predictions.json").read_text())
    assert predictions and {p["category_id"] for p in predictions} == set(SPARSE_IDS)
    assert {row["id"] for row in json.loads((run / "metrics.json").read_text())["per_category"]} == set(SPARSE_IDS)


@pytest.mark.slow
def test_a_sparse_id_checkpoint_predicts_the_dataset_ids_through_eval_and_the_api(sparse_run):
    root, run, _ = sparse_run
    evaluation = root / "evaluation"
    assert_ok(run_tool_in_process("eval", f"checkpoint={run / 'checkpoint_last.pth'}", f"hydra.run.dir={evaluation}", "device=cpu"))
    assert {p["category_id"] for p in json.loads((evaluation / "predictions.json").read_text())} == set(SPARSE_IDS)
    detector = Detector.from_checkpoint(str(run / "checkpoint_last.pth"), device="cpu")
    result = detector.predict(str(root / "data" / "val2017" / "1.png"), score_threshold=0)
    assert set(result.labels.tolist()) == set(SPARSE_IDS) and set(result.names) == {"person", "kite", "zebra"}


def test_fine_tuning_starts_each_category_from_the_rows_of_its_name(tmp_path):
    source_path = make_checkpoint(str(tmp_path / "shapes.pth"))  # 22 logits by id: circle 2, square 3, ..., cross 21
    source = torch.load(source_path, weights_only=True)
    # a dataset with a star (8 in the source), a square (3) and a category the source has not
    categories = [{"id": 1, "name": "Star"}, {"id": 2, "name": "square "}, {"id": 3, "name": "boat"}]
    layout = CategoryLayout.for_category_ids([1, 2, 3])
    assert class_rows_by_name(source, categories, layout) == [(8, 1), (3, 2)]
    assert class_rows_by_name(source, [{"id": i, "name": n} for i, n in SHAPE_CATEGORIES], CategoryLayout(22)) is None  # the same
    official = {"model": {"backbone.0.body.conv1.weight": torch.zeros(1), "class_embed.0.weight": torch.zeros(91, 4)}}
    assert class_rows_by_name(official, [{"id": 5, "name": "person"}], CategoryLayout(6)) == [(1, 5)]


@pytest.mark.slow
def test_init_weights_into_other_categories_copies_the_matched_rows(tmp_path, sparse_run):
    root, _, _ = sparse_run
    source_path = make_checkpoint(str(tmp_path / "shapes.pth"), categories=[
        {"id": 2, "name": "zebra"}, {"id": 3, "name": "square"}, {"id": 5, "name": "person"}])
    source = torch.load(source_path, weights_only=True)["model"]
    run = tmp_path / "run"
    # learning rates 0: the weights after training are the initialization
    result = run_tool_in_process("train", *tiny(run, root / "data", "dataset=coco", "trainer.epochs=1", "optimizer.lr=0.0",
                                               "optimizer.lr_backbone=0.0", f"init_weights={source_path}"))
    assert_ok(result)
    assert "2 of the dataset's 3 categories start from the checkpoint's category of the same name" in result.stdout
    trained = torch.load(run / "checkpoint_last.pth", weights_only=True)["model"]
    # person (id 3, logit 0) from the source's person (logit 5), zebra (1042, logit 2) from zebra (logit 2)
    for key in ("class_embed.0.bias", "class_embed.0.weight"):
        torch.testing.assert_close(trained[key][0], source[key][5])
        torch.testing.assert_close(trained[key][2], source[key][2])
    # kite: fresh (the biases all start at the same prior)
    assert not torch.equal(trained["class_embed.0.weight"][1], source["class_embed.0.weight"][1])
