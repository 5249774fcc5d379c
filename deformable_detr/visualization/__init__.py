"""Pictures of what the model sees and predicts: boxes with class names, deformable attention sampling points."""
from .boxes import draw_detections, render_detections
from .canvas import denormalize, tile, to_pil, to_tensor
from .sampling import draw_sampling, encoder_query_at, render_sampling, sampling_points
from .sampling_stats import sampling_statistics
from .snapshot import sampling_snapshot

__all__ = [
    "denormalize",
    "draw_detections",
    "draw_sampling",
    "encoder_query_at",
    "render_detections",
    "render_sampling",
    "sampling_points",
    "sampling_snapshot",
    "sampling_statistics",
    "tile",
    "to_pil",
    "to_tensor",
]
