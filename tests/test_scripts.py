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
