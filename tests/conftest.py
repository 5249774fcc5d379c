"""The packages under test (deformable_detr, deformable_detr_ops) are the installed ones:
`pip install -e .` from the repository root installs them from this checkout."""
