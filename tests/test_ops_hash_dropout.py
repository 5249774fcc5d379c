"""The one-pass CPU dropout kernel: bit-exact against its PyTorch reference, its own backward
(gradcheck, float64), dropout's distribution, reproducible from torch's seed, and traceable."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import deformable_detr_ops as ops
from deformable_detr.models.dropout import Dropout
from deformable_detr_ops.hash_dropout import hash_dropout_reference, kernel_loaded

requires_kernel = pytest.mark.skipif(not kernel_loaded(), reason=f"the compiled kernels are not built. {ops.BUILD_HINT}")


def kernel(input, seed, p):
    return torch.ops.hash_dropout.dropout(input, torch.tensor(seed, dtype=torch.int64), p)


@requires_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5, 129), (2, 64, 1024)])
def test_kernel_is_its_reference_bit_for_bit(dtype, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    for seed, p in [(0, 0.1), (123456789, 0.5), ((1 << 62) - 1, 0.9)]:
        expected = hash_dropout_reference(x, torch.tensor(seed), p)
        assert torch.equal(kernel(x, seed, p), expected), (seed, p)


@requires_kernel
@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_narrower_instruction_sets_compute_the_same_bits(isa):
    """The loops are compiled for baseline x86-64, AVX2 and AVX-512; the CPU picks one per process.
    The feed-forward kernel (hash_dropout::relu_dropout, with and without a bias, and its backward) too."""
    script = (
        "import torch, torch.nn.functional as F\nimport deformable_detr_ops\n"
        "from deformable_detr_ops.hash_dropout import hash_dropout_reference\n"
        "op = torch.ops.hash_dropout\n"
        "for dtype in (torch.float32, torch.float64, torch.bfloat16):\n"
        "    x = torch.randn(3, 1001).to(dtype)\n"
        "    seed = torch.tensor(987654321)\n"
        "    assert torch.equal(op.dropout(x, seed, 0.3), hash_dropout_reference(x, seed, 0.3))\n"
        "    x, b, g = torch.randn(3, 1002).to(dtype), torch.randn(1002).to(dtype), torch.randn(3, 1002).to(dtype)\n"
        "    c = torch.promote_types(dtype, torch.float32)\n"
        "    out = op.relu_dropout(x, b, seed, 0.3)\n"
        "    assert torch.equal(out, hash_dropout_reference(F.relu(x.to(c) + b.to(c)), seed, 0.3).to(dtype))\n"
        "    assert torch.equal(op.relu_dropout(x, None, seed, 0.3), hash_dropout_reference(F.relu(x), seed, 0.3))\n"
        "    scaled = (g.to(c) * (1 / 0.7)).to(dtype)\n"
        "    assert torch.equal(op.relu_dropout_backward(g, out, 0.3), torch.where(out > 0, scaled, torch.zeros_like(g)))\n"
        "print('same bits')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, MS_DEFORM_ATTN_CPU_ISA=isa),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "same bits" in result.stdout, result.stderr


@requires_kernel
def test_non_contiguous_input_is_dropped_as_its_contiguous_copy():
    x = torch.randn(64, 48).t()
    out = kernel(x, 5, 0.3)
    assert out.is_contiguous() and torch.equal(out, kernel(x.contiguous(), 5, 0.3))


@requires_kernel
def test_thread_count_does_not_change_the_mask():
    x = torch.randn(3, 400_000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = kernel(x, 42, 0.1)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, kernel(x, 42, 0.1))


@requires_kernel
def test_edge_probabilities():
    x = torch.randn(1000)
    assert torch.equal(kernel(x, 3, 0.0), x)
    assert torch.equal(kernel(x, 3, 1.0), torch.zeros_like(x))
    # p * 2^32 rounds to 2^32: nothing is kept (the threshold must not wrap around to 0)
    assert torch.equal(kernel(x, 3, 1 - 1e-12), torch.zeros_like(x))
    assert torch.equal(hash_dropout_reference(x, torch.tensor(3), 1 - 1e-12), torch.zeros_like(x))
    assert kernel(torch.empty(0, 4), 3, 0.5).shape == (0, 4)
    assert ops.dropout(x, 0.3, training=False) is x and ops.dropout(x, 0.0) is x
    with pytest.raises(ValueError, match="between 0 and 1"):
        ops.dropout(x, 1.5)


@requires_kernel
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_distribution_is_dropouts(p):
    """Kept fraction within 5 standard deviations of 1 - p, kept values scaled by 1 / (1 - p), and
    neighbouring elements (the two halves of one hash, or two hashes) independent."""
    n = 1 << 22
    x = torch.ones(n)
    out = kernel(x, 2024, p)
    keep = out != 0
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep.double().mean().item() - (1 - p)) < 5 * sigma
    torch.testing.assert_close(out[keep], torch.full_like(out[keep], 1 / (1 - p)))
    k = keep.double() - keep.double().mean()
    for lag in (1, 2, 3, 64):
        correlation = (k[:-lag] * k[lag:]).mean() / k.var()
        assert abs(correlation.item()) < 5 / n ** 0.5, lag
    # another seed: an independent mask
    other = kernel(x, 2025, p) != 0
    agreement = (keep == other).double().mean().item()
    assert abs(agreement - (p * p + (1 - p) ** 2)) < 5 * (0.25 / n) ** 0.5


@requires_kernel
def test_gradcheck_float64():
    x = torch.randn(5, 37, dtype=torch.float64, requires_grad=True)
    seed = torch.tensor(77)
    assert torch.autograd.gradcheck(lambda t: torch.ops.hash_dropout.dropout(t, seed, 0.4), (x,))
    assert torch.autograd.gradgradcheck(lambda t: torch.ops.hash_dropout.dropout(t, seed, 0.4), (x,))


@requires_kernel
def test_backward_applies_the_forward_mask():
    x = torch.randn(4, 1000, requires_grad=True)
    out = ops.dropout(x, 0.25)
    out.backward(torch.ones_like(out))
    kept = out.detach() != 0
    torch.testing.assert_close(x.grad, kept.float() / 0.75)


@requires_kernel
def test_seeded_from_torchs_generator():
    x = torch.randn(2, 500)
    torch.manual_seed(11)
    first = ops.dropout(x, 0.2)
    state = torch.get_rng_state()
    second = ops.dropout(x, 0.2)
    assert not torch.equal(first, second)
    torch.set_rng_state(state)
    assert torch.equal(ops.dropout(x, 0.2), second)


@requires_kernel
def test_layer_matches_nn_dropout_in_interface():
    layer = Dropout(0.1)
    assert isinstance(layer, torch.nn.Dropout) and layer.state_dict() == {}
    x = torch.randn(8, 16)
    assert layer.eval()(x) is x
    assert not torch.equal(layer.train()(x), x)


@requires_kernel
def test_fullgraph_compile_keeps_the_kernel_and_its_backward():
    """One graph (no break) through the op; the compiled backward reuses the forward's mask."""
    torch._dynamo.reset()

    def f(x):
        return ops.dropout(x * 2, 0.3).sum(dim=0)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 300, requires_grad=True)
    out = compiled(x)
    out.backward(torch.ones_like(out))
    assert (out != 0).any()
    # d out / d x = 2 / 0.7 where kept; a kept x[i, j] is one whose own contribution was kept
    torch.testing.assert_close(x.grad.unique().sort().values, torch.tensor([0.0, 2 / 0.7]))


def test_other_inputs_and_no_build_fall_back_to_pytorch(monkeypatch):
    from deformable_detr_ops import hash_dropout

    calls = []
    monkeypatch.setattr(F, "dropout", lambda input, p, training: calls.append(p) or input)
    ops.dropout(torch.ones(3, dtype=torch.complex64), 0.1)
    monkeypatch.setattr(hash_dropout, "_registered", False)
    ops.dropout(torch.ones(3), 0.2)
    assert calls == [0.1, 0.2]


@pytest.mark.slow
@requires_kernel
def test_benchmark_op_times_the_dropout_kernel_against_pytorchs():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, os.path.join(root, "tools", "benchmark_op.py"), "--device", "cpu",
                             "--workloads", "dropout", "--batch", "1", "--repeats", "1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith("| dropout |")]
    assert [row[3].strip() for row in rows] == ["reference (cpu)", "kernel (cpu)"]
    for row in rows:
        assert float(row[4]) > 0 and float(row[5]) > 0, row  # forward and backward ms
    assert row[6].strip().endswith("x"), row  # the kernel's speed-up over the reference
