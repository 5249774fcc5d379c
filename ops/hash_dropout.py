"""Dropout at memory speed on the CPU: the compiled kernel's mask is a hash of (seed, element index).

PyTorch's CPU dropout draws a Bernoulli mask one element at a time (several nanoseconds each),
then scales it and multiplies: a fifth of a ResNet-50 Deformable DETR training step goes there.
The ``hash_dropout`` kernel (ops/csrc/hash_dropout_cpu.cpp) makes one pass instead: element i
of the contiguous input is kept when 32 bits of SplitMix64's output function at (seed, i) are
at least round(p * 2^32), and kept elements are scaled by 1 / (1 - p). Its backward is the same
function of the output gradient under the same seed, so no mask is stored either (PyTorch keeps
a mask as large as the input). The seed is drawn from PyTorch's default CPU generator, one draw
per call, so ``torch.manual_seed`` and saved generator states reproduce runs as before.

The masks are other random numbers than ``torch.nn.functional.dropout``'s, with the same
distribution: each element kept independently with probability 1 - p (to 2^-32).
"""
import torch
import torch.nn.functional as F

from . import extension

OPERATOR = "deformable_attention::hash_dropout"

_registered = False

# SplitMix64's constants (Steele, Lea and Flood, 2014), as int64 bit patterns
_GAMMA = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _fake(input, seed, p):
    return input.new_empty(input.shape)


def _setup_context(ctx, inputs, output):
    _, seed, p = inputs
    ctx.save_for_backward(seed)
    ctx.p = p


def _backward(ctx, grad_output):
    (seed,) = ctx.saved_tensors
    # linear in the input with a diagonal 0 or 1 / (1 - p) Jacobian: the same mask applies
    return torch.ops.deformable_attention.hash_dropout(grad_output, seed, ctx.p), None, None


def register():
    """Registers the fake implementation and autograd of the loaded C++ operator (idempotent)."""
    global _registered
    if _registered or not kernel_loaded():
        return
    torch.library.register_fake(OPERATOR)(_fake)
    torch.library.register_autograd(OPERATOR, _backward, setup_context=_setup_context)
    _registered = True


def kernel_loaded():
    """Whether the loaded library has the kernel (a build from before it was added has not)."""
    if not extension.library_loaded():
        return False
    try:
        torch.ops.deformable_attention.hash_dropout
    except (AttributeError, RuntimeError):
        return False
    return True


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
    seed = torch.randint(0, 1 << 62, (), dtype=torch.int64)
    return torch.ops.deformable_attention.hash_dropout(input, seed, p)


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
