"""The box outputs with iterative refinement come from the decoder, computed once per layer, and
equal (values and gradients) the earlier formulation where the detector applied every box head a
second time to the decoder's hidden states."""
import types

import pytest
import torch

from deformable_detr.models.weights import OFFICIAL_EXPERIMENTS
from deformable_detr.utils.box_ops import inverse_sigmoid
from model_builders import official_model


def earlier_decoder_forward(
    self, tgt, reference_points, memory, spatial_shapes, level_start_index, valid_ratios, query_pos, memory_padding_mask=None, box_heads=None
):
    """The decoder loop as it was: it returned only the detached references."""
    output = tgt
    hidden_states, references = [], []
    for index, layer in enumerate(self.layers):
        if reference_points.shape[-1] == 4:
            scale = torch.cat([valid_ratios, valid_ratios], -1)[:, None]
        else:
            scale = valid_ratios[:, None]
        reference_input = reference_points[:, :, None] * scale
        output = layer(output, query_pos, reference_input, memory, spatial_shapes, level_start_index, memory_padding_mask)
        if box_heads is not None:
            delta = box_heads[index](output)
            if reference_points.shape[-1] == 4:
                refined = (delta + inverse_sigmoid(reference_points)).sigmoid()
            else:
                refined = torch.cat([delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], -1).sigmoid()
            reference_points = refined.detach()
        hidden_states.append(output)
        references.append(reference_points)
    return torch.stack(hidden_states), torch.stack(references)


def earlier_outputs(model, images, mask):
    """The detector's outputs as they were: the earlier decoder, then every head applied here."""
    captured = {}
    hook = model.transformer.register_forward_hook(lambda module, args, output: captured.update(output=output))
    model.transformer.decoder.forward = types.MethodType(earlier_decoder_forward, model.transformer.decoder)
    try:
        enc_outputs = model(images, mask).get("enc_outputs")
    finally:
        hook.remove()
        del model.transformer.decoder.forward
    hidden_states, init_reference, references, _, _ = captured["output"]
    logits, boxes = [], []
    for layer in range(hidden_states.shape[0]):
        reference = inverse_sigmoid(init_reference if layer == 0 else references[layer - 1])
        delta = model.bbox_embed[layer](hidden_states[layer])
        if reference.shape[-1] == 4:
            coord = delta + reference
        else:
            coord = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
        logits.append(model.class_embed[layer](hidden_states[layer]))
        boxes.append(coord.sigmoid())
    out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
    out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
    if enc_outputs is not None:
        out["enc_outputs"] = enc_outputs
    return out


def flat_outputs(out):
    """Every output tensor in a fixed order: last layer, aux layers, encoder proposals."""
    tensors = [out["pred_logits"], out["pred_boxes"]]
    for aux in out["aux_outputs"]:
        tensors += [aux["pred_logits"], aux["pred_boxes"]]
    if "enc_outputs" in out:
        tensors += [out["enc_outputs"]["pred_logits"], out["enc_outputs"]["pred_boxes"]]
    return tensors


def padded_batch():
    """Two images (N=2) in float64; the second is 96 x 112 inside the 128 x 160 batch (mask True on padding)."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 128, 160, generator=generator, dtype=torch.float64)
    mask = torch.zeros(2, 128, 160, dtype=torch.bool)
    mask[1, 96:, :] = True
    mask[1, :, 112:] = True
    images[1, :, mask[1]] = 0
    return images, mask


def outputs_and_grads(model, forward, images, mask, weights=None):
    # the same dropout masks in both formulations: the heads draw no random numbers
    torch.manual_seed(0)
    tensors = flat_outputs(forward(model, images, mask))
    if weights is None:
        generator = torch.Generator().manual_seed(2)
        weights = [torch.randn(t.shape, generator=generator, dtype=t.dtype) for t in tensors]
    loss = sum((w * t.masked_fill(~torch.isfinite(t), 0)).sum() for w, t in zip(weights, tensors))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return [t.detach() for t in tensors], grads, weights


def max_difference(a, b):
    return max(((x - y).abs().nan_to_num(0).max().item() if x.numel() else 0.0) for x, y in zip(a, b))


# the single-scale recipe (the fastest) in the quick tier, the others slow
@pytest.mark.parametrize("experiment", [e if e.endswith("_single_scale") else pytest.param(e, marks=pytest.mark.slow) for e in OFFICIAL_EXPERIMENTS])
def test_outputs_and_gradients_equal_the_earlier_formulation(experiment):
    torch.manual_seed(0)
    model = official_model(experiment).double().train()
    # the change lies after the backbone: its gradients only repeat the input projections' (and cost most)
    model.backbone.requires_grad_(False)
    with torch.no_grad():
        # the box heads' last layers start at zero: perturb everything so each head's input matters
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    images, mask = padded_batch()

    new_outputs, new_grads, weights = outputs_and_grads(model, lambda m, i, k: m(i, k), images, mask)
    old_outputs, old_grads, _ = outputs_and_grads(model, earlier_outputs, images, mask, weights)

    assert len(new_outputs) == len(old_outputs)
    for new, old in zip(new_outputs, old_outputs):
        assert new.shape == old.shape and new.dtype == torch.float64
        assert torch.equal(torch.isfinite(new), torch.isfinite(old))
    output_difference = max_difference(new_outputs, old_outputs)
    grad_difference = max_difference(new_grads, old_grads)
    grad_scale = max(g.abs().max().item() for g in old_grads)
    print(f"{experiment}: outputs max |diff| {output_difference:.3g}, grads max |diff| {grad_difference:.3g} (max |grad| {grad_scale:.3g})")
    if not model.with_box_refine:
        # the same operations in the same order: bit for bit
        assert output_difference == 0 and grad_difference == 0
    # with refinement the gradient sums reach the hidden states in another order: rounding only
    assert output_difference <= 1e-12
    assert grad_difference <= 1e-12 * max(1.0, grad_scale)


def test_refinement_runs_each_box_head_once_per_layer():
    model = official_model(OFFICIAL_EXPERIMENTS[3]).eval()
    calls = [0] * len(model.bbox_embed)
    for index, head in enumerate(model.bbox_embed):
        head.register_forward_hook(lambda module, args, output, index=index: calls.__setitem__(index, calls[index] + 1))
    images, mask = padded_batch()
    with torch.no_grad():
        model(images.float(), mask)
    assert calls == [1] * len(model.bbox_embed)
