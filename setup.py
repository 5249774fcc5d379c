"""Builds the compiled kernels of the op (``ops/csrc`` -> ``deformable_detr_ops._C``) on install.

Metadata and dependencies live in pyproject.toml; this file only adds the extension, whose
flags and CUDA detection are in ``ops/build.py``.
"""
import importlib.util
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("ops_build", os.path.join(ROOT, "ops", "build.py"))
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

extension, cmdclass = build.extension()
setup(
    packages=find_packages(include=["deformable_detr", "deformable_detr.*"]) + ["deformable_detr_ops"],
    # The op's Python sources live in ops/ but import as deformable_detr_ops: a top-level
    # "ops" would collide with any other module of that name.
    package_dir={"deformable_detr_ops": "ops"},
    ext_modules=[extension],
    cmdclass=cmdclass,
)
