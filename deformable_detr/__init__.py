"""Deformable DETR: models, data, training engine and the Python API.

    from deformable_detr import Detector
    detections = Detector.from_checkpoint("checkpoint_best.pth").predict("photo.jpg")
"""
__all__ = ["Detections", "Detector"]


def __getattr__(name):
    # imported on first use: ``import deformable_detr.errors`` stays free of torch and the models
    if name in __all__:
        from .inference import detector

        return getattr(detector, name)
    raise AttributeError(f"module 'deformable_detr' has no attribute {name!r}")
