"""Export of the detector: ``torch.export`` programs and ONNX models of images -> (logits, boxes),
and the checks that an exported model computes what the PyTorch model does.

ONNX needs ``onnx``, ``onnxscript`` and, to run the model, ``onnxruntime``; they are imported
only by the functions that use them.
"""
from .detection_match import DetectionMatch, Detections, match_detections, top_detections
from .exportable_detector import ExportableDetector
from .metadata import detector_metadata, export_metadata, read_metadata
from .program import ExportError, export_program, input_ranges, load_program, save_program

__all__ = [
    "DetectionMatch",
    "Detections",
    "ExportError",
    "ExportableDetector",
    "detector_metadata",
    "export_metadata",
    "export_program",
    "input_ranges",
    "load_program",
    "match_detections",
    "read_metadata",
    "save_program",
    "top_detections",
]
