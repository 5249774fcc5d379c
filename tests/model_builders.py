"""Small model factories shared by the model tests."""
from hydra.utils import instantiate

from cli import compose_config
from deformable_detr.models import Backbone, DeformableDETR, DeformableTransformer, PositionEmbeddingSine


def official_model(experiment, num_classes=91):
    """The model of an official experiment as its config builds it (random weights, no download)."""
    cfg = compose_config("train", [f"experiment={experiment}", "model.backbone.pretrained=false"])
    return instantiate(cfg.model, num_classes=num_classes)


def tiny_model(levels=4, refine=False, two_stage=False, num_classes=10, queries=20, hidden=64, dropout=0.0, norm="bn"):
    """A ResNet-18 model small enough to train for a few steps in seconds on a CPU."""
    backbone = Backbone("resnet18", True, levels > 1, False, norm=norm, trainable_layers=5)
    transformer = DeformableTransformer(
        d_model=hidden, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=128, dropout=dropout,
        num_feature_levels=levels, dec_n_points=2, enc_n_points=2, two_stage=two_stage,
    )
    return DeformableDETR(backbone, PositionEmbeddingSine(hidden // 2), transformer, num_classes, queries, True, refine)


def instantiate_checkpoint_model(path):
    """The model of a checkpoint of this framework (its saved ``config``), weights loaded, in eval mode; and that config."""
    import torch

    checkpoint = torch.load(path, weights_only=True)
    config = checkpoint["config"]
    model = instantiate(config["model"], num_classes=checkpoint["num_classes"])
    model.load_state_dict(checkpoint["model"])
    return model.eval(), config


def off_pixel_centres(model, scale=1e-2, seed=0):
    """Nudges every sampling offset off the initialization's whole pixels (in place; returns the model).

    At initialization encoder samples land exactly on pixel centres, where bilinear sampling has a
    kink: the location gradient there depends on which side float rounding puts the point, so two
    correct computations (eager and compiled, CPU and GPU) may disagree. Tests comparing gradients
    nudge the offsets first."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("sampling_offsets.bias"):
                noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
                parameter.add_(scale * noise.to(parameter.device))
    return model


def one_box_batches(image_ids, size=64):
    """Batches of one ``size`` x ``size`` noise image each, with one box of label 3, for each of ``image_ids``
    (the same noise for the same position in the sequence): ``(images, masks, targets)``."""
    import torch

    generator = torch.Generator().manual_seed(0)
    for image_id in image_ids:
        target = {"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4]]), "labels": torch.tensor([3]), "image_id": torch.tensor(image_id)}
        yield torch.randn(1, 3, size, size, generator=generator), torch.zeros(1, size, size, dtype=torch.bool), [target]
