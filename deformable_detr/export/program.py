"""``torch.export`` of an ``ExportableDetector`` with a dynamic batch size and image size.

The batch dimension is declared dynamic from 1 up; height and width are left to torch.export
(``Dim.AUTO``), which derives their lower bound from the model: every feature map keeps at least
two pixels per side (e.g. at least 65 px for four levels, the last of stride 64). A size that the
trace would have fixed or bounded is refused, so a program never silently accepts only sizes
near the example's. A program can carry text files (``save_program``'s ``extra_files``), which
``read_extra_files`` reads back.
"""
from typing import Dict, Iterable, Optional, Sequence, Tuple

import sympy
import torch
import torch.nn.functional as F
from torch.export import Dim, ExportedProgram
from torch.utils._sympy.numbers import int_oo

from deformable_detr_ops import BUILD_HINT, library_loaded

from ..errors import UserError

INPUT_DIMENSIONS = ("batch", "channels", "height", "width")
DYNAMIC_DIMENSIONS = ("batch", "height", "width")


class ExportError(UserError, RuntimeError):
    """The model cannot be exported as asked (e.g. the compiled op is missing)."""


def dynamic_shapes() -> Dict[str, Dict[int, object]]:
    """The ``dynamic_shapes`` argument for ``images`` (N, 3, H, W)."""
    return {"images": {0: Dim("batch", min=1), 2: Dim.AUTO, 3: Dim.AUTO}}


def traced_example(example: torch.Tensor, sides: Optional[Sequence[int]] = None) -> torch.Tensor:
    """The batch to trace for ``example`` (N, 3, H, W): a batch of one as two copies, resized to
    ``sides`` (H', W') when given.

    torch.export specializes every size of 1 it meets to the constant 1: a traced batch of one
    would fix the batch. Two copies trace the program of any batch: torch.export traces with fake
    tensors, so only the example's shape counts, never its values, and the detector in eval mode
    (no padding, no batch statistics) computes each image of a batch alone.
    """
    if example.shape[0] == 1:
        example = example.repeat(2, 1, 1, 1)
    if sides is not None and tuple(sides) != tuple(example.shape[2:]):
        example = F.interpolate(example, size=tuple(sides), mode="bilinear", align_corners=False)
    return example


def trace(module: torch.nn.Module, example: torch.Tensor) -> ExportedProgram:
    """One ``torch.export`` of ``module`` with ``example`` (N, 3, H, W) as it is."""
    with torch.no_grad():
        return torch.export.export(module, (example,), dynamic_shapes=dynamic_shapes())


def export_program(module: torch.nn.Module, example: torch.Tensor) -> ExportedProgram:
    """``torch.export`` of ``module`` (images -> outputs) in eval mode, traced with ``example`` (N, 3, H, W)
    (see ``traced_example``; its ``example_inputs`` hold the batch traced).

    A feature map one pixel high in the trace is specialized too: the program would accept only
    the heights that keep it so (e.g. 33..64 px for four levels). Such an example is traced again
    one pixel above that range, where every feature map has two pixels or more and no size has
    an upper bound. Raises ExportError without the compiled op (whose fake implementation is what
    makes the attention traceable; the pure-PyTorch reference reads shapes on the host) or when
    a dimension still has an upper bound.
    """
    if not library_loaded():
        raise ExportError(f"export needs the compiled deformable attention op (deformable_detr_ops._C). {BUILD_HINT}")
    module = module.eval()
    example = traced_example(example)
    program = trace(module, example)
    upper = [input_ranges(program)[name][1] for name in ("height", "width")]
    if any(bound is not None for bound in upper):
        example = traced_example(example, [side if bound is None else bound + 1 for side, bound in zip(example.shape[2:], upper)])
        program = trace(module, example)
    ranges = input_ranges(program)
    bounded = [f"{name} to {ranges[name][0]}..{ranges[name][1]}" for name in DYNAMIC_DIMENSIONS if ranges[name][1] is not None]
    if bounded:
        raise ExportError(f"torch.export limited the {', '.join(bounded)} (traced with a {tuple(example.shape)} batch)")
    return program


def input_ranges(program: ExportedProgram) -> Dict[str, Tuple[int, Optional[int]]]:
    """{"batch", "channels", "height", "width": (min, max)} that ``program`` accepts for ``images``;
    max None for unbounded."""
    placeholder = next(node for node in program.graph.nodes if node.op == "placeholder" and node.name == "images")
    ranges = {}
    for name, size in zip(INPUT_DIMENSIONS, placeholder.meta["val"].shape):
        if isinstance(size, int):
            ranges[name] = (size, size)
            continue
        bounds = program.range_constraints[size.node.expr]
        ranges[name] = (int(bounds.lower), None if bounds.upper in (int_oo, sympy.oo) else int(bounds.upper))
    return ranges


def save_program(program: ExportedProgram, path: str, extra_files: Optional[Dict[str, str]] = None) -> None:
    """Writes ``program`` to ``path`` (a ``.pt2`` archive) with ``extra_files`` {name: text} beside it."""
    torch.export.save(program, path, extra_files=extra_files)


def load_program(path: str) -> ExportedProgram:
    """A program written by ``save_program``; its ``module()`` runs it."""
    return torch.export.load(path)


def read_extra_files(path: str, names: Iterable[str]) -> Dict[str, str]:
    """{name: text} of the ``extra_files`` of the archive at ``path`` among ``names`` (those it has)."""
    wanted = list(names)
    extra_files = dict.fromkeys(wanted, "")
    torch.export.load(path, extra_files=extra_files)
    return {name: text.decode() if isinstance(text, bytes) else text for name, text in extra_files.items() if text and name in wanted}
