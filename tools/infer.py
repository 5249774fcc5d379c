#!/usr/bin/env python
"""python tools/infer.py --help: see deformable_detr/cli/infer.py."""
from deformable_detr.cli.infer import main

if __name__ == "__main__":
    main()
