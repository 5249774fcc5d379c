"""Evaluation of detection results."""
from .coco_evaluator import STAT_NAMES, CocoEvaluation, CocoEvaluator, evaluate_coco, merge_gathered

__all__ = ["STAT_NAMES", "CocoEvaluation", "CocoEvaluator", "evaluate_coco", "merge_gathered"]
