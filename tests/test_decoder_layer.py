"""The decoder layer's query self-attention under autocast."""
import pytest
import torch

from deformable_detr.models.decoder import DeformableDecoderLayer


def layer_and_queries(seed=0):
    torch.manual_seed(seed)
    layer = DeformableDecoderLayer(d_model=32, d_ffn=64, dropout=0.0, n_levels=2, n_heads=4, n_points=2).eval()
    q = torch.randn(2, 9, 32, requires_grad=True)
    value = torch.randn(2, 9, 32, requires_grad=True)
    return layer, q, value


def test_self_attention_is_float32_under_cpu_autocast():
    """CPU autocast would run it in bfloat16, whose flash-attention backward is the slow one on a
    CPU: it runs in float32, exactly as without autocast, gradients included."""
    layer, q, value = layer_and_queries()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = layer.query_self_attention(q, value)
    reference = layer.self_attn(q, q, value, need_weights=False)[0]
    assert ours.dtype == torch.float32
    assert torch.equal(ours, reference)
    grad = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (q, value), grad), torch.autograd.grad(reference, (q, value), grad)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_self_attention_without_autocast_is_multihead_attention(dtype):
    layer, q, value = layer_and_queries(seed=1)
    layer, q, value = layer.to(dtype), q.detach().to(dtype), value.detach().to(dtype)
    torch.testing.assert_close(layer.query_self_attention(q, value), layer.self_attn(q, q, value, need_weights=False)[0], rtol=0, atol=0)
