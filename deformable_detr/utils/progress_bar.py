"""A progress bar on the terminal, or a few log lines when the output is not a terminal."""
import logging
import sys
import time
from typing import Optional, TextIO


class ProgressBar:
    """``[infer] 12/40 |#####.....| 3.1 img/s eta 0:09``, redrawn in place on a terminal.

    Elsewhere (a log file, a pipe) it logs a line at about every tenth of the way, so logs stay short.
    """

    def __init__(self, total: int, prefix: str = "", stream: Optional[TextIO] = None, logger: Optional[logging.Logger] = None, width: int = 30):
        self.total = max(1, total)
        self.prefix = prefix
        self.stream = stream or sys.stderr
        self.logger = logger or logging.getLogger(__name__)
        self.width = width
        self.done = 0
        self.start = time.perf_counter()
        self.interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._next_log = 0

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        remaining = int((self.total - self.done) / rate) if rate > 0 else 0
        filled = int(self.width * self.done / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        return f"{self.prefix} {self.done}/{self.total} |{bar}| {rate:.1f} img/s eta {remaining // 60}:{remaining % 60:02d}".strip()

    def update(self, count: int = 1) -> None:
        self.done = min(self.total, self.done + count)
        if self.interactive:
            self.stream.write("\r" + self.line())
            self.stream.flush()
        elif self.done >= self._next_log or self.done == self.total:
            self.logger.info(self.line())
            self._next_log = self.done + max(1, self.total // 10)

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()
