"""The 80 COCO 2017 detection categories, by their (non-contiguous) ids 1..90.

Official checkpoints predict 91 logits indexed by COCO category id; the ids missing here
(0, 12, 26, 29, 30, 45, 66, 68, 69, 71, 83) are never labels of the dataset.
"""
from typing import Dict, List

_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", None, "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", None, "backpack", "umbrella", None, None,
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", None, "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", None, "dining table", None, None, "toilet",
    None, "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster",
    "sink", "refrigerator", None, "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

COCO_CATEGORIES: List[Dict[str, object]] = [{"id": i + 1, "name": name} for i, name in enumerate(_NAMES) if name is not None]
