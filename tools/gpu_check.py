#!/usr/bin/env python
"""Everything worth knowing from a GPU, in one call: build, CUDA tests, op and model timings, a short run.

    bash scripts/gpu_check.sh --output DIR          # or: python tools/gpu_check.py --output DIR

Stages, in order of importance, each in subprocesses with its own time limit, all within
``--budget`` seconds (a stage that would not fit is skipped and says so):

    environment  the GPU, driver, torch, CUDA, Triton and nvcc versions; which packages are missing
    build        the op's CPU and CUDA kernels, in place, for this GPU's architecture only
    tests        the CUDA tests (tests/test_ops_cuda.py, tests/test_ops_triton.py, tests/test_cuda_model.py)
    op           tools/benchmark_op.py on CUDA: reference, CUDA kernel, Triton; float32, and a bfloat16
                 value with float32 locations and weights (autocast); encoder (batch 2) and decoder
                 layers; forward and backward device time (CUDA events)
    step         tools/benchmark.py: the r50_deformable_detr training step, float32 and bf16 autocast
                 (CUDA kernel), bf16 with the Triton op
    train        tools/train.py: one epoch of the default recipe (200 steps of 4 images) and its evaluation
    compiled     tools/benchmark.py: the r50 training step under torch.compile, bf16

Writes ``gpu_check.json`` (every result, rewritten after each stage so a killed run keeps what it
finished) and ``gpu_check.md`` (the short table also printed at the end) into ``--output``, with
each stage's full log beside them. Needs no network. Without a visible GPU it prints one line and
exits 2; otherwise it exits 0 when every stage that ran passed, 1 when one failed.
"""
import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("environment", "build", "tests", "op", "step", "train", "compiled")
# seconds each stage may take at most (the budget may cut them shorter)
STAGE_LIMITS = {"environment": 60, "build": 240, "tests": 180, "op": 150, "step": 180, "train": 200, "compiled": 240}
# packages the stages after the build import (the environment stage lists the missing ones)
PACKAGES = ("torch", "triton", "numpy", "scipy", "PIL", "hydra", "omegaconf", "pycocotools", "tensorboard", "pytest")
TEST_FILES = ("tests/test_ops_cuda.py", "tests/test_ops_triton.py", "tests/test_cuda_model.py")
NO_GPU_EXIT = 2


# ---------------------------------------------------------------- arguments and results

def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Stages: " + ", ".join(STAGES), prog="gpu_check")
    parser.add_argument("--output", default=None,
                        help="directory for gpu_check.json, gpu_check.md and the logs (default: outputs/gpu_check/TIME)")
    parser.add_argument("--budget", type=float, default=470.0, help="seconds for all stages together (default: 470)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), metavar="STAGE",
                        help=f"stages to run, in the fixed order (default: all of {', '.join(STAGES)})")
    parser.add_argument("--skip-build", action="store_true", help="use the op as already built or installed")
    args = parser.parse_args(argv)
    unknown = [stage for stage in args.stages if stage not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    if args.budget <= 0:
        parser.error(f"--budget must be positive, got {args.budget}")
    if args.skip_build:
        args.stages = [stage for stage in args.stages if stage != "build"]
    args.stages = [stage for stage in STAGES if stage in args.stages]
    if args.output is None:
        args.output = os.path.join(ROOT, "outputs", "gpu_check", datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    return args


def write_json_atomic(path: str, content) -> None:
    """``content`` as JSON at ``path`` through a temporary file: a reader sees the old or the new file."""
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        json.dump(content, f, indent=1, sort_keys=False, default=str)
    os.replace(temporary, path)


def gpu_visible() -> Optional[str]:
    """The name of the first visible CUDA GPU, or None."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0)


class Check:
    """Runs the stages and keeps their results in ``report``, rewritten to disk after each."""

    def __init__(self, output: str, budget: float, clock: Callable[[], float] = time.monotonic):
        self.output = os.path.abspath(output)
        os.makedirs(self.output, exist_ok=True)
        self.clock = clock
        self.deadline = clock() + budget
        self.environment = dict(os.environ)
        self.report: Dict = {"created": datetime.datetime.now().isoformat(timespec="seconds"),
                             "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
                             "budget_seconds": budget, "stages": {}}

    def remaining(self) -> float:
        return self.deadline - self.clock()

    def save(self) -> None:
        write_json_atomic(os.path.join(self.output, "gpu_check.json"), self.report)

    def run(self, name: str, command: List[str], limit: float, environment: Optional[Dict[str, str]] = None) -> Dict:
        """Runs ``command`` (a subprocess in the repository root) for stage ``name`` within ``limit``
        seconds and what is left of the budget; logs to ``name.log``. Returns the stage's record."""
        seconds = min(limit, self.remaining())
        record: Dict = {"command": " ".join(command)}
        if seconds < 5:
            record.update(status="skipped", reason=f"time budget spent ({self.remaining():.0f} s left)")
            return record
        log = os.path.join(self.output, f"{name}.log")
        start = self.clock()
        with open(log, "w") as log_file:
            try:
                result = subprocess.run(command, cwd=ROOT, env={**self.environment, **(environment or {})},
                                        stdout=log_file, stderr=subprocess.STDOUT, timeout=seconds)
                status = "ok" if result.returncode == 0 else "failed"
                record["exit_status"] = result.returncode
            except subprocess.TimeoutExpired:
                status = "timeout"
        record.update(status=status, seconds=round(self.clock() - start, 1), log=os.path.basename(log))
        record["output_tail"] = tail(log, 40)
        return record

    def record(self, name: str, record: Dict) -> Dict:
        self.report["stages"][name] = record
        self.save()
        print(f"gpu_check: {name}: {record['status']}" + (f" ({record['seconds']} s)" if "seconds" in record else "")
              + (f": {record['reason']}" if record.get("reason") else ""), flush=True)
        return record


def tail(path: str, lines: int) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------- stages

def environment_stage(check: Check) -> Dict:
    import importlib.util

    import torch

    properties = torch.cuda.get_device_properties(0)
    record: Dict = {
        "status": "ok",
        "gpu": torch.cuda.get_device_name(0),
        "compute_capability": f"{properties.major}.{properties.minor}",
        "multiprocessors": properties.multi_processor_count,
        "memory_gib": round(properties.total_memory / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "missing_packages": [name for name in PACKAGES if importlib.util.find_spec(name) is None],
    }
    try:
        import triton
        record["triton"] = triton.__version__
    except ImportError:
        record["triton"] = None
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if nvcc:
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        match = re.search(r"release (\d+\.\d+)", version)
        record["nvcc"] = match.group(1) if match else version.strip().splitlines()[-1:]
    smi = shutil.which("nvidia-smi")
    if smi:
        query = subprocess.run([smi, "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
                               capture_output=True, text=True)
        record["nvidia_smi"] = query.stdout.strip()
    return record


def import_path_environment(check: Check) -> Dict[str, str]:
    """PYTHONPATH under which ``import deformable_detr_ops`` finds ops/ (and its in-place build)
    and ``import deformable_detr`` this checkout, without installing anything."""
    shim = os.path.join(check.output, "pythonpath")
    os.makedirs(shim, exist_ok=True)
    link = os.path.join(shim, "deformable_detr_ops")
    if not os.path.lexists(link):
        os.symlink(os.path.join(ROOT, "ops"), link)
    paths = [shim, ROOT, os.path.join(ROOT, "tools")] + [p for p in check.environment.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {"PYTHONPATH": os.pathsep.join(paths)}


def build_stage(check: Check, capability: str) -> Dict:
    environment = {"MS_DEFORM_ATTN_CUDA": "1", "TORCH_CUDA_ARCH_LIST": capability,
                   "MAX_JOBS": str(os.cpu_count() or 4)}
    record = check.run("build", [sys.executable, "setup.py", "build_ext", "--inplace"], STAGE_LIMITS["build"], environment)
    if record["status"] == "ok":
        probe = ("import json, warnings; warnings.simplefilter('error'); import deformable_detr_ops as ops; "
                 "print(json.dumps(ops.available_implementations()))")
        result = subprocess.run([sys.executable, "-c", probe], cwd=check.output, capture_output=True, text=True,
                                env={**check.environment, **import_path_environment(check)})
        if result.returncode == 0:
            record["implementations"] = json.loads(result.stdout.strip().splitlines()[-1])
        else:
            record.update(status="failed", reason="the build does not load: " + result.stderr.strip()[-500:])
    return record


def pytest_counts(text: str) -> Dict[str, int]:
    """{"passed": 12, "failed": 1, ...} from pytest's summary line."""
    summary = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|errors?)\b", line)]
    counts = {}
    for count, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", summary[-1] if summary else ""):
        counts[what] = int(count)
    return counts


def tests_stage(check: Check, environment: Dict[str, str]) -> Dict:
    command = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "-o", "addopts="] + list(TEST_FILES)
    record = check.run("tests", command, STAGE_LIMITS["tests"], environment)
    record["counts"] = pytest_counts(record.get("output_tail", ""))
    record["failures"] = re.findall(r"^(?:FAILED|ERROR) (\S+)", record.get("output_tail", ""), flags=re.MULTILINE)
    return record


def op_stage(check: Check, environment: Dict[str, str]) -> Dict:
    record: Dict = {"status": "ok", "runs": {}}
    for label, extra in (("float32", []), ("bfloat16 value", ["--value-dtype", "bfloat16"])):
        path = os.path.join(check.output, f"op_{label.split()[0]}.json")
        command = [sys.executable, "tools/benchmark_op.py", "--device", "cuda", "--batch", "2", "--repeats", "20",
                   "--workloads", "encoder", "decoder", "--implementations", "reference", "kernel", "triton",
                   "--json", path] + extra
        run = check.run(f"op_{label.split()[0]}", command, STAGE_LIMITS["op"] / 2, environment)
        run["rows"] = read_json(path).get("rows", [])
        record["runs"][label] = run
        if run["status"] != "ok":
            record["status"] = run["status"]
    return record


def benchmark_stage(check: Check, name: str, environment: Dict[str, str], overrides: List[str],
                    limit: float) -> Dict:
    run_dir = os.path.join(check.output, name)
    command = [sys.executable, "tools/benchmark.py", "experiment=r50_deformable_detr", "device=cuda",
               "measure=[training]", "training_batch_size=2", f"hydra.run.dir={run_dir}"] + overrides
    record = check.run(name, command, limit, environment)
    record["benchmark"] = read_json(os.path.join(run_dir, "benchmark.json")).get("training", [])
    return record


def step_stage(check: Check, environment: Dict[str, str]) -> Dict:
    kernel = benchmark_stage(check, "step", environment,
                             ["precisions=[fp32,bf16]", "compile=[false]", "warmup=2", "iterations=5"],
                             STAGE_LIMITS["step"] * 2 / 3)
    triton = benchmark_stage(check, "step_triton", {**environment, "MS_DEFORM_ATTN_IMPLEMENTATION": "triton"},
                             ["precisions=[bf16]", "compile=[false]", "warmup=2", "iterations=5"],
                             STAGE_LIMITS["step"] / 3)
    status = kernel["status"] if kernel["status"] != "ok" else triton["status"]
    return {"status": status, "runs": {"CUDA kernel": kernel, "Triton op": triton}}


def train_stage(check: Check, environment: Dict[str, str]) -> Dict:
    run_dir = os.path.join(check.output, "train")
    command = [sys.executable, "tools/train.py", "device=cuda", "trainer.epochs=1", "trainer.eval_every=1",
               f"hydra.run.dir={run_dir}"]
    record = check.run("train", command, STAGE_LIMITS["train"],
                       {**environment, "DDETR_SYNTHETIC_ROOT": os.path.join(check.output, "synthetic")})
    record["metrics"] = {key: value for key, value in read_json(os.path.join(run_dir, "metrics.json")).items()
                         if key in ("AP", "AP50", "AP75", "AR100")}
    epochs = [entry for entry in read_json_lines(os.path.join(run_dir, "log.jsonl")) if "minutes" in entry]
    if epochs:
        record["epoch_seconds"] = round(60 * epochs[-1]["minutes"], 1)
        record["train_loss"] = epochs[-1].get("train_loss")
    return record


def compiled_stage(check: Check, environment: Dict[str, str]) -> Dict:
    return benchmark_stage(check, "compiled", environment,
                           ["precisions=[bf16]", "compile=[true]", "warmup=2", "iterations=5"],
                           STAGE_LIMITS["compiled"])


def read_json(path: str) -> Dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def read_json_lines(path: str) -> List[Dict]:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


# ---------------------------------------------------------------- summary

def summary_table(report: Dict) -> str:
    """A short markdown table of a report: what each stage found."""
    stages = report.get("stages", {})
    lines = []
    environment = stages.get("environment", {})
    if environment.get("gpu"):
        lines.append(f"{environment['gpu']} (sm_{environment['compute_capability'].replace('.', '')}), torch "
                     f"{environment.get('torch')}, CUDA {environment.get('cuda')}, Triton {environment.get('triton')}")
        if environment.get("missing_packages"):
            lines.append(f"missing packages: {', '.join(environment['missing_packages'])}")
    lines += ["", "| stage | status | result |", "|---|---|---|"]
    for name in STAGES:
        if name not in stages or name == "environment":
            continue
        stage = stages[name]
        lines.append(f"| {name} | {stage['status']} | {_stage_result(name, stage)} |")
    for label, run in stages.get("op", {}).get("runs", {}).items():
        rows = [row for row in run.get("rows", []) if "forward_ms" in row]
        if rows:
            lines += ["", f"op, {label}: device ms (forward / backward)", "",
                      "| workload | reference | kernel | triton |", "|---|---|---|---|"]
            for workload in ("encoder", "decoder"):
                cells = {row["implementation"]: f"{row['forward_ms']:.3f} / {row['backward_ms']:.3f}"
                         for row in rows if row["workload"] == workload}
                lines.append(f"| {workload} | {cells.get('reference', '-')} | {cells.get('kernel', '-')} | {cells.get('triton', '-')} |")
    return "\n".join(lines)


def _stage_result(name: str, stage: Dict) -> str:
    if stage.get("reason"):
        return stage["reason"]
    if name == "build":
        return f"implementations {stage.get('implementations', {}).get('cuda', '?')}"
    if name == "tests":
        counts = ", ".join(f"{count} {what}" for what, count in stage.get("counts", {}).items())
        failures = stage.get("failures", [])
        return counts + (f"; failed: {', '.join(failures[:5])}" if failures else "")
    if name in ("step", "compiled"):
        runs = stage.get("runs", {"": stage})
        parts = []
        for label, run in runs.items():
            for row in run.get("benchmark", []):
                if "images_per_second" in row:
                    parts.append(f"{label} {row['precision']}{' compiled' if row.get('compile') else ''}: "
                                 f"{row['seconds_per_iteration'] * 1e3:.0f} ms/step, {row['peak_memory_mb']:,.0f} MiB")
        return "; ".join(parts).strip() or "-"
    if name == "train":
        metrics = stage.get("metrics", {})
        return ", ".join([f"AP {metrics['AP']:.3f}" if "AP" in metrics else "no metrics"]
                         + ([f"epoch of 200 steps in {stage['epoch_seconds']} s"] if stage.get("epoch_seconds") else []))
    if name == "op":
        return "see the tables below"
    return "-"


# ---------------------------------------------------------------- main

def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    gpu = gpu_visible()
    if gpu is None:
        print("gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False); nothing to check here")
        return NO_GPU_EXIT
    check = Check(args.output, args.budget)
    print(f"gpu_check: {gpu}, writing to {check.output}", flush=True)
    # always first: the later stages need the GPU's architecture and know what is missing
    environment = check.record("environment", environment_stage(check))
    import_environment = import_path_environment(check)
    for name in args.stages:
        if name == "build":
            check.record(name, build_stage(check, environment["compute_capability"]))
        elif name == "tests":
            check.record(name, tests_stage(check, import_environment))
        elif name == "op":
            check.record(name, op_stage(check, import_environment))
        elif name == "step":
            check.record(name, step_stage(check, import_environment))
        elif name == "train":
            check.record(name, train_stage(check, import_environment))
        elif name == "compiled":
            check.record(name, compiled_stage(check, import_environment))
    table = summary_table(check.report)
    with open(os.path.join(check.output, "gpu_check.md"), "w") as f:
        f.write(table + "\n")
    print()
    print(table)
    return 0 if all(stage["status"] in ("ok", "skipped") for stage in check.report["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
