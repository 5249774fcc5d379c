#!/usr/bin/env python
"""python tools/eval.py --help: see deformable_detr/cli/eval.py."""
from deformable_detr.cli.eval import main

if __name__ == "__main__":
    main()
