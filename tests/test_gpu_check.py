"""The one-call GPU check's CPU parts: arguments, the no-GPU exit, stage running within a budget,
the JSON it writes and the table it prints."""
import json
import os
import subprocess
import sys

import pytest

import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_without_a_gpu_it_says_so_in_one_line_and_exits_2(tmp_path):
    environment = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--output", str(tmp_path / "check")],
                            capture_output=True, text=True, env=environment, timeout=120)
    assert result.returncode == 2
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU is visible" in lines[0], lines
    assert not (tmp_path / "check").exists()  # nothing was started


def test_arguments():
    args = gpu_check.parse_args(["--output", "x", "--stages", "train", "build", "--budget", "100"])
    assert args.stages == ["build", "train"] and args.budget == 100 and args.output == "x"
    assert gpu_check.parse_args(["--skip-build"]).stages == [s for s in gpu_check.STAGES if s != "build"]
    assert gpu_check.parse_args([]).output.startswith(os.path.join(ROOT, "outputs", "gpu_check"))
    for bad in (["--stages", "benchmark"], ["--budget", "0"], ["--budget", "soon"]):
        with pytest.raises(SystemExit) as exit_info:
            gpu_check.parse_args(bad)
        assert exit_info.value.code == 2


def test_help_lists_the_stages():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("usage: gpu_check")
    assert all(stage in result.stdout for stage in gpu_check.STAGES)


@pytest.mark.slow
def test_stages_run_log_and_keep_to_the_budget(tmp_path):
    now = [0.0]
    check = gpu_check.Check(str(tmp_path), budget=100.0, clock=lambda: now[0])
    record = check.record("ok", check.run("ok", [sys.executable, "-c", "print('hello'); print('world')"], 30))
    assert record["status"] == "ok" and record["exit_status"] == 0 and "world" in record["output_tail"]
    assert (tmp_path / "ok.log").read_text() == "hello\nworld\n"
    record = check.run("failing", [sys.executable, "-c", "import sys; sys.exit(3)"], 30)
    assert record["status"] == "failed" and record["exit_status"] == 3
    record = check.run("slow", [sys.executable, "-c", "import time; time.sleep(30)"], 1.5 + 5)
    assert record["status"] == "timeout"
    now[0] = 97.0  # 3 s of the budget left: not worth starting anything
    record = check.record("late", check.run("late", [sys.executable, "-c", "print(1)"], 30))
    assert record["status"] == "skipped" and "time budget" in record["reason"]
    assert not (tmp_path / "late.log").exists()
    # the JSON holds every recorded stage, rewritten after each
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(saved["stages"]) == ["ok", "late"] and saved["budget_seconds"] == 100.0


def test_json_is_written_whole(tmp_path):
    path = tmp_path / "result.json"
    gpu_check.write_json_atomic(str(path), {"a": [1, 2], "when": gpu_check.datetime.date(2026, 1, 2)})
    assert json.loads(path.read_text()) == {"a": [1, 2], "when": "2026-01-02"}
    assert os.listdir(tmp_path) == ["result.json"]


def test_pytest_counts():
    assert gpu_check.pytest_counts("....\nFAILED tests/x.py::t - boom\n3 failed, 40 passed, 2 skipped in 9.1s\n") == {
        "failed": 3, "passed": 40, "skipped": 2}
    assert gpu_check.pytest_counts("no summary") == {}


def test_summary_table_of_a_report():
    report = {"stages": {
        "environment": {"status": "ok", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "torch": "2.11.0",
                        "cuda": "13.0", "triton": "3.6.0", "missing_packages": ["pycocotools"]},
        "build": {"status": "ok", "seconds": 80.0, "implementations": {"cuda": ["kernel", "triton", "reference"]}},
        "tests": {"status": "failed", "counts": {"failed": 1, "passed": 70}, "failures": ["tests/test_ops_cuda.py::test_a"]},
        "op": {"status": "ok", "runs": {"float32": {"rows": [
            {"workload": "encoder", "implementation": "kernel", "forward_ms": 0.1234, "backward_ms": 0.4},
            {"workload": "encoder", "implementation": "triton", "forward_ms": 0.2, "backward_ms": 0.5},
            {"workload": "decoder", "implementation": "triton", "error": "no"}]}}},
        "step": {"status": "ok", "runs": {"CUDA kernel": {"benchmark": [
            {"precision": "bf16", "compile": False, "images_per_second": 20.0, "seconds_per_iteration": 0.1,
             "peak_memory_mb": 9000.0}]}}},
        "train": {"status": "ok", "metrics": {"AP": 0.3}, "epoch_seconds": 41.5},
        "compiled": {"status": "skipped", "reason": "time budget spent (2 s left)"},
    }}
    table = gpu_check.summary_table(report)
    assert table.startswith("NVIDIA H100 80GB HBM3 (sm_90), torch 2.11.0, CUDA 13.0, Triton 3.6.0")
    assert "missing packages: pycocotools" in table
    assert "| tests | failed | 1 failed, 70 passed; failed: tests/test_ops_cuda.py::test_a |" in table
    assert "| step | ok | CUDA kernel bf16: 100 ms/step, 9,000 MiB |" in table
    assert "| train | ok | AP 0.300, epoch of 200 steps in 41.5 s |" in table
    assert "| compiled | skipped | time budget spent (2 s left) |" in table
    assert "| encoder | - | 0.123 / 0.400 | 0.200 / 0.500 |" in table
    assert "| decoder | - | - | - |" in table
