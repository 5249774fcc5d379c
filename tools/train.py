#!/usr/bin/env python
"""python tools/train.py --help: see deformable_detr/cli/train.py."""
from deformable_detr.cli.train import main

if __name__ == "__main__":
    main()
