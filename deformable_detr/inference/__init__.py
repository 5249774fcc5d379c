"""Detection with a trained model from Python: ``Detector`` and its ``Detections``."""
from .checkpoint_recipe import CheckpointRecipe, read_recipe
from .detector import Detections, Detector

__all__ = ["CheckpointRecipe", "Detections", "Detector", "read_recipe"]
