"""The Python API: a checkpoint ready to detect objects in images.

    from deformable_detr import Detector
    detector = Detector.from_checkpoint("checkpoint_best.pth", device="cpu")   # or an official release file
    result = detector.predict(Image.open("photo.jpg"), score_threshold=0.3)    # or a list of images
    result.boxes, result.scores, result.labels, result.names                  # xyxy in original pixels

Preprocessing, model and post-processing are evaluation's (``tools/eval.py``): the recipe's
evaluation resize (shorter side 800, longer at most 1333 for the official recipes) and ImageNet
normalization, the top-k (query, class) pairs by sigmoid score, boxes scaled to the original
image. Labels are the dataset's category ids (for official files the 80 COCO ids).
"""
import dataclasses
import random
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..data.collate import pad_images
from ..data.transforms import EVAL_MAX_SIZE, EVAL_SIZE, make_eval_transforms
from ..engine.compilation import check_compiler, compile_detector
from ..engine.precision import autocast
from ..errors import ConfigError
from ..models.category_mask import keep_categories
from ..models.postprocess import PostProcess
from ..utils.category_layout import CategoryLayout
from ..utils.devices import resolve_device
from .checkpoint_recipe import CheckpointRecipe, read_recipe
from .images import as_rgb_image

PRECISIONS = {None: None, "fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
              "fp16": torch.float16, "float16": torch.float16}


@dataclasses.dataclass
class Detections:
    """The detections of one image, best first.

    boxes: (K, 4) float32 (x0, y0, x1, y1) in the original image's pixels; scores: (K,) in [0, 1];
    labels: (K,) int64 category ids; names: K category names (the id as text when the checkpoint
    does not name its categories); image_size: (height, width) of the original image.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    names: List[str]
    image_size: Tuple[int, int]

    def __len__(self) -> int:
        return len(self.scores)

    def to_coco(self, image_id: int) -> List[Dict[str, Any]]:
        """COCO results format: {image_id, category_id, bbox [x, y, w, h], score} per detection."""
        return [
            {"image_id": int(image_id), "category_id": int(label),
             "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)}
            for (x0, y0, x1, y1), score, label in zip(self.boxes.tolist(), self.scores.tolist(), self.labels.tolist())
        ]


def precision_dtype(precision: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    """The autocast dtype of ``precision`` (None, "fp32": none; "bf16", "fp16" or the torch dtype)."""
    if precision in (torch.bfloat16, torch.float16):
        return precision
    if precision == torch.float32:
        return None
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision} is not one of fp32 (or None), bf16, fp16")
    return PRECISIONS[precision]


class Detector:
    """A detector in evaluation mode with its preprocessing, categories and post-processing.

    Args:
        model: a ``DeformableDETR`` (outputs ``pred_logits`` (B, Q, K), ``pred_boxes`` (B, Q, 4)).
        categories: [{"id", "name"}] the model predicts, or None (labels are then class indices).
        eval_size, eval_max_size: the evaluation resize (shorter side, longest side at most).
        device: "auto", "cpu", "cuda", "cuda:N" or a torch.device.
        precision: None (float32), "bf16" or "fp16" autocast.
        num_select: detections per image before the score threshold (the top-k over queries x classes).
        restrict_to_categories: rank only the ``categories``' logits (True), or every logit as the
            official code does (False).
        name: the recipe, for messages. checkpoint: the recipe it was read from, if any.
        layout: which logit is which category (default: the logit index is the category id).
    """

    def __init__(self, model: torch.nn.Module, categories: Optional[Sequence[Dict[str, Any]]] = None, *,
                 eval_size: int = EVAL_SIZE, eval_max_size: int = EVAL_MAX_SIZE, device="auto",
                 precision: Union[None, str, torch.dtype] = None, num_select: int = 100,
                 restrict_to_categories: bool = True, name: str = "model",
                 checkpoint: Optional[CheckpointRecipe] = None, layout: Optional[CategoryLayout] = None):
        if num_select < 1:
            raise ConfigError(f"num_select={num_select} must be at least 1")
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.categories = [dict(c) for c in categories] if categories is not None else None
        self.eval_size, self.eval_max_size = int(eval_size), int(eval_max_size)
        self.transforms = make_eval_transforms(self.eval_size, self.eval_max_size)
        self.precision = precision_dtype(precision)
        self.num_select = num_select
        self.restrict_to_categories = restrict_to_categories and self.categories is not None
        self.name = name
        self.checkpoint = checkpoint
        self.layout = layout or CategoryLayout(getattr(model, "num_classes", 0) or 0)
        self._forward_model = self.model

    @classmethod
    def from_checkpoint(cls, path: str, device="auto", *, experiment: Optional[str] = None,
                        precision: Union[None, str, torch.dtype] = None, compile: bool = False, num_select: int = 100,
                        restrict_to_categories: bool = True, model_overrides: Optional[Dict[str, Any]] = None) -> "Detector":
        """A detector from this framework's checkpoint or an official release file.

        The recipe is the one the file records (its saved config, or for an official file the
        official experiment recognized from its keys and ``args``); ``experiment`` names another
        (needed for a bare state_dict), ``model_overrides`` changes dotted model keys
        (``{"transformer.dropout": 0.0}``). ``compile``: ``torch.compile`` the model (the first
        images compile; image sizes are dynamic). Errors (a missing or unreadable file, weights of
        another recipe) are ``deformable_detr.errors.UserError``s naming the file and the fix.
        """
        recipe = read_recipe(path, experiment=experiment, model_overrides=model_overrides)
        return cls.from_recipe(recipe, device, precision=precision, compile=compile, num_select=num_select,
                               restrict_to_categories=restrict_to_categories)

    @classmethod
    def from_recipe(cls, recipe: CheckpointRecipe, device="auto", *, precision: Union[None, str, torch.dtype] = None,
                    compile: bool = False, num_select: int = 100, restrict_to_categories: bool = True,
                    eval_size: Optional[int] = None, eval_max_size: Optional[int] = None) -> "Detector":
        """A detector of a checkpoint already read (``read_recipe``); ``eval_size``, ``eval_max_size``
        replace the recipe's evaluation resize. Other arguments as ``from_checkpoint``."""
        device = resolve_device(device)
        model, _ = recipe.build_model(device)
        detector = cls(model, recipe.categories, eval_size=eval_size or recipe.eval_size,
                       eval_max_size=eval_max_size or recipe.eval_max_size, device=device, precision=precision,
                       num_select=num_select, restrict_to_categories=restrict_to_categories, name=recipe.name,
                       checkpoint=recipe, layout=recipe.layout)
        return detector.compile() if compile else detector

    # ------------------------------------------------------------------ properties
    @property
    def names(self) -> Dict[int, str]:
        """Category id -> name ({} when the categories are unknown)."""
        return {int(c["id"]): str(c["name"]) for c in self.categories or []}

    @property
    def category_ids(self) -> Optional[List[int]]:
        return [int(c["id"]) for c in self.categories] if self.categories is not None else None

    @property
    def forward_model(self) -> torch.nn.Module:
        """The module ``forward`` calls: ``model``, or its ``torch.compile`` wrapper after ``compile()``."""
        return self._forward_model

    def compile(self) -> "Detector":
        """Run the model through ``torch.compile`` from now on (dynamic image sizes); returns self."""
        check_compiler(self.device)
        self._forward_model = compile_detector(self.model)
        return self

    # ------------------------------------------------------------------ the three steps
    def preprocess(self, images: Sequence[Any]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images (see ``predict``) -> a padded batch (B, 3, H, W) normalized, its padding mask
        (B, H, W) True on padding, and the original sizes (B, 2) int64 (height, width)."""
        tensors, sizes = [], []
        for image in images:
            picture = as_rgb_image(image)
            # evaluation transforms draw nothing at random; the generator only satisfies the interface
            tensor, _ = self.transforms(picture, {}, random.Random(0))
            tensors.append(tensor)
            sizes.append((picture.height, picture.width))
        batch, masks = pad_images(tensors)
        return batch, masks, torch.tensor(sizes, dtype=torch.int64)

    @torch.no_grad()
    def forward(self, batch: torch.Tensor, masks: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The model's ``pred_logits`` (B, Q, K) and ``pred_boxes`` (B, Q, 4) in float32 on a padded
        batch; with ``restrict_to_categories`` the logits of ids that are no category are -inf."""
        with autocast(self.device, self.precision):
            outputs = self._forward_model(batch.to(self.device), masks.to(self.device))
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        if self.restrict_to_categories:
            logits = keep_categories(logits, self.layout.logit_indices(self.category_ids))
        return {"pred_logits": logits, "pred_boxes": boxes}

    def postprocess(self, outputs: Dict[str, torch.Tensor], sizes: torch.Tensor, score_threshold: float = 0.3,
                    top_k: Optional[int] = None) -> List[Detections]:
        """``forward``'s outputs and the original sizes (B, 2) -> one ``Detections`` per image: the
        ``top_k`` (default ``num_select``) best (query, class) pairs scoring above ``score_threshold``."""
        top_k = self.num_select if top_k is None else int(top_k)
        if top_k < 1:
            raise ConfigError(f"top_k={top_k} must be at least 1")
        select = PostProcess(top_k, self.restrict_to_categories, self.category_ids if self.restrict_to_categories else None,
                             logit_ids=self.layout.logit_ids)
        names = self.names
        results = []
        for size, result in zip(sizes.tolist(), select(outputs, sizes.to(outputs["pred_boxes"].device))):
            keep = result["scores"] > score_threshold
            labels = result["labels"][keep].cpu()
            results.append(Detections(
                boxes=result["boxes"][keep].float().cpu(), scores=result["scores"][keep].float().cpu(), labels=labels,
                names=[names.get(int(label), str(int(label))) for label in labels.tolist()], image_size=tuple(size),
            ))
        return results

    def predict(self, images: Any, score_threshold: float = 0.3, top_k: Optional[int] = None,
                batch_size: int = 4) -> Union[Detections, List[Detections]]:
        """Detect objects in one image or a list of images.

        Args:
            images: a PIL image, a path (EXIF orientation applied), an (H, W, 3) uint8 RGB numpy
                array or tensor, or a list of them (also an (N, H, W, 3) array or tensor).
            score_threshold: keep detections scoring above it (0 keeps all ``top_k``).
            top_k: detections per image before the threshold (default ``num_select``, 100).
            batch_size: images per forward pass; a batch pads its images to the largest, as
                evaluation does, which can change scores in the last digits.
        Returns:
            One ``Detections`` for one image, a list of them for a list.
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be at least 1")
        single = not isinstance(images, (list, tuple)) and not (
            isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4)
        items = [images] if single else list(images)
        results: List[Detections] = []
        for start in range(0, len(items), batch_size):
            batch, masks, sizes = self.preprocess(items[start:start + batch_size])
            results += self.postprocess(self.forward(batch, masks), sizes, score_threshold, top_k)
        return results[0] if single else results

    def __repr__(self) -> str:
        categories = f"{len(self.categories)} categories" if self.categories is not None else "categories unknown"
        precision = {None: "float32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.precision]
        return (f"Detector({self.name}, {categories}, resize {self.eval_size}/{self.eval_max_size}, "
                f"{self.device}, {precision})")
