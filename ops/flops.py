"""FLOPs of multi-scale deformable attention, counted as one unit whichever implementation runs.

Legend: N batch, Lq queries, M heads, L levels, P sampling points per level and head,
D channels per head.

Per query, head, level, point and channel, bilinear interpolation is 4 multiply-adds (one per
corner pixel) and the attention weighting 1 more: 5 multiply-adds (MACs), the paper's 5 N_q K C
term. A MAC is 2 FLOPs, as ``torch.utils.flop_counter`` counts matrix products and convolutions,
so the forward is ``10 * N * Lq * M * L * P * D`` FLOPs. The corner weights of a sample (a few
operations per sample, independent of D) are not counted. The backward counts twice the forward,
the convention of the matrix products: gradients of value and of the weights each repeat the
forward's work, the locations' gradient is of the same order.

``register()`` and ``register_triton()`` give ``torch.utils.flop_counter.FlopCounterMode`` these
formulas for the compiled and the Triton operators. The reference implementation (``grid_sample``, a product and a sum, none of which the
counter has a formula for) reports the same counts itself through ``count_reference``, under the
same operator names, so a count does not depend on which implementation ran and nothing is
counted twice.
"""
import torch
from torch.utils import flop_counter

FORWARD_NAME = "deformable_attention.ms_deform_attn_forward"
BACKWARD_NAME = "deformable_attention.ms_deform_attn_backward"
TRITON_FORWARD_NAME = "deformable_attention.ms_deform_attn_triton_forward"
TRITON_BACKWARD_NAME = "deformable_attention.ms_deform_attn_triton_backward"
# the operators whose counts are the op's forward, whichever implementation ran
FORWARD_NAMES = (FORWARD_NAME, TRITON_FORWARD_NAME)
MACS_PER_SAMPLED_CHANNEL = 5
FLOPS_PER_MAC = 2

_registered = False


def forward_flops(value_shape, sampling_locations_shape) -> int:
    """FLOPs of one forward: value (N, S, M, D), sampling_locations (N, Lq, M, L, P, 2)."""
    batch, _, heads, channels = value_shape
    _, queries, _, levels, points, _ = sampling_locations_shape
    return FLOPS_PER_MAC * MACS_PER_SAMPLED_CHANNEL * batch * queries * heads * levels * points * channels


def backward_flops(value_shape, sampling_locations_shape) -> int:
    """FLOPs of one backward (gradients of value, locations and weights): twice the forward."""
    return 2 * forward_flops(value_shape, sampling_locations_shape)


def _forward_formula(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, *, out_shape=None, **kwargs):
    # the counter passes the arguments' shapes
    return forward_flops(value, sampling_locations)


def _backward_formula(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output,
                      *rest, out_shape=None, **kwargs):
    # rest: the Triton backward's grad_value_wanted
    return backward_flops(value, sampling_locations)


def _operator(name):
    """The compiled operator's overload packet, or None when the library is not loaded."""
    namespace, operator = name.split(".")
    return getattr(getattr(torch.ops, namespace), operator, None)


def _register(forward_name, backward_name):
    for name, formula in ((forward_name, _forward_formula), (backward_name, _backward_formula)):
        packet = _operator(name)
        if packet is not None and packet not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(packet)(formula)


def register():
    """Adds the formulas of the compiled operators to ``torch.utils.flop_counter`` (idempotent;
    call once the library is loaded)."""
    global _registered
    if _registered:
        return
    _register(FORWARD_NAME, BACKWARD_NAME)
    _registered = True


def register_triton():
    """The same for the Triton operators (idempotent; call once they are defined)."""
    _register(TRITON_FORWARD_NAME, TRITON_BACKWARD_NAME)


def _active_counters():
    """The ``FlopCounterMode`` instances active now (usually none: then this is one cheap check)."""
    from torch.utils import _python_dispatch

    in_mode = getattr(_python_dispatch, "is_in_torch_dispatch_mode", None)
    mode_stack = getattr(_python_dispatch, "_get_current_dispatch_mode_stack", None)
    if in_mode is None or mode_stack is None or not in_mode():
        return []
    # A FlopCounterMode enters a dispatch mode that holds it as ``counter``.
    return [mode.counter for mode in mode_stack() if isinstance(getattr(mode, "counter", None), flop_counter.FlopCounterMode)]


def _add(counter, name, flops):
    # what FlopCounterMode does for an operator it has a formula for: add to every enclosing module
    key = _operator(name) or name
    for parent in set(counter.mod_tracker.parents):
        counter.flop_counts[parent][key] += flops


def count_reference(output, value, sampling_locations):
    """Report a reference-implementation call to the active flop counters, forward now and backward
    when the output's gradient arrives; a no-op when no counter is active.

    Args:
        output: (N, Lq, M * D), the reference's result.
        value: (N, S, M, D); sampling_locations: (N, Lq, M, L, P, 2).
    """
    counters = _active_counters()
    if not counters:
        return
    value_shape, locations_shape = tuple(value.shape), tuple(sampling_locations.shape)
    for counter in counters:
        _add(counter, FORWARD_NAME, forward_flops(value_shape, locations_shape))
    if output.requires_grad:
        def on_gradient(grad):
            for counter in counters:
                if counter.mode is not None:  # still counting
                    _add(counter, BACKWARD_NAME, backward_flops(value_shape, locations_shape))
            return grad

        output.register_hook(on_gradient)
