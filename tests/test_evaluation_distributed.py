"""Evaluation and rank helpers in a real two-process gloo group (CPU only)."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools.coco import COCO

from deformable_detr.data.sampler import ShardedSampler
from deformable_detr.evaluation.coco_evaluator import CocoEvaluator
from deformable_detr.utils import distributed

ANNOTATIONS = [(1, 1, [10, 10, 20, 20]), (2, 1, [100, 50, 50, 50]), (3, 2, [20, 30, 150, 150]), (4, 2, [5, 5, 60, 40])]


def _ground_truth():
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 400, "height": 300} for i in (1, 2, 3, 4)],
        "annotations": [
            {"id": n + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for n, (i, c, b) in enumerate(ANNOTATIONS)
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    coco.createIndex()
    return coco


def _prediction(image_id):
    _, category_id, (x, y, w, h) = ANNOTATIONS[image_id - 1]
    return {
        "boxes": torch.tensor([[x, y, x + w, y + h]], dtype=torch.float32),
        "scores": torch.tensor([0.9]),
        "labels": torch.tensor([category_id]),
    }


def _floats(values):
    return {name: float(value) for name, value in values.items()}


def _worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        report = {
            "rank": distributed.get_rank(),
            "world_size": distributed.get_world_size(),
            "main": distributed.is_main_process(),
            "gathered": distributed.all_gather_object({"rank": rank}),
            "mean": distributed.all_reduce_mean(float(rank)),
            "reduced": _floats(distributed.reduce_dict({"b": torch.tensor(2.0 * rank), "a": torch.tensor(1.0)})),
            "summed": _floats(distributed.reduce_dict({"a": torch.tensor(1.0)}, average=False)),
        }
        distributed.barrier()
        # A padded training-style sampler over 3 images gives image index 0 to both ranks.
        sampler = ShardedSampler(3, shuffle=False, pad=True)
        report["sampler"] = list(sampler)
        evaluator = CocoEvaluator(_ground_truth())
        evaluator.update({index + 1: _prediction(index + 1) for index in sampler})
        if rank == 1:
            evaluator.update({4: _prediction(4)})
        result = evaluator.summarize()
        report["stats"] = result.stats
        report["image_ids"] = result.image_ids
        report["num_predictions"] = len(result.predictions)
        report["main_only"] = evaluator.summarize(main_process_only=True) is None
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump(report, handle)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_process_evaluation(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for rank, report in enumerate(reports):
        assert report["rank"] == rank and report["world_size"] == 2 and report["main"] == (rank == 0)
        assert report["gathered"] == [{"rank": 0}, {"rank": 1}]
        assert report["mean"] == pytest.approx(0.5)
        assert report["reduced"] == {"a": 1.0, "b": 1.0}
        assert report["summed"] == {"a": 2.0}
        assert report["image_ids"] == [1, 2, 3, 4]
        assert report["num_predictions"] == 4  # image 1 was on both ranks and counts once
        assert report["stats"]["AP"] == pytest.approx(1.0)
        assert report["main_only"] == (rank == 1)
    assert reports[0]["sampler"] == [0, 2] and reports[1]["sampler"] == [1, 0]


def test_single_process_helpers_are_no_ops():
    assert distributed.get_rank() == 0 and distributed.get_world_size() == 1
    assert distributed.is_main_process()
    distributed.barrier()
    assert distributed.all_gather_object({"x": 1}) == [{"x": 1}]
    value = torch.tensor(3.0, requires_grad=True)
    reduced = distributed.reduce_dict({"loss": value * 2})
    assert float(reduced["loss"]) == 6.0 and not reduced["loss"].requires_grad
    assert distributed.all_reduce_mean(torch.tensor(2.5)) == 2.5
