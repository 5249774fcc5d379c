"""Comparing an exported detector with the PyTorch one on the same images, and timing both.

Legend: N batch, Q queries, K classes.
"""
import dataclasses
import statistics
import time
from typing import Callable, Dict, Iterable, Tuple

import torch

from .detection_match import DetectionMatch, match_detections, top_detections

Detector = Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


@dataclasses.dataclass
class Verification:
    """Largest absolute differences of the raw outputs and the share of top-k detections that match."""

    images: int
    max_logit_difference: float
    max_box_difference: float
    match: DetectionMatch

    def passed(self, min_match: float) -> bool:
        return self.match.fraction >= min_match

    def summary(self) -> str:
        return (
            f"{self.images} images: max |logits difference| {self.max_logit_difference:.3g}, "
            f"max |boxes difference| {self.max_box_difference:.3g}, "
            f"top-100 detections matched {self.match.matched}/{self.match.total} ({100 * self.match.fraction:.2f}%)"
        )


@torch.no_grad()
def verify(
    reference: Detector, candidate: Detector, batches: Iterable[torch.Tensor], k: int = 100, min_iou: float = 0.99, score_tolerance: float = 1e-3
) -> Verification:
    """Runs both detectors (images (N, 3, H, W) -> logits (N, Q, K), boxes (N, Q, 4)) on every batch.

    A detection of the reference's top-k matches one of the candidate's with the same class, box
    IoU >= ``min_iou`` and score within ``score_tolerance`` (see ``match_detections``).
    """
    images = 0
    logit_difference = box_difference = 0.0
    matched = total = 0
    for batch in batches:
        ref_logits, ref_boxes = (t.float().cpu() for t in reference(batch))
        cand_logits, cand_boxes = (t.float().cpu() for t in candidate(batch))
        if ref_logits.shape != cand_logits.shape or ref_boxes.shape != cand_boxes.shape:
            raise ValueError(
                f"output shapes differ: logits {tuple(ref_logits.shape)} vs {tuple(cand_logits.shape)}, "
                f"boxes {tuple(ref_boxes.shape)} vs {tuple(cand_boxes.shape)}"
            )
        images += batch.shape[0]
        logit_difference = max(logit_difference, (ref_logits - cand_logits).abs().max().item())
        box_difference = max(box_difference, (ref_boxes - cand_boxes).abs().max().item())
        match = match_detections(top_detections(ref_logits, ref_boxes, k), top_detections(cand_logits, cand_boxes, k), min_iou, score_tolerance)
        matched, total = matched + match.matched, total + match.total
    return Verification(images, logit_difference, box_difference, DetectionMatch(matched, total))


@torch.no_grad()
def latencies(detectors: Dict[str, Detector], images: torch.Tensor, runs: int = 5) -> Dict[str, float]:
    """Median seconds per call of each detector on ``images`` over ``runs`` calls, after one untimed
    warm-up call each. The detectors take turns, so that a load that comes and goes on the machine
    weighs on all of them alike."""
    for detector in detectors.values():
        detector(images)
    times = {name: [] for name in detectors}
    for _ in range(max(1, runs)):
        for name, detector in detectors.items():
            start = time.perf_counter()
            detector(images)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
