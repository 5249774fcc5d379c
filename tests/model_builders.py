"""Small model factories shared by the model tests."""
from deformable_detr.models import Backbone, DeformableDETR, DeformableTransformer, PositionEmbeddingSine

from official_files import OFFICIAL_FLAGS


def official_model(experiment, num_classes=91):
    """The architecture of an official experiment (random weights)."""
    flags = OFFICIAL_FLAGS[experiment]
    levels = flags.get("num_feature_levels", 4)
    two_stage = flags.get("two_stage", False)
    backbone = Backbone("resnet50", True, levels > 1, flags.get("dilation", False))
    transformer = DeformableTransformer(num_feature_levels=levels, two_stage=two_stage)
    return DeformableDETR(backbone, PositionEmbeddingSine(128), transformer, num_classes, 300, True, flags.get("with_box_refine", False), two_stage)


def tiny_model(levels=4, refine=False, two_stage=False, num_classes=10, queries=20, hidden=64, dropout=0.0):
    """A ResNet-18 model small enough to train for a few steps in seconds on a CPU."""
    backbone = Backbone("resnet18", True, levels > 1, False)
    transformer = DeformableTransformer(
        d_model=hidden, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=128, dropout=dropout,
        num_feature_levels=levels, dec_n_points=2, enc_n_points=2, two_stage=two_stage, two_stage_num_proposals=queries,
    )
    return DeformableDETR(backbone, PositionEmbeddingSine(hidden // 2), transformer, num_classes, queries, True, refine, two_stage)
