import math

import pytest
import torch

from deformable_detr.models import HungarianMatcher, SetCriterion, loss_weights, sigmoid_focal_loss
from model_builders import tiny_model


def test_focal_loss_matches_its_definition():
    logits = torch.tensor([[[2.0, -1.0], [0.5, 0.0]]])
    targets = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    expected = 0.0
    for x, t in zip(logits.flatten().tolist(), targets.flatten().tolist()):
        p = 1 / (1 + math.exp(-x))
        p_t = p if t else 1 - p
        alpha_t = 0.25 if t else 0.75
        expected += -alpha_t * (1 - p_t) ** 2 * math.log(p_t)
    assert float(sigmoid_focal_loss(logits, targets, 2.0)) == pytest.approx(expected / 2.0, rel=1e-6)


def test_loss_weights_cover_every_layer_and_the_proposals():
    weights = loss_weights(2, 5, 2, num_decoder_layers=3, aux_loss=True, two_stage=True)
    assert weights["loss_ce"] == 2 and weights["loss_bbox_1"] == 5 and weights["loss_giou_enc"] == 2
    assert set(weights) == {f"loss_{n}{s}" for n in ("ce", "bbox", "giou") for s in ("", "_0", "_1", "_enc")}
    assert set(loss_weights(num_decoder_layers=3, aux_loss=False)) == {"loss_ce", "loss_bbox", "loss_giou"}


def make_criterion(model, two_stage):
    weights = loss_weights(num_decoder_layers=model.transformer.decoder.num_layers, two_stage=two_stage)
    return SetCriterion(model.num_classes, HungarianMatcher(), weights)


def synthetic_batch(generator, size=64):
    """Two images with bright rectangles on noise, and their targets (cxcywh in [0, 1])."""
    images = torch.randn(2, 3, size, size, generator=generator) * 0.3
    targets = []
    for i, rects in enumerate([[(8, 8, 40, 30, 3)], [(20, 30, 56, 60, 5), (4, 4, 20, 16, 3)]]):
        boxes, labels = [], []
        for x0, y0, x1, y1, label in rects:
            images[i, :, y0:y1, x0:x1] += 2.0 if label == 3 else -2.0
            boxes.append([(x0 + x1) / 2 / size, (y0 + y1) / 2 / size, (x1 - x0) / size, (y1 - y0) / size])
            labels.append(label)
        targets.append({"boxes": torch.tensor(boxes), "labels": torch.tensor(labels)})
    return images, torch.zeros(2, size, size, dtype=torch.bool), targets


@pytest.mark.parametrize("refine,two_stage", [(False, False), (True, True)])
def test_losses_are_finite_and_cover_every_output(refine, two_stage):
    torch.manual_seed(0)
    model = tiny_model(refine=refine, two_stage=two_stage)
    criterion = make_criterion(model, two_stage)
    images, mask, targets = synthetic_batch(torch.Generator().manual_seed(0))
    losses = criterion(model(images, mask), targets)
    expected = {"loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error", "loss_ce_0", "loss_bbox_0", "loss_giou_0"}
    if two_stage:
        expected |= {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc"}
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    criterion.total_loss(losses).backward()


def test_images_without_targets_give_finite_losses_and_gradients():
    torch.manual_seed(0)
    model = tiny_model(two_stage=True, refine=True)
    criterion = make_criterion(model, True)
    images, mask, _ = synthetic_batch(torch.Generator().manual_seed(0))
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)} for _ in range(2)]
    losses = criterion(model(images, mask), empty)
    total = criterion.total_loss(losses)
    assert torch.isfinite(total) and float(losses["loss_bbox"].detach()) == 0.0
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.slow
@pytest.mark.parametrize("refine,two_stage", [(False, False), (True, True)])
def test_a_tiny_model_overfits_a_few_images(refine, two_stage):
    torch.manual_seed(0)
    model = tiny_model(refine=refine, two_stage=two_stage)
    criterion = make_criterion(model, two_stage)
    images, mask, targets = synthetic_batch(torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)
    history = []
    for _ in range(40):
        losses = criterion(model(images, mask), targets)
        total = criterion.total_loss(losses)
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        history.append(float(total))
    assert all(math.isfinite(v) for v in history)
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert last < 0.6 * first, history
