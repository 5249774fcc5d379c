"""ONNX export of an exported program and running the result in onnxruntime.

The deformable attention op is translated to standard ONNX (``GridSample``, opset 18; see
``deformable_detr_ops.onnx_translation``), so onnxruntime needs no custom-op library.
Contract of the model: input ``images`` float32 (N, 3, H, W), outputs ``logits`` (N, Q, K) and
``boxes`` (N, Q, 4); its ``metadata_props`` say how to pre- and post-process (``metadata``).
"""
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.export import ExportedProgram

from .program import ExportError

INPUT_NAMES = ["images"]
INPUT_DIMENSIONS = ("batch", "channels", "height", "width")
OUTPUT_NAMES = ["logits", "boxes"]


def export_onnx(program: ExportedProgram, path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """Writes ``program`` (images -> (logits, boxes)) to ``path`` as one self-contained ONNX file, with
    ``metadata`` {key: text} as its ``metadata_props``."""
    try:
        from deformable_detr_ops.onnx_translation import OPSET, translation_table
    except ImportError as error:
        raise ExportError(f"ONNX export needs onnxscript and onnx ({error}); pip install -r requirements.txt") from error
    onnx_program = torch.onnx.export(
        program,
        (),
        dynamo=True,
        opset_version=OPSET,
        custom_translation_table=translation_table(),
        input_names=INPUT_NAMES,
        output_names=OUTPUT_NAMES,
        verbose=False,
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    onnx_program.save(path, external_data=False)
    import onnx

    model = onnx.load(path)
    name_input_dimensions(model, INPUT_DIMENSIONS)
    onnx.helper.set_model_props(model, dict(metadata or {}))
    onnx.save(model, path)


def name_input_dimensions(model, names) -> None:
    """Gives the symbolic dimensions of the first input of the ONNX ``model`` (a ModelProto) the ``names``
    (e.g. torch.export's ``s34`` becomes ``batch``), wherever inputs, outputs and value infos use them."""
    graph = model.graph
    dims = graph.input[0].type.tensor_type.shape.dim
    renames = {dim.dim_param: name for dim, name in zip(dims, names) if dim.dim_param}
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in renames:
                dim.dim_param = renames[dim.dim_param]


def read_onnx_metadata(path: str) -> Dict[str, str]:
    """The ``metadata_props`` {key: text} of the ONNX file at ``path``."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    return {prop.key: prop.value for prop in model.metadata_props}


def foreign_operators(path: str) -> List[str]:
    """Operators of the ONNX file at ``path`` that neither the standard (``ai.onnx``) domain nor the
    file's own functions define: what a runtime would need a custom library for."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    local = {(f.domain, f.name) for f in model.functions}
    standard = ("", "ai.onnx")
    nodes = list(model.graph.node) + [node for function in model.functions for node in function.node]
    return sorted({f"{n.domain}::{n.op_type}" for n in nodes if n.domain not in standard and (n.domain, n.op_type) not in local})


def onnx_opset(path: str) -> Optional[int]:
    """The standard-domain opset version the ONNX file at ``path`` declares."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), None)


class OnnxRunner:
    """An onnxruntime CPU session of an exported detector: images (N, 3, H, W) -> (logits, boxes)."""

    def __init__(self, path: str, threads: Optional[int] = None):
        try:
            import onnxruntime
        except ImportError as error:
            raise ExportError(f"checking an ONNX export needs onnxruntime ({error}); pip install -r requirements.txt") from error
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def __call__(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        feed = {INPUT_NAMES[0]: np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)}
        logits, boxes = self.session.run(OUTPUT_NAMES, feed)
        return torch.from_numpy(logits), torch.from_numpy(boxes)
