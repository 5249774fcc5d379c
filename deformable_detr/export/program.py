"""``torch.export`` of an ``ExportableDetector`` with a dynamic batch size and image size.

The batch dimension is declared dynamic from 1 up; height and width are left to torch.export
(``Dim.AUTO``), which derives their lower bound from the model: every feature map keeps at least
two pixels per side (e.g. at least 65 px for four levels, the last of stride 64). A size that the
trace would have fixed to the example's is refused, so a program never silently accepts only
the example's size.
"""
from typing import Dict, Optional, Tuple

import sympy
import torch
from torch.export import Dim, ExportedProgram
from torch.utils._sympy.numbers import int_oo

from deformable_detr_ops import BUILD_HINT, library_loaded

from ..errors import UserError

INPUT_DIMENSIONS = ("batch", "channels", "height", "width")


class ExportError(UserError, RuntimeError):
    """The model cannot be exported as asked (e.g. the compiled op is missing)."""


def dynamic_shapes() -> Dict[str, Dict[int, object]]:
    """The ``dynamic_shapes`` argument for ``images`` (N, 3, H, W)."""
    return {"images": {0: Dim("batch", min=1), 2: Dim.AUTO, 3: Dim.AUTO}}


def export_program(module: torch.nn.Module, example: torch.Tensor) -> ExportedProgram:
    """``torch.export`` of ``module`` (images -> outputs) in eval mode, traced with ``example`` (N, 3, H, W).

    Raises ExportError without the compiled op (whose fake implementation is what makes the
    attention traceable; the pure-PyTorch reference reads shapes on the host) or when a
    dimension did not stay dynamic.
    """
    if not library_loaded():
        raise ExportError(f"export needs the compiled deformable attention op (deformable_detr_ops._C). {BUILD_HINT}")
    module = module.eval()
    with torch.no_grad():
        program = torch.export.export(module, (example,), dynamic_shapes=dynamic_shapes())
    ranges = input_ranges(program)
    fixed = [name for name in ("batch", "height", "width") if ranges[name][0] == ranges[name][1]]
    if fixed:
        raise ExportError(f"torch.export fixed the {', '.join(fixed)} of the input to the example's {tuple(example.shape)}")
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


def save_program(program: ExportedProgram, path: str) -> None:
    torch.export.save(program, path)


def load_program(path: str) -> ExportedProgram:
    """A program written by ``save_program``; its ``module()`` runs it."""
    return torch.export.load(path)
