"""Loading model weights from checkpoint files: this framework's and the official release files.

An official release file is ``{"model": state_dict, "args": argparse.Namespace, "epoch", ...}``
whose state_dict names the backbone ``backbone.0.*`` / ``backbone.1.*`` and repeats the box and
class heads under ``transformer.decoder.*`` (the official decoder held references to them). Here
the backbone is ``backbone.*``, the position encoding ``position_encoding.*`` and the decoder
receives the heads as arguments, so those repeated keys are checked to be identical and dropped.
"""
import argparse
import dataclasses
import os
import pickle
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from ..errors import CheckpointError, MissingFileError

OFFICIAL_EXPERIMENTS = (
    "r50_deformable_detr",
    "r50_deformable_detr_single_scale",
    "r50_deformable_detr_single_scale_dc5",
    "r50_deformable_detr_plus_iterative_bbox_refinement",
    "r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage",
)
_TIED_PREFIXES = ("transformer.decoder.bbox_embed.", "transformer.decoder.class_embed.")


@dataclasses.dataclass
class Recipe:
    """The architecture facts that decide whether weights fit a model (None: unknown)."""

    backbone: Optional[str] = None
    dilation: Optional[bool] = None
    num_feature_levels: Optional[int] = None
    with_box_refine: Optional[bool] = None
    two_stage: Optional[bool] = None
    hidden_dim: Optional[int] = None
    enc_layers: Optional[int] = None
    dec_layers: Optional[int] = None
    num_queries: Optional[int] = None
    num_classes: Optional[int] = None

    def name(self) -> str:
        """The official experiment name when the recipe is one of them, else a description."""
        standard = (
            self.backbone == "resnet50" and self.hidden_dim == 256 and self.enc_layers == 6 and self.dec_layers == 6
        )
        if standard:
            if self.num_feature_levels == 1 and not self.with_box_refine and not self.two_stage:
                return "r50_deformable_detr_single_scale_dc5" if self.dilation else "r50_deformable_detr_single_scale"
            if self.num_feature_levels == 4 and not self.dilation:
                if self.two_stage and self.with_box_refine:
                    return OFFICIAL_EXPERIMENTS[4]
                if self.with_box_refine and not self.two_stage:
                    return OFFICIAL_EXPERIMENTS[3]
                if not self.with_box_refine and not self.two_stage:
                    return OFFICIAL_EXPERIMENTS[0]
        return self.describe()

    def describe(self) -> str:
        parts = [
            f"{self.backbone or '?'}{' DC5' if self.dilation else ''}",
            f"{self.num_feature_levels} level{'s' if self.num_feature_levels != 1 else ''}",
            f"hidden {self.hidden_dim}",
            f"{self.enc_layers}+{self.dec_layers} layers",
            f"{self.num_queries} queries",
        ]
        if self.with_box_refine:
            parts.append("box refinement")
        if self.two_stage:
            parts.append("two-stage")
        return ", ".join(parts)


@dataclasses.dataclass
class LoadReport:
    """What ``load_weights`` did."""

    recipe: Recipe
    official: bool
    epoch: Optional[int]
    reinitialized: List[str]
    messages: List[str]


def read_checkpoint(path: str, key: str = "checkpoint") -> Dict[str, Any]:
    """Load a checkpoint file safely (``weights_only``; ``argparse.Namespace`` allowed for official files).
    Errors name the file as the config ``key`` that gave it (``checkpoint``, ``resume``, ``init_weights``).

    Returns a dict with at least ``model`` (a state_dict). A bare state_dict is wrapped.
    """
    if not os.path.isfile(path):
        raise MissingFileError(f"{key}={path} does not exist (or is not a file)")
    with open(path, "rb") as f:
        magic = f.read(4)
    # torch.save writes a zip archive; files of torch < 1.6 are a bare pickle (protocol byte 0x80)
    if magic != b"PK\x03\x04" and magic[:1] != b"\x80":
        raise CheckpointError(f"{key}={path} is not a readable PyTorch checkpoint (neither a torch.save archive nor a pickle)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{key}={path} holds objects that are not allowed in a safe load ({error}); "
            "it must be a PyTorch checkpoint of plain types and tensors"
        ) from error
    except Exception as error:  # truncated files, text files, other formats
        raise CheckpointError(f"{key}={path} is not a readable PyTorch checkpoint ({type(error).__name__}: {error})") from error
    if isinstance(checkpoint, Mapping) and "model" in checkpoint and isinstance(checkpoint["model"], Mapping):
        return dict(checkpoint)
    if isinstance(checkpoint, Mapping) and checkpoint and all(torch.is_tensor(v) for v in checkpoint.values()):
        return {"model": dict(checkpoint)}
    raise CheckpointError(f"{key}={path} is not a model checkpoint: expected a dict with a 'model' state_dict")


def is_official(checkpoint: Mapping[str, Any]) -> bool:
    return isinstance(checkpoint.get("args"), argparse.Namespace) or any(
        k.startswith("backbone.0.body.") for k in checkpoint["model"]
    )


def convert_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Official key names -> this framework's, dropping the decoder's repeated heads after checking them."""
    converted = {}
    for key, value in state_dict.items():
        if key.startswith(_TIED_PREFIXES):
            own = key[len("transformer.decoder.") :]
            if own not in state_dict or not torch.equal(state_dict[own], value):
                raise CheckpointError(f"official checkpoint key {key} should repeat {own}, but the values differ")
            continue
        if key.startswith("backbone.0."):
            key = "backbone." + key[len("backbone.0.") :]
        elif key.startswith("backbone.1."):
            key = "position_encoding." + key[len("backbone.1.") :]
        converted[key] = value
    return converted


def recipe_of_state_dict(state_dict: Mapping[str, torch.Tensor], hints: Optional[Mapping[str, Any]] = None) -> Recipe:
    """Read the architecture off this framework's state_dict keys and shapes; ``hints`` (e.g. the
    official ``args``) fill what keys cannot tell (DC5) and settle refinement."""
    hints = dict(hints or {})
    keys = set(state_dict)
    recipe = Recipe()
    if "transformer.level_embed" in state_dict:
        recipe.num_feature_levels, recipe.hidden_dim = state_dict["transformer.level_embed"].shape
    recipe.two_stage = "transformer.enc_output.weight" in keys
    recipe.enc_layers = _count(keys, "transformer.encoder.layers.")
    recipe.dec_layers = _count(keys, "transformer.decoder.layers.")
    if "query_embed.weight" in state_dict:
        recipe.num_queries = state_dict["query_embed.weight"].shape[0]
    if "class_embed.0.weight" in state_dict:
        recipe.num_classes = state_dict["class_embed.0.weight"].shape[0]
    recipe.backbone = _backbone_name(keys)
    if "with_box_refine" in hints:
        recipe.with_box_refine = bool(hints["with_box_refine"])
    elif "bbox_embed.1.layers.0.weight" in state_dict:
        # untied heads that trained apart; tied (shared) heads are equal everywhere
        recipe.with_box_refine = any(
            not torch.equal(state_dict[k], state_dict[k.replace("bbox_embed.1.", "bbox_embed.0.", 1)])
            for k in keys
            if k.startswith("bbox_embed.1.")
        )
    else:
        recipe.with_box_refine = False
    recipe.dilation = bool(hints["dilation"]) if "dilation" in hints else None
    if recipe.num_queries is None and "num_queries" in hints:
        recipe.num_queries = int(hints["num_queries"])
    return recipe


def recipe_of_model(model) -> Recipe:
    """The same facts, read off a built ``DeformableDETR``."""
    transformer = model.transformer
    return Recipe(
        backbone=getattr(model.backbone, "name", None),
        dilation=getattr(model.backbone, "dilation", None),
        num_feature_levels=transformer.num_feature_levels,
        with_box_refine=model.with_box_refine,
        two_stage=model.two_stage,
        hidden_dim=transformer.d_model,
        enc_layers=transformer.encoder.num_layers,
        dec_layers=transformer.decoder.num_layers,
        num_queries=model.num_queries,
        num_classes=model.num_classes,
    )


def load_weights(model, path: str, allow_new_classes: bool = True, checkpoint: Optional[Mapping[str, Any]] = None,
                 key: str = "checkpoint", class_rows: Optional[List[Tuple[int, int]]] = None) -> LoadReport:
    """Load the weights of ``path`` (official release file or this framework's checkpoint) into ``model``.

    The checkpoint must be of the model's recipe. Only the number of classes may differ, and only
    with ``allow_new_classes`` (fine-tuning on another dataset): the class heads then keep their
    fresh initialization and the report says so. ``class_rows`` [(checkpoint logit, model logit)]
    (fine-tuning into other categories, matched by name) re-initializes the class heads whatever
    their shapes and copies those rows of every class head. Anything else raises a ValueError
    naming the mismatch and the experiment the checkpoint fits; nothing is ever partially loaded
    in silence.
    """
    checkpoint = checkpoint if checkpoint is not None else read_checkpoint(path, key)
    official = is_official(checkpoint)
    state = convert_official_state_dict(checkpoint["model"]) if official else dict(checkpoint["model"])
    hints = vars(checkpoint["args"]) if isinstance(checkpoint.get("args"), argparse.Namespace) else checkpoint.get("recipe", {})
    found = recipe_of_state_dict(state, hints)
    wanted = recipe_of_model(model)

    mismatched = [
        f"{field.name}: checkpoint {getattr(found, field.name)}, model {getattr(wanted, field.name)}"
        for field in dataclasses.fields(Recipe)
        if field.name != "num_classes"
        and getattr(found, field.name) is not None
        and getattr(wanted, field.name) is not None
        and getattr(found, field.name) != getattr(wanted, field.name)
    ]
    if mismatched:
        fits = found.name()
        hint = f"experiment={fits}" if fits in OFFICIAL_EXPERIMENTS else "a model config with these settings"
        raise CheckpointError(
            f"{key}={path} does not fit this model ({'; '.join(mismatched)}). "
            f"The checkpoint is {fits} ({found.describe()}); the model is {wanted.name()}. Use {hint}."
        )

    model_state = model.state_dict()
    missing = sorted(set(model_state) - set(state))
    unexpected = sorted(set(state) - set(model_state))
    if missing or unexpected:
        raise CheckpointError(
            f"{key}={path} ({found.name()}) does not match the model's parameters: "
            f"missing {_preview(missing)}; unexpected {_preview(unexpected)}"
        )
    reinitialized, messages = [], []
    wrong_shape = [k for k in state if state[k].shape != model_state[k].shape]
    class_keys = [k for k in wrong_shape if k.startswith("class_embed.")]
    other = [k for k in wrong_shape if not k.startswith("class_embed.")]
    if other:
        detail = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(model_state[k].shape)}" for k in other[:5])
        raise CheckpointError(f"{key}={path} has tensors of other shapes than the model: {detail}")
    if class_rows is not None:
        class_keys = sorted(k for k in state if k.startswith("class_embed."))
    if class_keys:
        if not allow_new_classes:
            raise CheckpointError(
                f"{key}={path} predicts {found.num_classes} classes but the model {wanted.num_classes}; "
                "set the model's num_classes to match the checkpoint (COCO: 91)"
            )
        heads = {k: state.pop(k) for k in class_keys}
        reinitialized = class_keys
        if class_rows is not None:
            if class_rows:
                _copy_class_rows(model, heads, class_rows)
            messages.append(
                f"the class heads (class_embed.*) are re-initialized for the dataset's categories, {len(class_rows)} of "
                f"them copied from the checkpoint's categories of the same name; all else is loaded"
            )
        else:
            messages.append(
                f"checkpoint has {found.num_classes} classes and the model {wanted.num_classes}: "
                f"the class heads (class_embed.*) keep their fresh initialization for fine-tuning; all else is loaded"
            )
    result = model.load_state_dict(state, strict=not class_keys)
    leftover = [k for k in result.missing_keys if k not in reinitialized] + list(result.unexpected_keys)
    if leftover:
        raise CheckpointError(f"{key}={path}: could not load {_preview(leftover)}")
    epoch = checkpoint.get("epoch")
    return LoadReport(found, official, int(epoch) if isinstance(epoch, int) else None, reinitialized, messages)


def _count(keys, prefix: str) -> Optional[int]:
    indices = {int(k[len(prefix) :].split(".", 1)[0]) for k in keys if k.startswith(prefix)}
    return max(indices) + 1 if indices else None


def _backbone_name(keys) -> Optional[str]:
    blocks = _count(keys, "backbone.body.layer3.")
    if blocks is None:
        return None
    bottleneck = any(k.startswith("backbone.body.layer1.0.conv3.") for k in keys)
    names = {(True, 6): "resnet50", (True, 23): "resnet101", (True, 36): "resnet152", (False, 2): "resnet18", (False, 6): "resnet34"}
    return names.get((bottleneck, blocks), f"resnet with {blocks} layer3 blocks")


def _preview(keys: List[str], limit: int = 6) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _copy_class_rows(model, heads: Mapping[str, torch.Tensor], rows: List[Tuple[int, int]]) -> None:
    """Row ``source`` of each checkpoint class-head tensor (weight (K, C), bias (K,)) into row
    ``target`` of the model's same tensor; the model's other rows keep their initialization."""
    own = model.state_dict()
    sources = torch.tensor([s for s, _ in rows])
    targets = torch.tensor([t for _, t in rows])
    with torch.no_grad():
        for key, tensor in heads.items():
            if key in own and tensor.shape[1:] == own[key].shape[1:]:
                own[key][targets] = tensor[sources].to(own[key].dtype)

