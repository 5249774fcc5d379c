"""Where a training step's time goes: ``torch.profiler`` ranges on the step's parts, measured
without touching the model's code.

Modules get ``record_function`` ranges through forward hooks (``label_modules``); the step's own
phases (backward, optimizer) are labelled by the caller. ``step_breakdown`` turns the profiler's
events into milliseconds per part, each counted once: nested ranges are subtracted from the
part that contains them (the op's forward from the encoder and decoder, the matcher from the
loss, the op's backward from the backward).
"""
import contextlib
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

# the op as the profiler names it (the Triton implementation's ranges count as the same)
OP_FORWARD = "deformable_attention::ms_deform_attn_forward"
OP_BACKWARD = "deformable_attention::ms_deform_attn_backward"
ALIASES = {
    "deformable_attention::ms_deform_attn_triton_forward": OP_FORWARD,
    "deformable_attention::ms_deform_attn_triton_backward": OP_BACKWARD,
}

# (row, range that counts, ranges inside it that are reported on their own rows)
PARTS: Sequence[Tuple[str, str, Tuple[str, ...]]] = (
    ("backbone", "backbone", ()),
    ("encoder (without the op)", "encoder", (OP_FORWARD,)),
    ("decoder (without the op)", "decoder", (OP_FORWARD,)),
    ("deformable attention op, forward", OP_FORWARD, ()),
    ("rest of the forward (projections, position encodings, heads)", "forward", ("backbone", "encoder", "decoder")),
    ("matcher", "matcher", ()),
    ("loss (without the matcher)", "loss", ("matcher",)),
    ("backward (without the op)", "backward", (OP_BACKWARD,)),
    ("deformable attention op, backward", OP_BACKWARD, ()),
    ("optimizer (clipping and step)", "optimizer", ()),
)

Interval = Tuple[float, float]


@contextlib.contextmanager
def label_modules(modules: Dict[str, nn.Module], synchronize: Optional[Callable[[], None]] = None) -> Iterator[None]:
    """Within the block, every forward of ``modules[label]`` is a ``record_function(label)`` range.

    ``synchronize`` (e.g. ``torch.cuda.synchronize``) runs at every range boundary, so that the
    host-side ranges hold the device work launched in them.
    """
    handles = []
    for label, module in modules.items():
        open_ranges: List = []

        def enter(module, args, label=label, open_ranges=open_ranges):
            if synchronize is not None:
                synchronize()
            scope = torch.autograd.profiler.record_function(label)
            scope.__enter__()
            open_ranges.append(scope)

        def leave(module, args, output, open_ranges=open_ranges):
            if synchronize is not None:
                synchronize()
            open_ranges.pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _merge(intervals: Iterable[Interval]) -> List[Interval]:
    """Sorted, non-overlapping union of (start, end) intervals."""
    merged: List[Interval] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _length(intervals: List[Interval]) -> float:
    return sum(end - start for start, end in intervals)


def _overlap(a: List[Interval], b: List[Interval]) -> float:
    """Length of the intersection of two merged interval lists."""
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def step_breakdown(events, step_label: str = "step") -> Dict[str, float]:
    """Milliseconds per step of each of ``PARTS``, plus "other" (the rest of the step) and
    "step" (the whole step), averaged over the ``step_label`` ranges.

    Args:
        events: ``profiler.events()`` of a profile whose steps are ``record_function(step_label)``
            ranges, with the ranges named in ``PARTS`` inside them.
    """
    ranges: Dict[str, List[Interval]] = {}
    for event in events:
        ranges.setdefault(ALIASES.get(event.name, event.name), []).append((event.time_range.start, event.time_range.end))
    merged = {name: _merge(intervals) for name, intervals in ranges.items()}
    steps = len(ranges.get(step_label, []))
    if steps == 0:
        raise ValueError(f"the profile has no {step_label!r} ranges")
    rows: Dict[str, float] = {}
    for row, name, inner in PARTS:
        own = merged.get(name, [])
        # a range nested in ``name`` is reported on its own row: take it out of this one
        inside = _merge(interval for other in inner for interval in merged.get(other, []))
        rows[row] = (_length(own) - _overlap(own, inside)) / steps / 1e3
    step = _length(merged[step_label]) / steps / 1e3
    rows["other (data to device, zero_grad, between the parts)"] = step - sum(rows.values())
    rows["step"] = step
    return rows
