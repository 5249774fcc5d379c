"""tools/train.py whose training step fails once, at step ``DDETR_FAIL_AT_STEP``, in the first
attempt of a torchrun job (a marker file remembers the failure), to test elastic restarts.
Run it with tools/ on PYTHONPATH, as the tool's own directory is when it runs as a script."""
import os
import runpy
import sys

from deformable_detr.engine.train_step import TrainStep

FAIL_AT = int(os.environ["DDETR_FAIL_AT_STEP"])
MARKER = os.environ["DDETR_FAIL_MARKER"]
original = TrainStep.accumulate


def failing_once(self, micro_batches):
    failing_once.calls += 1
    if failing_once.calls == FAIL_AT and not os.path.exists(MARKER):
        open(MARKER, "w").close()
        raise RuntimeError(f"injected failure at step {FAIL_AT}")
    return original(self, micro_batches)


failing_once.calls = 0
TrainStep.accumulate = failing_once
TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "train.py")
sys.argv[0] = TOOL
runpy.run_path(TOOL, run_name="__main__")
