"""The shell launchers: COCO preparation offline, usage errors."""
import os
import shutil
import subprocess
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
needs_tools = pytest.mark.skipif(not (shutil.which("curl") and shutil.which("unzip")), reason="needs curl and unzip")


def run(script, *args, env=None):
    environment = dict(os.environ, **(env or {}))
    return subprocess.run(["bash", os.path.join(SCRIPTS, script), *map(str, args)], capture_output=True, text=True, timeout=120, env=environment)


@needs_tools
def test_prepare_coco_offline_lists_what_to_download(tmp_path):
    result = run("prepare_coco.sh", tmp_path / "coco", env={"COCO_MIRROR": "http://127.0.0.1:9"})
    assert result.returncode == 1
    assert "cannot reach http://127.0.0.1:9" in result.stderr
    for name in ("annotations_trainval2017.zip", "val2017.zip", "train2017.zip"):
        assert name in result.stderr


@needs_tools
def test_prepare_coco_uses_archives_placed_by_hand(tmp_path):
    downloads = tmp_path / "coco" / "downloads"
    downloads.mkdir(parents=True)
    contents = {
        "annotations_trainval2017.zip": ["annotations/instances_train2017.json", "annotations/instances_val2017.json"],
        "val2017.zip": ["val2017/000000000001.jpg"],
        "train2017.zip": ["train2017/000000000002.jpg"],
    }
    for archive, members in contents.items():
        with zipfile.ZipFile(downloads / archive, "w") as z:
            for member in members:
                z.writestr(member, "{}")
    result = run("prepare_coco.sh", tmp_path / "coco", env={"COCO_MIRROR": "http://127.0.0.1:9"})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "coco" / "annotations" / "instances_val2017.json").is_file()
    assert "1 train and 1 val images" in result.stdout


def test_launchers_explain_their_usage():
    result = run("dist_train.sh")
    assert result.returncode == 2 and "usage" in result.stderr
    result = run("dist_train.sh", 2, env={"NNODES": "2"})
    assert result.returncode == 2 and "RUN_DIR" in result.stderr
    result = run("slurm_train.sh", "gpu")
    assert result.returncode == 2 and "usage" in result.stderr


FAKE_SLURM = {
    # sbatch keeps the batch script; srun runs one task of a 2-process job; scontrol names the head node, logs the rest
    "sbatch": 'cat > "$FAKE_DIR/batch.sh"',
    "srun": 'while [[ $1 == --* ]]; do shift; done\nSLURM_PROCID=1 SLURM_NTASKS=2 SLURM_LOCALID=1 "$@"',
    "scontrol": '[ "$1" = show ] && echo node7 && exit\necho "$@" >> "$FAKE_DIR/scontrol.log"',
    # the training: what it was started with, then the exit status the test asks for
    "python": 'printf "%s\\n" "$RANK $WORLD_SIZE $LOCAL_RANK $MASTER_ADDR:$MASTER_PORT" "$@" > "$FAKE_DIR/python.log"\nexit "$FAKE_STATUS"',
    "torchrun": 'echo "torchrun exits 1 whatever the status of its processes" >&2\nexit 1',
}


@pytest.mark.parametrize("status, requeued", [(143, True), (0, False), (1, False), (130, False)])
def test_a_slurm_job_requeues_itself_only_when_training_stopped_on_sigterm(tmp_path, status, requeued):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKE_SLURM.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path), "FAKE_STATUS": str(status)}
    result = run("slurm_train.sh", "gpu", "r50", 2, 2, tmp_path / "run", "experiment=r50_deformable_detr", "model.name=a b", env=env)
    assert result.returncode == 0, result.stderr
    batch = (tmp_path / "batch.sh").read_text()
    # SIGTERM before the time limit goes to the training processes, not to srun (which would SIGKILL them on it)
    assert "#SBATCH --signal=TERM@120" in batch and "#SBATCH --ntasks-per-node=2" in batch
    job = dict(os.environ, **env, SLURM_JOB_ID="42", SLURM_JOB_NODELIST="node[7-8]")
    result = subprocess.run(["bash", str(tmp_path / "batch.sh")], capture_output=True, text=True, timeout=60, env=job)
    assert result.returncode == status, result.stderr
    assert (tmp_path / "python.log").read_text().splitlines() == [
        "1 2 1 node7:29500", "tools/train.py", f"hydra.run.dir={tmp_path / 'run'}", "experiment=r50_deformable_detr", "model.name=a b"]
    log = tmp_path / "scontrol.log"
    assert (log.read_text() if log.exists() else "") == ("requeue 42\n" if requeued else "")
