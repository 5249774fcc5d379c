"""Two processes (gloo) where one of them has nothing: a rank whose batch holds no box at all trains
exactly as one process on both batches would, a rank without evaluation images does not hang
evaluation, and only the main process writes files."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cli import assert_ok, run_tool, torchrun, write_coco_split
from deformable_detr.engine.optim import build_optimizer, build_scheduler
from deformable_detr.engine.train_step import TrainStep
from deformable_detr.models import HungarianMatcher, SetCriterion, loss_weights
from model_builders import tiny_model

def batches():
    """Four 64x80 images: the first two without any box (rank 1's share), the others with boxes."""
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(4, 3, 64, 80, generator=generator)
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": torch.tensor(1)},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": torch.tensor(2)},
               {"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4]]), "labels": torch.tensor([3]), "image_id": torch.tensor(3)},
               {"boxes": torch.tensor([[0.3, 0.6, 0.2, 0.2], [0.7, 0.3, 0.2, 0.3]]), "labels": torch.tensor([1, 5]), "image_id": torch.tensor(4)}]
    return images, torch.zeros(4, 64, 80, dtype=torch.bool), targets


def one_step(model, images, masks, targets, distributed_model=None):
    """One training step (frozen BatchNorm and no dropout: the same function on any split of the batch)."""
    criterion = SetCriterion(10, HungarianMatcher(), loss_weights(num_decoder_layers=2))
    optimizer = build_optimizer(model, lr=1e-3, lr_backbone=1e-3)
    step = TrainStep(distributed_model or model, criterion, optimizer, build_scheduler(optimizer, iters_per_epoch=10), torch.device("cpu"))
    return step(images, masks, targets)


def fresh_model():
    torch.manual_seed(0)
    return tiny_model(norm="frozen_bn")


def _rank(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        images, masks, targets = batches()
        share = slice(2 * (1 - rank), 2 * (1 - rank) + 2)  # rank 1: the two images without boxes
        model = fresh_model()
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        result = one_step(model, images[share], masks[share], targets[share], wrapped)
        gradients = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        torch.save({"skipped": result.skipped, "state": model.state_dict(), "gradients": gradients}, os.path.join(out_dir, f"rank{rank}.pth"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_rank_without_boxes_trains_as_one_process_on_both_batches(tmp_path):
    torch.set_num_threads(1)
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pth", weights_only=True) for rank in range(2)]
    assert not ranks[0]["skipped"] and not ranks[1]["skipped"]
    for name, value in ranks[0]["state"].items():
        torch.testing.assert_close(ranks[1]["state"][name], value, rtol=0, atol=0, msg=name)
    # the gradients (all-reduced, clipped) are one process's on both batches; parameters are not compared
    # with it: AdamW's first step is lr * sign(gradient), which turns gradients that are zero up to
    # rounding (the keys' bias of softmax attention) into full steps either way
    single = fresh_model()
    one_step(single, *batches())
    expected = {name: p.grad for name, p in single.named_parameters() if p.grad is not None}
    assert ranks[0]["gradients"].keys() == expected.keys()
    for name, gradient in expected.items():
        torch.testing.assert_close(ranks[0]["gradients"][name], gradient, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("images", [1, 3])
def test_evaluation_with_a_rank_short_of_images_equals_one_process_and_only_rank_0_writes(tmp_path, images):
    from inference_fixtures import make_checkpoint

    checkpoint = make_checkpoint(str(tmp_path / "tiny.pth"))
    data = write_coco_split(tmp_path / "data", "val", images, [{"id": 2, "name": "circle"}, {"id": 3, "name": "square"}], seed=images)
    common = [f"checkpoint={checkpoint}", "dataset=coco", f"dataset.root={data}", "dataset.eval_batch_size=1", "dataset.num_workers=0",
              "device=cpu"]
    single, double = tmp_path / "single", tmp_path / "double"
    assert_ok(run_tool("eval", *common, f"hydra.run.dir={single}"))
    result = run_tool("eval", *common, f"hydra.run.dir={double}", launcher=torchrun(2), timeout=600)
    assert_ok(result)
    assert sorted(os.listdir(double)) == sorted(os.listdir(single)) == [".hydra", "config.yaml", "eval.log", "metrics.json", "predictions.json"]
    assert len(os.listdir(tmp_path)) == 4  # tiny.pth, data and the two run directories: no stray rank directory
    metrics = [json.loads((run / "metrics.json").read_text()) for run in (single, double)]
    stats = ("AP", "AP50", "AP75", "AR1", "AR10", "AR100")
    assert [metrics[1][k] for k in stats] == pytest.approx([metrics[0][k] for k in stats], abs=1e-6)
    predictions = [sorted(json.loads((run / "predictions.json").read_text()), key=lambda p: (p["image_id"], -p["score"])) for run in (single, double)]
    assert len(predictions[0]) == len(predictions[1]) > 0
    assert [p["image_id"] for p in predictions[1]] == [p["image_id"] for p in predictions[0]]
