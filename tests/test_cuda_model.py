"""The model on a GPU: every implementation of the op gives the same detector, the GPU agrees with
the CPU, and training steps run in float32, bf16 autocast and fp16 with a gradient scaler.
Skipped without a GPU (scripts/gpu_check.sh runs them)."""
import pytest
import torch

import deformable_detr_ops as ops
from deformable_detr.engine.optim import build_optimizer, build_scheduler
from deformable_detr.engine.train_step import TrainStep
from deformable_detr.models import HungarianMatcher, SetCriterion, loss_weights
from model_builders import off_pixel_centres, tiny_model

DEVICE = "cuda"

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible")


def implementations():
    if not torch.cuda.is_available():
        return []
    available = ops.available_implementations()["cuda"]
    return [name for name in ("kernel", "triton") if name in available]


def batch(size=96, images=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    targets = []
    for index in range(images):
        count = index + 1
        boxes = torch.cat([0.3 + 0.4 * torch.rand(count, 2, generator=generator),
                           0.1 + 0.2 * torch.rand(count, 2, generator=generator)], 1)
        targets.append({"boxes": boxes, "labels": torch.randint(1, 10, (count,), generator=generator),
                        "image_id": torch.tensor(index)})
    masks = torch.zeros(images, size, size, dtype=torch.bool)
    masks[1, :, size - 16:] = True  # one padded image
    return torch.randn(images, 3, size, size, generator=generator), masks, targets


def criterion():
    return SetCriterion(10, HungarianMatcher(), loss_weights(num_decoder_layers=2, two_stage=True))


def loss_and_gradients(model, device, implementation, monkeypatch):
    monkeypatch.setenv("MS_DEFORM_ATTN_IMPLEMENTATION", implementation)
    model = model.to(device)
    model.zero_grad(set_to_none=True)
    images, masks, targets = batch()
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    outputs = model(images.to(device, torch.float64), masks.to(device))
    loss = criterion().to(device)
    total = loss.total_loss(loss(outputs, targets))
    total.backward()
    gradients = {name: p.grad.detach().cpu() for name, p in model.named_parameters() if p.grad is not None}
    return total.detach().cpu(), outputs["pred_boxes"].detach().cpu(), gradients


@pytest.mark.parametrize("implementation", implementations())
def test_every_implementation_gives_the_cpu_model(implementation, monkeypatch):
    torch.manual_seed(0)
    model = off_pixel_centres(tiny_model(refine=True, two_stage=True).double())
    expected = loss_and_gradients(model, "cpu", "reference", monkeypatch)
    computed = loss_and_gradients(model, DEVICE, implementation, monkeypatch)
    torch.testing.assert_close(computed[0], expected[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(computed[1], expected[1], rtol=1e-9, atol=1e-9)
    assert computed[2].keys() == expected[2].keys()
    for name in expected[2]:
        torch.testing.assert_close(computed[2][name], expected[2][name], rtol=1e-6, atol=1e-8, msg=name)


@pytest.mark.parametrize("amp", [None, "bf16", "fp16"])
def test_training_steps(amp):
    torch.manual_seed(0)
    model = tiny_model(refine=True, two_stage=True).to(DEVICE)
    optimizer = build_optimizer(model, lr=1e-4, lr_backbone=1e-5)
    scheduler = build_scheduler(optimizer, iters_per_epoch=100)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    step = TrainStep(model, criterion().to(DEVICE), optimizer, scheduler, torch.device(DEVICE), amp=amp, scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    for seed in range(4):
        result = step(*batch(seed=seed))
        assert not result.skipped
        losses.append(float(result.values["loss"]))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    if scaler is not None:
        assert scaler.get_scale() > 0
