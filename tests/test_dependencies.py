"""The dependency direction of DESIGN.md, checked on the source: nothing under deformable_detr/ or
ops/ imports hydra or omegaconf except the command-line layer deformable_detr/cli/, which nothing
else of the package imports; ops/ imports nothing of deformable_detr, and deformable_detr/models/
imports nothing of deformable_detr.data or deformable_detr.engine."""
import ast
import pathlib
from typing import List, Optional

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG_PACKAGES = ("hydra", "omegaconf")
CLI = "deformable_detr.cli"


def imported_modules(source: str, module: str, is_package: bool = False) -> List[str]:
    """The absolute names of the modules that ``source`` (the text of ``module``) imports.

    Relative imports are resolved against ``module``: in ``a.b.c``, ``from ..d import x`` is
    ``a.d`` and ``a.d.x`` (x may be a submodule). ``is_package``: the source is ``module``'s ``__init__.py``.
    """
    package = module.split(".") if is_package else module.split(".")[:-1]
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            names.append(prefix)
            names += [f"{prefix}.{alias.name}" for alias in node.names if alias.name != "*"]
    return names


def violations(source: str, module: str, is_package: bool = False) -> List[str]:
    """The imports of ``module`` that break the dependency rules, as 'module imports name' lines."""
    cli = module == CLI or module.startswith(CLI + ".")
    forbidden = [] if cli else list(CONFIG_PACKAGES) + ([CLI] if module.startswith("deformable_detr") else [])
    if module.split(".")[0] == "ops":
        forbidden.append("deformable_detr")
    if module == "deformable_detr.models" or module.startswith("deformable_detr.models."):
        forbidden += ["deformable_detr.data", "deformable_detr.engine"]
    return [
        f"{module} imports {name}"
        for name in imported_modules(source, module, is_package)
        if _within(name, forbidden) is not None
    ]


def _within(name: str, packages: List[str]) -> Optional[str]:
    return next((p for p in packages if name == p or name.startswith(p + ".")), None)


def _modules(top: str):
    for path in sorted((ROOT / top).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        yield path, ".".join(parts), is_package


def test_the_sources_follow_the_dependency_rules():
    found, checked = [], 0
    for top in ("deformable_detr", "ops"):
        for path, module, is_package in _modules(top):
            found += violations(path.read_text(), module, is_package)
            checked += 1
    assert checked > 20
    assert found == []


@pytest.mark.parametrize(
    "module,source,bad",
    [
        ("deformable_detr.models.detector", "from ..data import transforms", "deformable_detr.data"),
        ("deformable_detr.models.detector", "from ..engine.checkpoint import save", "deformable_detr.engine"),
        ("deformable_detr.models.detector", "import deformable_detr.data.coco as coco", "deformable_detr.data.coco"),
        ("deformable_detr.models", "from ..engine import trainer", "deformable_detr.engine"),
        ("deformable_detr.models.detector", "from .. import data", "deformable_detr.data"),
        ("deformable_detr.utils.box_ops", "from omegaconf import DictConfig", "omegaconf"),
        ("deformable_detr.utils.box_ops", "import hydra.utils", "hydra.utils"),
        ("ops.build", "from deformable_detr.utils import box_ops", "deformable_detr.utils"),
        ("ops", "def f():\n    import deformable_detr\n", "deformable_detr"),
        ("deformable_detr.inference.detector", "from ..cli.app import Tool", "deformable_detr.cli"),
    ],
)
def test_a_planted_violation_is_found(module, source, bad):
    found = violations(source, module, is_package=module in ("ops", "deformable_detr.models"))
    assert found and all(_within(line.split(" imports ")[1], [bad]) for line in found), found


@pytest.mark.parametrize(
    "module,source",
    [
        ("deformable_detr.models.detector", "from ..utils.box_ops import inverse_sigmoid\nfrom .backbone import Backbone"),
        ("deformable_detr.models.detector", "import deformable_detr_ops\nfrom deformable_detr.models import matcher"),
        ("deformable_detr.engine.trainer", "from ..data import collate\nfrom ..models import DeformableDETR"),
        ("ops.build", "import torch\nfrom . import reference"),
        ("deformable_detr.models.detector", "import hydrant\nimport omegaconfig"),
        ("deformable_detr.cli.train", "from omegaconf import DictConfig\nfrom hydra.utils import instantiate\nfrom ..engine import trainer"),
    ],
)
def test_allowed_imports_pass(module, source):
    assert violations(source, module) == []


def test_relative_imports_resolve_from_the_module_and_from_a_package():
    assert "deformable_detr.data" in imported_modules("from ..data import x", "deformable_detr.models.detector")
    assert "deformable_detr.data" in imported_modules("from ..data import x", "deformable_detr.models", is_package=True)
    assert "deformable_detr.models.backbone" in imported_modules("from . import backbone", "deformable_detr.models", is_package=True)
