"""ResNet backbone with frozen BatchNorm, returning C3-C5 (multi-scale) or C5 (single-scale) with masks."""
import os
from typing import Dict, Sequence, Union

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d

# Output channels of layer2..layer4: bottleneck ResNets (50/101/152) end with 4x wider blocks.
_CHANNELS = {
    "resnet18": (128, 256, 512),
    "resnet34": (128, 256, 512),
    "resnet50": (512, 1024, 2048),
    "resnet101": (512, 1024, 2048),
    "resnet152": (512, 1024, 2048),
}
_NORMS = {
    "frozen_bn": FrozenBatchNorm2d,
    "bn": nn.BatchNorm2d,
    "gn": lambda channels: nn.GroupNorm(32, channels),
}
_WEIGHTS = {
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
    "resnet152": "ResNet152_Weights",
}


class Backbone(nn.Module):
    """A torchvision ResNet trunk.

    The official recipe fine-tunes ImageNet weights: BatchNorm frozen (``norm="frozen_bn"``),
    the stem and layer1 frozen, layer2-4 trained (``trainable_layers=3``) with a 10x smaller
    learning rate. Training from scratch needs normalization that learns (``norm="bn"`` or
    ``"gn"``) and every layer trainable (``trainable_layers=5``).

    Args:
        name: ``resnet18|34|50|101|152``.
        train_backbone: False freezes the whole backbone.
        return_interm_layers: return C3, C4, C5 (strides 8, 16, 32) instead of C5 only.
        dilation: DC5, dilation instead of stride in layer4 (C5 at stride 16).
        pretrained: False (random init), True (torchvision's ImageNet weights, IMAGENET1K_V1 as the
            official recipe used), or a path to a torchvision ResNet state_dict file.
        norm: ``frozen_bn`` (statistics and affine fixed), ``bn`` (BatchNorm2d) or ``gn``
            (GroupNorm, 32 groups).
        trainable_layers: how many of layer4, layer3, layer2, layer1, stem train (0-5), counted from
            layer4 as in torchvision's detection models.
        channels_last: keep the convolution weights and activations in channels-last (NHWC)
            memory layout, which oneDNN (CPU) and cuDNN (tensor cores) convolve fastest; the same
            function, a different layout. The returned maps are then channels-last too, which
            also makes the transformer's flattening of them into tokens (B, H*W, C) a view.
    Attributes:
        strides: stride of each returned map, e.g. [8, 16, 32].
        num_channels: channels of each returned map, e.g. [512, 1024, 2048].
    """

    def __init__(
        self,
        name: str = "resnet50",
        train_backbone: bool = True,
        return_interm_layers: bool = True,
        dilation: bool = False,
        pretrained: Union[bool, str] = False,
        norm: str = "frozen_bn",
        trainable_layers: int = 3,
        channels_last: bool = True,
    ):
        super().__init__()
        self.name = name
        self.dilation = dilation
        if name not in _CHANNELS:
            raise ValueError(f"backbone name={name!r} is not supported; choose one of {sorted(_CHANNELS)}")
        if dilation and name in ("resnet18", "resnet34"):
            raise ValueError(f"dilation (DC5) needs a bottleneck ResNet (resnet50/101/152), not {name}")
        if norm not in _NORMS:
            raise ValueError(f"backbone norm={norm!r} is not one of {sorted(_NORMS)}")
        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"backbone trainable_layers={trainable_layers} must be in 0..5")
        resnet = getattr(torchvision.models, name)(
            weights=None, replace_stride_with_dilation=[False, False, dilation], norm_layer=_NORMS[norm]
        )
        if pretrained:
            resnet.load_state_dict(_imagenet_state_dict(name, pretrained), strict=False)
        trainable = ("layer4", "layer3", "layer2", "layer1", "conv1")[:trainable_layers] if train_backbone else ()
        if "conv1" in trainable:
            trainable += ("bn1",)
        for param_name, param in resnet.named_parameters():
            param.requires_grad_(param_name.startswith(trainable))

        channels = _CHANNELS[name]
        if return_interm_layers:
            return_layers = {"layer2": "0", "layer3": "1", "layer4": "2"}
            self.strides = [8, 16, 32]
            self.num_channels = list(channels)
        else:
            return_layers = {"layer4": "0"}
            self.strides = [32]
            self.num_channels = [channels[-1]]
        if dilation:
            self.strides[-1] //= 2
        self.body = IntermediateLayerGetter(resnet, return_layers=return_layers)
        self.channels_last = channels_last
        if channels_last:
            # parameters keep this layout through load_state_dict, .to(dtype) and optimizers
            self.body.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor, mask: torch.Tensor):
        """images (B, 3, H, W), mask (B, H, W) bool, True on padding.

        Returns a list of (feature (B, C_l, H_l, W_l), mask (B, H_l, W_l)) from the finest level up.
        """
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        features: Dict[str, torch.Tensor] = self.body(images)
        out = []
        for key in sorted(features):
            x = features[key]
            out.append((x, downsample_mask(mask, x.shape[-2:])))
        return out


def downsample_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, H, W) bool -> (B, h, w) bool by nearest-neighbour resizing, as the padding masks always were."""
    return F.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]


def _imagenet_state_dict(name: str, pretrained: Union[bool, str]) -> Dict[str, torch.Tensor]:
    """ImageNet weights from a local file or torchvision's weights API, with an offline-friendly error."""
    weights_enum = getattr(torchvision.models, _WEIGHTS[name]).IMAGENET1K_V1
    if isinstance(pretrained, str):
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(
                f"backbone pretrained={pretrained!r} is not a file; pass the path of a torchvision {name} "
                f"state_dict (e.g. {os.path.basename(weights_enum.url)}) or pretrained=true to download it"
            )
        state = torch.load(pretrained, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        return {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        state = weights_enum.get_state_dict(progress=False)
    except Exception as error:  # no network, proxy, broken cache: all end here
        hub_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise RuntimeError(
            f"could not get the ImageNet weights of {name} ({type(error).__name__}: {error}). "
            f"Offline, download {weights_enum.url} on a connected machine and either place it in {hub_dir}/ "
            f"or pass its path as the backbone's pretrained=/path/to/{os.path.basename(weights_enum.url)}; "
            "or train from scratch with pretrained=false."
        ) from error
    return {k: v for k, v in state.items() if not k.startswith("fc.")}
