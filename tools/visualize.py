#!/usr/bin/env python
"""python tools/visualize.py --help: see deformable_detr/cli/visualize.py."""
from deformable_detr.cli.visualize import main

if __name__ == "__main__":
    main()
