"""Dropout at memory speed on the CPU: the compiled kernel's mask is a hash of (seed, element index).

PyTorch's CPU dropout draws a Bernoulli mask one element at a time, then scales it and
multiplies: a large share of a CPU training step (docs/benchmarks.md, Design measurements).
The ``hash_dropout::dropout`` kernel (ops/csrc/hash_dropout_cpu.cpp) makes one pass instead: element i
of the contiguous input is kept when 32 bits of SplitMix64's output function at (seed, i) are
at least round(p * 2^32), and kept elements are scaled by 1 / (1 - p). Its backward is the same
function of the output gradient under the same seed, so no mask is stored either (PyTorch keeps
a mask as large as the input). The seed is drawn from PyTorch's default CPU generator, one draw
per call, so ``torch.manual_seed`` and saved generator states reproduce runs as before.

The masks are other random numbers than ``torch.nn.functional.dropout``'s, with the same
distribution: each element kept independently with probability 1 - p (to 2^-32).

``hash_dropout::relu_dropout`` (same file) is that dropout of relu(input + bias) in one pass, for the
hidden layer of a feed-forward network (``linear_relu_dropout``); its backward needs only the
output, since an element passes its gradient exactly when its output is positive.
"""
import torch
import torch.nn.functional as F

from . import extension

# The C++ operators: torch.ops.hash_dropout.<name> (schemas in ops/csrc/library.cpp)
OPERATOR = "hash_dropout::dropout"
RELU_OPERATOR = "hash_dropout::relu_dropout"
RELU_BACKWARD_OPERATOR = "hash_dropout::relu_dropout_backward"

_registered = False
_relu_registered = False

# SplitMix64's constants (Steele, Lea and Flood, 2014), as int64 bit patterns
_GAMMA = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _fake(first, *_):
    # every operator here returns a new tensor shaped like its first input
    return first.new_empty(first.shape)


def _setup_context(ctx, inputs, output):
    # (tensor, selector, p): dropout's seed, or relu_dropout_backward's forward output
    _, selector, p = inputs
    ctx.save_for_backward(selector)
    ctx.p = p


def _backward(ctx, grad_output):
    (seed,) = ctx.saved_tensors
    # linear in the input with a diagonal 0 or 1 / (1 - p) Jacobian: the same mask applies
    return torch.ops.hash_dropout.dropout(grad_output, seed, ctx.p), None, None


def _relu_setup_context(ctx, inputs, output):
    _, bias, _, p = inputs
    # the output decides the gradient (kept and positive), so neither the mask nor the input is
    # stored; the next layer keeps the same tensor for its own backward anyway
    ctx.save_for_backward(output)
    ctx.p = p
    ctx.bias_shape = None if bias is None else bias.shape


def _relu_backward(ctx, grad_output):
    (output,) = ctx.saved_tensors
    grad_input = torch.ops.hash_dropout.relu_dropout_backward(grad_output, output, ctx.p)
    grad_bias = None
    if ctx.bias_shape is not None and ctx.needs_input_grad[1]:
        grad_bias = grad_input.reshape(-1, ctx.bias_shape[0]).sum(0)
    return grad_input, grad_bias, None, None


def _relu_backward_backward(ctx, grad):
    # linear in grad_output; piecewise constant (zero derivative) in the output that selects
    (kept,) = ctx.saved_tensors
    return torch.ops.hash_dropout.relu_dropout_backward(grad, kept, ctx.p), None, None


def register():
    """Registers the fake implementations and autograd of the loaded C++ operators (idempotent)."""
    global _registered, _relu_registered
    if not _registered and kernel_loaded():
        torch.library.register_fake(OPERATOR)(_fake)
        torch.library.register_autograd(OPERATOR, _backward, setup_context=_setup_context)
        _registered = True
    if not _relu_registered and kernel_loaded("relu_dropout"):
        torch.library.register_fake(RELU_OPERATOR)(_fake)
        torch.library.register_fake(RELU_BACKWARD_OPERATOR)(_fake)
        torch.library.register_autograd(RELU_BACKWARD_OPERATOR, _relu_backward_backward,
                                        setup_context=_setup_context)
        torch.library.register_autograd(RELU_OPERATOR, _relu_backward, setup_context=_relu_setup_context)
        _relu_registered = True


def kernel_loaded(name: str = "dropout"):
    """Whether the loaded library has the operator ``torch.ops.hash_dropout.<name>`` (``dropout``,
    ``relu_dropout``, ``relu_dropout_backward``); a build from before it was added has not."""
    if not extension.library_loaded():
        return False
    try:
        getattr(torch.ops.hash_dropout, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _draw_seed():
    """One draw from torch's default CPU generator per call: () int64 in [0, 2^62)."""
    return torch.randint(0, 1 << 62, (), dtype=torch.int64)


def dropout(input, p=0.5, training=True):
    """``torch.nn.functional.dropout(input, p, training)`` in distribution: each element zeroed with
    probability p, the others scaled by 1 / (1 - p). A CPU floating tensor takes the compiled
    kernel (one pass, no stored mask); anything else (CUDA, whose native dropout is already
    fused; no build) takes ``torch.nn.functional.dropout``.

    Args:
        input: a tensor of any shape. p: the probability of an element being zeroed, in [0, 1].
        training: False returns ``input`` itself, as ``torch.nn.functional.dropout`` does.
    Returns:
        A tensor shaped like ``input`` (contiguous when the kernel ran).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0:
        return input
    if input.device.type != "cpu" or not input.is_floating_point() or not _registered:
        return F.dropout(input, p, True)
    return torch.ops.hash_dropout.dropout(input, _draw_seed(), p)


def linear_relu_dropout(input, weight, bias=None, p=0.5, training=True):
    """``dropout(relu(linear(input, weight, bias)), p, training)``, the hidden layer of a transformer's
    feed-forward network, with ``dropout`` as above. On the CPU in training, the bias, ReLU and
    dropout take one pass of the ``hash_dropout::relu_dropout`` kernel after a bias-free matrix product,
    instead of four (the bias copy of ``addmm``, ReLU, dropout; ReLU's backward), and only the
    output is kept for the backward. The mask is ``dropout``'s under the same seed; the values are
    the unfused layer's bit for bit where ``addmm`` adds the bias after the whole product (MKL
    does for 256 input channels, the transformers' width) and within rounding elsewhere. Under
    autocast the product keeps its bias (the autocast dtype's rounding stays as ``linear``'s)
    and the kernel does ReLU and dropout.

    Args:
        input: (*, C_in). weight: (C_out, C_in). bias: (C_out,) or None. p, training: as ``dropout``.
    Returns:
        (*, C_out).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0:
        return F.relu(F.linear(input, weight, bias))
    # p = 1 leaves nothing to scale: ``dropout``'s path zeroes the output and its gradient
    fused = _relu_registered and input.device.type == "cpu" and input.is_floating_point() and p < 1.0
    if not fused:
        return dropout(F.relu(F.linear(input, weight, bias)), p, training)
    if torch.is_autocast_enabled("cpu") or bias is None or weight.shape[0] % 2 or bias.dtype != input.dtype:
        hidden, bias = F.linear(input, weight, bias), None
    else:
        hidden = torch.matmul(input, weight.t())
    return torch.ops.hash_dropout.relu_dropout(hidden, bias, _draw_seed(), p)


def hash_dropout_reference(input, seed, p):
    """The kernel's function in PyTorch (int64 arithmetic wraps like uint64): for tests.

    input: any shape; seed: () int64; p in [0, 1). Returns the input's shape, contiguous."""
    flat = input.contiguous().reshape(-1)
    counter = torch.arange((flat.numel() + 1) // 2, dtype=torch.int64)
    z = seed.to(torch.int64) + (counter + 1) * _GAMMA
    z = (z ^ _logical_shift(z, 30)) * _MIX1
    z = (z ^ _logical_shift(z, 27)) * _MIX2
    z = z ^ _logical_shift(z, 31)
    low = z & 0xFFFFFFFF
    high = _logical_shift(z, 32)
    bits = torch.stack([low, high], dim=1).reshape(-1)[: flat.numel()]
    keep = bits >= round(p * 2 ** 32)
    compute = torch.promote_types(input.dtype, torch.float32)
    scaled = flat.to(compute) * (1.0 / (1.0 - p))
    return torch.where(keep, scaled, torch.zeros_like(scaled)).to(input.dtype).reshape(input.shape)


def _logical_shift(z, bits):
    """z >> bits as unsigned 64-bit (torch's >> on int64 repeats the sign bit)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)
