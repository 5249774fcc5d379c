"""The packages under test (deformable_detr, deformable_detr_ops) are the installed ones:
`pip install -e .` from the repository root installs them from this checkout.

Fixtures shared by several test files live here; plain helpers (running the tools, writing small
datasets) are in tests/cli.py, tests/model_builders.py and tests/inference_fixtures.py.

Markers (registered in pyproject.toml, ``--strict-markers``): ``slow`` (about 5 s or more on 2 idle
CPU cores: a tool in a fresh interpreter, training, export, compilation) and ``multiprocess``
(torchrun, mp.spawn, a process pool or a gloo process group).
The quick tier is ``python -m pytest -q -m "not slow and not multiprocess" tests``; a plain
``python -m pytest -q tests`` runs everything (what .ci/run does)."""
import pytest


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """The tiny test recipe's synthetic dataset (``experiment=tiny_test``: 8 train / 4 val images),
    generated once per session; pass it as ``cli.tiny(run_dir, data_root, ...)``. Read-only: a test
    that changes ``dataset.synthetic.*`` (which regenerates the set) uses a directory of its own."""
    from omegaconf import OmegaConf

    from cli import compose_config
    from deformable_detr.data import SyntheticConfig, ensure_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic") / "data"
    synthetic = OmegaConf.to_container(compose_config("train", ["experiment=tiny_test", f"dataset.root={root}"]).dataset.synthetic, resolve=True)
    ensure_synthetic_dataset(str(root), SyntheticConfig(**synthetic))
    return str(root)
