"""The install: one dependency list (pyproject.toml, mirrored by requirements.txt), every pin
exact, and the op importable under its own name from the package's sources."""
import os
import re

import pytest

import deformable_detr_ops

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def requirement_lines():
    with open(os.path.join(ROOT, "requirements.txt")) as handle:
        return [line.strip() for line in handle if line.strip() and not line.startswith("#")]


def test_requirements_txt_mirrors_pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        project = tomllib.load(handle)
    assert sorted(project["project"]["dependencies"]) == sorted(requirement_lines())
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][0-9A-Za-z.+]*", line) for line in requirement_lines())
    build = {r.split("==")[0]: r for r in project["build-system"]["requires"] if "==" in r}
    pins = {r.split("==")[0]: r for r in requirement_lines()}
    assert build["torch"] == pins["torch"], "the op must compile against the torch that is installed"


def test_the_op_package_comes_from_ops():
    assert os.path.dirname(deformable_detr_ops.__file__) == os.path.join(ROOT, "ops")
