#!/usr/bin/env python
"""python tools/benchmark.py --help: see deformable_detr/cli/benchmark.py."""
from deformable_detr.cli.benchmark import main

if __name__ == "__main__":
    main()
