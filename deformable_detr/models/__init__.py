"""Deformable DETR models: backbone, position encodings, deformable transformer, detector, matcher,
criterion and post-processing."""
from .backbone import Backbone
from .criterion import SetCriterion, loss_weights, sigmoid_focal_loss
from .deformable_attention import MSDeformAttn
from .deformable_transformer import DeformableTransformer
from .detector import MLP, DeformableDETR
from .matcher import HungarianMatcher
from .position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine
from .postprocess import PostProcess
from .sampling_record import SamplingRecord
from .sampling_recorder import record_sampling

__all__ = [
    "Backbone",
    "DeformableDETR",
    "DeformableTransformer",
    "HungarianMatcher",
    "MLP",
    "MSDeformAttn",
    "PositionEmbeddingLearned",
    "PositionEmbeddingSine",
    "PostProcess",
    "SamplingRecord",
    "SetCriterion",
    "loss_weights",
    "record_sampling",
    "sigmoid_focal_loss",
]
