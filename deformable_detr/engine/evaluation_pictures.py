"""TensorBoard pictures of an evaluation: validation images with their ground truth and predictions."""
from typing import Dict, List, Tuple

import torch

from ..utils.box_ops import box_cxcywh_to_xyxy
from ..visualization import denormalize, draw_detections, sampling_snapshot

# one kept image on the CPU: image (3, H, W), padding mask (H, W), its target and its prediction
Picture = Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor], Dict[str, torch.Tensor]]


class EvaluationPictures:
    """Keeps the first ``count`` images of an evaluation (``collect``, the evaluation loop's
    ``on_batch``) and draws them to ``writer`` (``write``).

    Args:
        writer: a TensorBoard SummaryWriter.
        count: images drawn per evaluation.
        score_threshold: the drawn predictions' lowest score.
        coco: the validation set's pycocotools ground truth, for the category names.
        layout: the dataset's ``CategoryLayout`` (None: logit indices are category ids).
        model: the evaluated detector (unwrapped), whose sampling points the first picture shows.
    """

    def __init__(self, writer, count: int, score_threshold: float, coco, layout, model: torch.nn.Module):
        self.writer, self.count, self.score_threshold = writer, count, score_threshold
        self.layout, self.model = layout, model
        self.names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
        self.kept: List[Picture] = []

    def start(self) -> None:
        """Forget the previous evaluation's images."""
        self.kept = []

    def collect(self, images: torch.Tensor, masks: torch.Tensor, targets: List[Dict], results: List[Dict]) -> None:
        """One evaluated batch: images (B, 3, H, W), masks (B, H, W), per image its target and its
        postprocessed result (``boxes`` (N, 4) xyxy in original pixels, ``scores``, ``labels``)."""
        for image, mask, target, result in zip(images, masks, targets, results):
            if len(self.kept) >= self.count:
                return
            self.kept.append((image.cpu(), mask.cpu(), {k: v.cpu() for k, v in target.items()}, {k: v.cpu() for k, v in result.items()}))

    def write(self, step: int) -> None:
        for index, picture in enumerate(self.kept):
            self._draw(index, *picture, step)

    def _draw(self, index: int, image, mask, target, result, step: int) -> None:
        """The unpadded image with the ground truth and the predictions above ``score_threshold``,
        labelled by category; for the first image also the sampling points of its best query."""
        picture = denormalize(image, mask)  # (3, h, w) in [0, 1]
        h, w = picture.shape[-2:]
        orig_h, orig_w = target["orig_size"].tolist()
        keep = result["scores"] > self.score_threshold
        boxes = result["boxes"][keep] * torch.tensor([w / orig_w, h / orig_h, w / orig_w, h / orig_h])
        truth = box_cxcywh_to_xyxy(target["boxes"]) * torch.tensor([w, h, w, h])  # targets: cxcywh fractions
        # targets carry the model's logit indices, predictions category ids
        truth_labels = self.layout.ids_of(target["labels"]) if self.layout is not None else target["labels"]
        drawn = draw_detections(picture, boxes, result["labels"][keep], result["scores"][keep], self.names,
                                gt_boxes=truth, gt_labels=truth_labels)
        self.writer.add_image(f"val/predictions_{index}", drawn, step)
        if index == 0:
            self.writer.add_image("val/sampling_points_0", sampling_snapshot(self.model, image, mask, names=self._logit_names()), step)

    def _logit_names(self) -> Dict[int, str]:
        """Category names by the model's logit index."""
        if self.layout is None:
            return self.names
        return {self.layout.logit_index(i): n for i, n in self.names.items() if self.layout.logit_index(i) is not None}
