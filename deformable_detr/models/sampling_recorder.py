"""Recording where multi-scale deformable attention samples, as the model runs.

Legend: N batch, Lq queries, M heads, L levels, P points per head and level.

    with record_sampling(model) as records:
        outputs = model(images, masks)
    records[-1].layer                # "decoder.layers.5"
    records[-1].sampling_locations   # (N, Lq, M, L, P, 2): what the op received

Each ``MSDeformAttn`` checks one attribute, ``recording``: None (the default) costs nothing;
a list receives one ``SamplingRecord`` per call, made from the very tensors handed to the op,
so it holds what the model used whichever op implementation (CUDA, CPU kernel, reference) ran.
``SamplingRecord`` lives in sampling_record.py (deformable_attention.py builds it); it is
re-exported here.
"""
import contextlib
from typing import Iterator, List

from torch import nn

from .deformable_attention import MSDeformAttn
from .sampling_record import SamplingRecord

__all__ = ["SamplingRecord", "layer_name", "record_sampling"]


def layer_name(module_name: str) -> str:
    """``transformer.decoder.layers.5.cross_attn`` -> ``decoder.layers.5``."""
    parts = module_name.split(".")
    for start, part in enumerate(parts):
        if part in ("encoder", "decoder") and parts[start + 1 : start + 2] == ["layers"] and len(parts) > start + 2:
            return ".".join(parts[start : start + 3])
    return module_name


@contextlib.contextmanager
def record_sampling(model: nn.Module) -> Iterator[List[SamplingRecord]]:
    """Within the block, every ``MSDeformAttn`` of ``model`` appends a ``SamplingRecord`` per call to the
    list yielded, in call order (encoder layers, then decoder layers). Recording stops on exit, even on an error."""
    records: List[SamplingRecord] = []
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, MSDeformAttn)]
    for name, module in modules:
        module.recording = records
        module.recording_name = layer_name(name)
    try:
        yield records
    finally:
        for _, module in modules:
            module.recording = None
