"""Smoothed training metrics and a text progress line with ETA and throughput."""
import collections
import datetime
import time
from typing import Deque, Dict, Optional


class SmoothedValue:
    """A running window median/average plus the global average of a scalar series."""

    def __init__(self, window: int = 20):
        self.values: Deque[float] = collections.deque(maxlen=window)
        self.total = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.values.append(value)
        self.total += value * n
        self.count += n

    @property
    def median(self) -> float:
        ordered = sorted(self.values)
        return ordered[len(ordered) // 2] if ordered else 0.0

    @property
    def average(self) -> float:
        return self.total / max(1, self.count)


class ProgressMeter:
    """Tracks metrics over an epoch and formats ``[epoch 3] 120/500 eta 0:04:10 12.3 img/s loss 4.21 ...``."""

    def __init__(self, total_steps: int, prefix: str = "", window: int = 20):
        self.total_steps = total_steps
        self.prefix = prefix
        self.window = window
        self.meters: Dict[str, SmoothedValue] = collections.defaultdict(lambda: SmoothedValue(window))
        self.step_time = SmoothedValue(window)
        self.images = SmoothedValue(window)
        self.start = time.perf_counter()
        self._last: Optional[float] = self.start

    def update(self, images: int, **values: float) -> None:
        now = time.perf_counter()
        self.step_time.update(now - self._last)
        self.images.update(images)
        self._last = now
        for name, value in values.items():
            self.meters[name].update(float(value))

    def images_per_second(self) -> float:
        elapsed = sum(self.step_time.values)
        return sum(self.images.values) / elapsed if elapsed > 0 else 0.0

    def line(self, step: int, keys=None) -> str:
        remaining = max(0, self.total_steps - step) * (self.step_time.average if self.step_time.count else 0.0)
        eta = datetime.timedelta(seconds=int(remaining))
        metrics = " ".join(f"{k} {self.meters[k].median:.4g}" for k in (keys or self.meters))
        return f"{self.prefix} {step}/{self.total_steps} eta {eta} {self.images_per_second():.1f} img/s {metrics}".strip()

    def averages(self) -> Dict[str, float]:
        return {name: meter.average for name, meter in self.meters.items()}
