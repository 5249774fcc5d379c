"""The feed-forward hidden layer's one-pass kernel (``hash_dropout::relu_dropout``): bit-exact against
hash_dropout of relu(x + bias), its backward from the output alone, and ``linear_relu_dropout``
computing exactly the unfused ``dropout(relu(linear(x)))`` of the layers, gradients included."""
import pytest
import torch
import torch.nn.functional as F

import deformable_detr_ops as ops
from deformable_detr.models.encoder import DeformableEncoderLayer
from deformable_detr_ops import hash_dropout
from deformable_detr_ops.hash_dropout import hash_dropout_reference, kernel_loaded

requires_kernel = pytest.mark.skipif(not kernel_loaded("relu_dropout"),
                                     reason=f"the compiled kernels are not built. {ops.BUILD_HINT}")


def fused(input, bias, seed, p):
    return torch.ops.hash_dropout.relu_dropout(input, bias, torch.tensor(seed, dtype=torch.int64), p)


def reference(input, bias, seed, p):
    """hash_dropout of relu(input + bias), the sum and scaling in float32 (float64 for float64) and
    rounded once to the input's dtype, as the kernel computes them."""
    compute = torch.promote_types(input.dtype, torch.float32)
    hidden = input.to(compute) if bias is None else input.to(compute) + bias.to(compute)
    return hash_dropout_reference(F.relu(hidden), torch.tensor(seed), p).to(input.dtype)


def unfused(x, weight, bias, p):
    return ops.dropout(F.relu(F.linear(x, weight, bias)), p, True)


@requires_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, with_bias", [((1,), False), ((7,), False), ((3, 5, 129), False), ((3, 5, 130), True),
                                              ((2, 64, 1024), True), ((4, 2), True)])
def test_kernel_is_its_reference_bit_for_bit(dtype, shape, with_bias):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=generator).to(dtype)
    bias = torch.randn(shape[-1], generator=generator).to(dtype) if with_bias else None
    for seed, p in [(0, 0.1), (123456789, 0.5), ((1 << 62) - 1, 0.9)]:
        assert torch.equal(fused(x, bias, seed, p), reference(x, bias, seed, p)), (seed, p)


@requires_kernel
def test_mask_is_hash_dropouts_and_threads_do_not_change_it():
    """The same seed drops the same elements as ``hash_dropout`` (so the layers compute what they
    did unfused), and one thread computes what two do."""
    x, bias = torch.randn(3, 70_000, 64), torch.randn(64)
    expected = torch.ops.hash_dropout.dropout(F.relu(x + bias), torch.tensor(42), 0.1)
    assert torch.equal(fused(x, bias, 42, 0.1), expected)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = fused(x, bias, 42, 0.1)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, expected)


@requires_kernel
def test_backward_passes_the_gradient_where_the_output_is_positive():
    x = torch.randn(5, 1000)
    x[0, :4] = torch.tensor([float("nan"), 0.0, -0.0, float("inf")])
    out = fused(x, None, 7, 0.25)
    grad = torch.randn_like(out)
    expected = torch.where(out > 0, grad * (1 / 0.75), torch.zeros_like(grad))
    # as torch.relu and threshold_backward: a NaN stays NaN (when kept) and passes its gradient
    kept_nan = torch.isnan(out)
    expected[kept_nan] = grad[kept_nan] * (1 / 0.75)
    assert torch.equal(torch.ops.hash_dropout.relu_dropout_backward(grad, out, 0.25), expected)
    relu_then_drop = torch.ops.hash_dropout.dropout(F.relu(x), torch.tensor(7), 0.25)
    torch.testing.assert_close(out, relu_then_drop, rtol=0, atol=0, equal_nan=True)


@requires_kernel
def test_edge_cases_and_errors():
    x = torch.randn(6, 8)
    assert torch.equal(fused(x, None, 3, 1.0), torch.zeros_like(x))
    assert torch.equal(fused(x, torch.ones(8), 3, 0.0), F.relu(x + 1))
    assert fused(torch.empty(0, 8), torch.zeros(8), 3, 0.5).shape == (0, 8)
    assert torch.equal(fused(x.t(), None, 3, 0.5), fused(x.t().contiguous(), None, 3, 0.5))
    with pytest.raises(RuntimeError, match="bias must have shape"):
        fused(x, torch.zeros(7), 3, 0.5)
    with pytest.raises(RuntimeError, match="even last dimension"):
        fused(torch.randn(4, 7), torch.zeros(7), 3, 0.5)
    with pytest.raises(RuntimeError, match="bias dtype"):
        fused(x, torch.zeros(8, dtype=torch.float64), 3, 0.5)
    with pytest.raises(RuntimeError, match="does not match"):
        torch.ops.hash_dropout.relu_dropout_backward(x, x[:, :4], 0.5)


@requires_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, out_features", [((2, 50, 16), 32), ((37, 16), 64), ((3, 16), 33)])
def test_linear_relu_dropout_is_the_unfused_layer_exactly(dtype, shape, out_features):
    """The same dropout mask as dropout(relu(linear)) under the same seed, and the same values and
    gradients of input, weight and bias up to the rounding of where the bias is added (bit for bit
    where the BLAS adds it after the whole product, which depends on the CPU and the width; 33
    outputs: the odd width keeps the bias in the product)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator, dtype=dtype, requires_grad=True)
    layer = torch.nn.Linear(shape[-1], out_features).to(dtype)
    inputs = [x, layer.weight, layer.bias]
    torch.manual_seed(5)
    out = ops.linear_relu_dropout(x, layer.weight, layer.bias, 0.3, True)
    grad = torch.randn(out.shape, generator=generator, dtype=dtype)
    grads = torch.autograd.grad(out, inputs, grad)
    torch.manual_seed(5)
    expected = unfused(x, layer.weight, layer.bias, 0.3)
    expected_grads = torch.autograd.grad(expected, inputs, grad)
    assert torch.equal(out == 0, expected == 0)
    ulps = {torch.float32: 2e-6, torch.float64: 4e-15}[dtype]
    torch.testing.assert_close(out, expected, rtol=ulps, atol=ulps)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=ulps, atol=ulps)


@requires_kernel
def test_linear_relu_dropout_gradcheck_float64():
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)
                       for shape in [(2, 9, 6), (10, 6), (10,)])

    def layer(x, weight, bias):
        torch.manual_seed(3)  # the same mask at every evaluation
        return ops.linear_relu_dropout(x, weight, bias, 0.3, True)

    assert torch.autograd.gradcheck(layer, (x, weight, bias))
    assert torch.autograd.gradgradcheck(layer, (x, weight, bias))


@requires_kernel
def test_linear_relu_dropout_under_autocast_keeps_linears_rounding():
    """Under CPU autocast the bfloat16 product keeps its bias, as ``linear`` computes it, and the
    kernel applies ReLU and dropout: the same bits as the unfused layer."""
    x, layer = torch.randn(2, 40, 16), torch.nn.Linear(16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(2)
        out = ops.linear_relu_dropout(x, layer.weight, layer.bias, 0.2, True)
        torch.manual_seed(2)
        expected = unfused(x, layer.weight, layer.bias, 0.2)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


def test_linear_relu_dropout_modes_and_fallback(monkeypatch):
    x, layer = torch.randn(4, 8), torch.nn.Linear(8, 6)
    relu = F.relu(layer(x))
    assert torch.equal(ops.linear_relu_dropout(x, layer.weight, layer.bias, 0.5, training=False), relu)
    assert torch.equal(ops.linear_relu_dropout(x, layer.weight, layer.bias, 0.0, training=True), relu)
    assert torch.equal(ops.linear_relu_dropout(x, layer.weight, layer.bias, 1.0, training=True), torch.zeros_like(relu))
    with pytest.raises(ValueError, match="between 0 and 1"):
        ops.linear_relu_dropout(x, layer.weight, layer.bias, -0.1)
    # without the kernel (an older build, another device): the unfused layer with ``dropout``
    calls = []
    monkeypatch.setattr(hash_dropout, "_relu_registered", False)
    monkeypatch.setattr(hash_dropout, "dropout", lambda input, p, training: calls.append(p) or input)
    assert torch.equal(ops.linear_relu_dropout(x, layer.weight, layer.bias, 0.4, True), relu)
    assert calls == [0.4]


@requires_kernel
def test_only_the_output_is_kept_for_the_backward():
    """The feed-forward network keeps one hidden-sized tensor (the next product's input) instead
    of two (ReLU's output too)."""
    x, first, second = torch.randn(2, 30, 16, requires_grad=True), torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)
    hidden_bytes = 2 * 30 * 64 * 4

    def kept_bytes(hidden):
        saved = {}

        def pack(tensor):
            saved[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            second(hidden(x))
        return sum(size for size in saved.values() if size == hidden_bytes)

    fused_bytes = kept_bytes(lambda t: ops.linear_relu_dropout(t, first.weight, first.bias, 0.1, True))
    unfused_bytes = kept_bytes(lambda t: unfused(t, first.weight, first.bias, 0.1))
    assert fused_bytes == hidden_bytes and unfused_bytes == 2 * hidden_bytes


@requires_kernel
def test_encoder_layer_trains_exactly_as_unfused(monkeypatch):
    """A training forward and backward of an encoder layer: the same output and gradients with the
    fused kernel as with ReLU and dropout apart."""
    torch.manual_seed(0)
    layer = DeformableEncoderLayer(d_model=32, d_ffn=64, dropout=0.1, n_levels=2, n_heads=4, n_points=2).train()
    shapes = torch.tensor([[4, 5], [2, 3]])
    starts = torch.tensor([0, 20])
    src, pos = torch.randn(2, 26, 32), torch.randn(2, 26, 32)
    reference_points = torch.rand(2, 26, 2, 2)

    def run():
        torch.manual_seed(9)
        layer.zero_grad(set_to_none=True)
        out = layer(src, pos, reference_points, shapes, starts)
        out.square().sum().backward()
        return [out.detach()] + [p.grad.clone() for p in layer.parameters()]

    fused_run = run()
    monkeypatch.setattr(hash_dropout, "_relu_registered", False)
    for got, want in zip(fused_run, run()):
        assert torch.equal(got, want)


@requires_kernel
def test_fullgraph_compile_keeps_the_kernel_and_its_backward():
    torch._dynamo.reset()
    layer = torch.nn.Linear(8, 16)

    def f(x):
        return ops.linear_relu_dropout(x, layer.weight, layer.bias, 0.3, True).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 8, requires_grad=True)
    torch.manual_seed(4)
    compiled(x).backward()
    got = x.grad.clone()
    x.grad = None
    torch.manual_seed(4)
    f(x).backward()
    assert torch.equal(got, x.grad)
