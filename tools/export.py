#!/usr/bin/env python
"""python tools/export.py --help: see deformable_detr/cli/export.py."""
from deformable_detr.cli.export import main

if __name__ == "__main__":
    main()
