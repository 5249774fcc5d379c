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


def test_training_self_attention_is_pytorchs_attention_with_the_hashed_dropout(monkeypatch):
    """In training on the CPU the attention weights are dropped by ``deformable_detr_ops.dropout``
    (PyTorch's own draws them one element at a time). With the same mask it computes what PyTorch's
    attention math does, in float64, gradients included."""
    from deformable_detr.models import decoder

    torch.manual_seed(2)
    layer = DeformableDecoderLayer(d_model=32, d_ffn=64, dropout=0.3, n_levels=2, n_heads=4, n_points=2).double().train()
    q = torch.randn(2, 9, 32, dtype=torch.float64, requires_grad=True)
    value = torch.randn(2, 9, 32, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(2, 4, 9, 9, generator=torch.Generator().manual_seed(3)) > 0.3
    calls = []

    def dropout(input, p, training=True):
        calls.append((tuple(input.shape), p))
        return input.masked_fill(~keep, 0.0) / (1 - p)

    monkeypatch.setattr(decoder.deformable_detr_ops, "dropout", dropout)
    ours = layer.query_self_attention(q, value)
    assert calls == [((2, 4, 9, 9), 0.3)]

    attention = layer.self_attn
    w_q, w_k, w_v = attention.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attention.in_proj_bias.chunk(3)

    def heads(x):
        return x.view(2, 9, 4, 8).transpose(1, 2)

    out, _ = torch.ops.aten._scaled_dot_product_attention_math(
        heads(torch.nn.functional.linear(q, w_q, b_q)), heads(torch.nn.functional.linear(q, w_k, b_k)),
        heads(torch.nn.functional.linear(value, w_v, b_v)), None, 0.3, False, keep)
    reference = attention.out_proj(out.transpose(1, 2).reshape(2, 9, 32))
    torch.testing.assert_close(ours, reference)
    grad = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (q, value, attention.in_proj_weight), grad),
                    torch.autograd.grad(reference, (q, value, attention.in_proj_weight), grad)):
        torch.testing.assert_close(a, b)


def test_training_self_attention_draws_its_dropout_from_torchs_generator():
    torch.manual_seed(0)
    layer = DeformableDecoderLayer(d_model=32, d_ffn=64, dropout=0.5, n_levels=2, n_heads=4, n_points=2).train()
    q, value = torch.randn(2, 9, 32), torch.randn(2, 9, 32)
    torch.manual_seed(5)
    first = layer.query_self_attention(q, value)
    torch.manual_seed(5)
    assert torch.equal(layer.query_self_attention(q, value), first)
    assert not torch.equal(layer.query_self_attention(q, value), first)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.query_self_attention(q, value).dtype == torch.float32
    assert not torch.allclose(first, layer.eval().query_self_attention(q, value))
