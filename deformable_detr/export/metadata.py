"""What an exported model carries to be used without this project: its categories, pre-processing and
post-processing, as {key: text} (ONNX ``metadata_props``, files of the same names in a ``.pt2`` archive).

The values of ``JSON_KEYS`` are JSON, the others plain text. Legend: N batch, Q queries, C logits.
"""
import json
import zipfile
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..utils.category_layout import CategoryLayout

FORMAT_VERSION = "1"
KEYS = ("format_version", "recipe", "input", "resize", "mean", "std", "categories", "top_k", "outputs")
JSON_KEYS = ("resize", "mean", "std", "categories", "top_k")

INPUT = (
    "images float32 (N, 3, H, W): RGB, all images of a batch of one size, unpadded. Each image is resized as at "
    "evaluation: s = resize.shorter_side; if max(w, h) / min(w, h) * s > resize.max_size then "
    "s = round(resize.max_size * min(w, h) / max(w, h)); unless the shorter side already is s, it becomes s and the "
    "longer side int(s * longer / shorter) (truncated), with PIL's bilinear filter. Then pixels / 255 and "
    "(x - mean) / std per channel."
)
OUTPUTS = (
    "logits float32 (N, Q, C) before the sigmoid; logit k is the category of categories whose logit is k. "
    "boxes float32 (N, Q, 4) (cx, cy, w, h) normalized to [0, 1] of the image. Post-processing: scores = "
    "sigmoid(logits) at the logits of categories only; the top_k (query, category) pairs by score over "
    "Q x categories; each its query's box as (cx - w/2, cy - h/2, cx + w/2, cy + h/2) times the original "
    "image's (width, height, width, height): xyxy in original pixels."
)


def logit_categories(categories: Optional[Sequence[Mapping[str, Any]]], layout: CategoryLayout, restrict: bool = True) -> List[Dict[str, Any]]:
    """[{"id", "name", "logit"}] in logit order: the logits the post-processing ranks.

    Those of ``categories`` [{"id", "name"}] when ``restrict`` (as evaluation selects); every logit
    when the categories are unknown or not ``restrict`` (named by id where no category names it).
    """
    if restrict and categories is not None:
        return [{"id": int(c["id"]), "name": str(c["name"]), "logit": int(c["logit"])} for c in layout.categories_by_logit(categories)]
    names = {int(c["id"]): str(c["name"]) for c in categories or []}
    ids = layout.logit_ids if layout.logit_ids is not None else range(layout.num_logits)
    return [{"id": int(i), "name": names.get(int(i), str(i)), "logit": logit} for logit, i in enumerate(ids)]


def export_metadata(recipe: str, categories: Sequence[Mapping[str, Any]], size: int, max_size: int, top_k: int = 100) -> Dict[str, str]:
    """{key: text} of a model of ``categories`` [{"id", "name", "logit"}] (logit order), evaluated at
    shorter side ``size``, longer at most ``max_size``, keeping the ``top_k`` best detections."""
    values = {
        "resize": {"shorter_side": int(size), "max_size": int(max_size), "interpolation": "bilinear"},
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "categories": [{"id": int(c["id"]), "name": str(c["name"]), "logit": int(c["logit"])} for c in categories],
        "top_k": int(top_k),
    }
    texts = {"format_version": FORMAT_VERSION, "recipe": str(recipe), "input": INPUT, "outputs": OUTPUTS}
    texts.update({key: json.dumps(value) for key, value in values.items()})
    return {key: texts[key] for key in KEYS}


def detector_metadata(detector) -> Dict[str, str]:
    """The metadata of an ``inference.Detector``'s model: its recipe, categories, resize and top-k."""
    categories = logit_categories(detector.categories, detector.layout, detector.restrict_to_categories)
    return export_metadata(detector.name, categories, detector.eval_size, detector.eval_max_size, detector.num_select)


def decode_metadata(texts: Mapping[str, str]) -> Dict[str, Any]:
    """{key: text} -> {key: value}, the ``JSON_KEYS`` decoded."""
    return {key: json.loads(text) if key in JSON_KEYS else text for key, text in texts.items()}


def read_metadata(path: str) -> Dict[str, Any]:
    """The metadata of an exported model: ``model.onnx`` or ``model.pt2`` (a zip archive), JSON values decoded."""
    if zipfile.is_zipfile(path):
        from .program import read_extra_files

        return decode_metadata(read_extra_files(path, KEYS))
    from .onnx_model import read_onnx_metadata

    return decode_metadata(read_onnx_metadata(path))
