"""The progress line of a training run (or a bar on a terminal): the epoch's and the whole run's
remaining time, throughput, memory, the loss and each of its weighted terms."""
import datetime
import logging
import math
import sys
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from ..utils import distributed
from ..utils.memory import peak_memory_mib
from ..utils.metric_logger import ProgressMeter
from .train_step import StepResult

logger = logging.getLogger(__name__)

# shown after the loss terms: the criterion's logged metric and the optimization's own values
TRAILING_KEYS = ("class_error", "grad_norm", "lr")


def headline_terms(names: Iterable[str]) -> List[str]:
    """The final layer's loss terms among ``names`` (e.g. a criterion's weighted terms), in their
    order: a name that is another of them plus a ``_suffix`` is an auxiliary copy (an earlier
    decoder layer's ``loss_ce_0``, the proposals' ``loss_ce_enc``) and is left out, so the line
    stays readable however many layers a model has."""
    names = list(names)
    present = set(names)
    return [name for name in names if name.rpartition("_")[0] not in present]


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


class TrainingProgress:
    """Reports the steps of a run of ``total_steps`` steps (``steps_per_epoch`` per epoch).

    After the first step, every ``log_every`` steps and at an epoch's end the main process logs a line such as
    ``[epoch 3] 120/200 eta 0:01:10 (run 0:12:40) 9.8 img/s max_mem 2,310 MiB loss 4.21 loss_ce 0.61 ...``
    (``max_mem``: the peak memory so far, GPU memory allocated or the process's resident set). On a
    terminal a progress bar shows the same. The run's remaining time counts the remaining steps at the
    recent step time plus the evaluations still to come at the duration of the last one (``evaluation_seconds``).

    The line shows ``loss``, then each of ``loss_terms`` the steps report (default: their ``loss_*``
    values, auxiliary copies left out; see ``headline_terms``), then ``class_error``, ``grad_norm``
    and ``lr``: the medians of this process's recent steps.
    """

    def __init__(self, total_steps: int, steps_per_epoch: int, *, log_every: int = 20, bar: Optional[bool] = None,
                 device: Optional[torch.device] = None, loss_terms: Optional[Sequence[str]] = None):
        self.total_steps, self.steps_per_epoch, self.log_every = total_steps, steps_per_epoch, log_every
        self.device = device or torch.device("cpu")
        self.loss_terms = None if loss_terms is None else list(loss_terms)
        main = distributed.is_main_process()
        self.bar_enabled = main and (sys.stderr.isatty() if bar is None else bar)
        self.evaluation_seconds = 0.0
        self.remaining_evaluations = 0
        self.meter: Optional[ProgressMeter] = None
        self._bar = None
        self.reported_a_step = False

    def start_epoch(self, epoch: int, epoch_step: int) -> None:
        self.meter = ProgressMeter(self.steps_per_epoch, prefix=f"[epoch {epoch}]")
        if self.bar_enabled:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(total=self.steps_per_epoch, initial=epoch_step, desc=f"epoch {epoch}", unit="step", dynamic_ncols=True, leave=False)
            # console log lines are printed above the bar instead of through it
            self._redirect = logging_redirect_tqdm([logging.getLogger()])
            self._redirect.__enter__()

    def update(self, result: StepResult, step: int, epoch_step: int, optimizer: torch.optim.Optimizer) -> Optional[Dict[str, float]]:
        """After a step: ``step`` steps done in the run, ``epoch_step`` in the epoch. Returns the
        step's values (this process's, with ``lr``) when the step is reported, on every process
        alike, else None."""
        if self._bar is not None:
            self._bar.update(1)
        if result.skipped:
            return None
        # one host sync per step: stack every value and read them together
        names = sorted(result.values)
        values = dict(zip(names, torch.stack([result.values[k].float() for k in names]).tolist()))
        values["lr"] = optimizer.param_groups[0]["lr"]
        if not math.isfinite(values.get("grad_norm", 0.0)):
            # fp16's GradScaler skipped the step (its gradients overflowed): the norm would make the epoch's average inf or NaN
            del values["grad_norm"]
        self.meter.update(result.images * distributed.get_world_size(), **values)
        # the first step this process trains is reported at once: a run shows it is alive
        first, self.reported_a_step = not self.reported_a_step, True
        if epoch_step % self.log_every and epoch_step != self.steps_per_epoch and not first:
            return None
        if distributed.is_main_process():
            logger.info(self.line(step, epoch_step))
        return values

    def keys(self) -> List[str]:
        """What the line shows, in its order, of the values reported so far this epoch."""
        terms = self.loss_terms
        if terms is None:
            terms = headline_terms(k for k in self.meter.meters if k.startswith("loss_"))
        return [k for k in ["loss", *terms, *TRAILING_KEYS] if k in self.meter.meters]

    def line(self, step: int, epoch_step: int) -> str:
        step_seconds = self.meter.step_time.average if self.meter.step_time.count else 0.0
        epoch_left = (self.steps_per_epoch - epoch_step) * step_seconds
        run_left = (self.total_steps - step) * step_seconds + self.remaining_evaluations * self.evaluation_seconds
        metrics = " ".join(f"{k} {self.meter.meters[k].median:.4g}" for k in self.keys())
        return (f"{self.meter.prefix} {epoch_step}/{self.steps_per_epoch} eta {_duration(epoch_left)} (run {_duration(run_left)}) "
                f"{self.meter.images_per_second():.1f} img/s max_mem {peak_memory_mib(self.device):,.0f} MiB {metrics}")

    def end_epoch(self) -> Dict[str, float]:
        """The epoch's averages of every reported value."""
        self.close_bar()
        return self.meter.averages()

    def close_bar(self) -> None:
        """Remove the progress bar, if one is drawn (console log lines go straight out again)."""
        if self._bar is not None:
            self._bar.close()
            self._redirect.__exit__(None, None, None)
            self._bar = None
