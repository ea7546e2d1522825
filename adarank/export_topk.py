"""`python -m adarank.export_topk RUN_DIR --budget K [K ...] [--eval]`: top-K truncations of a finished adalora
run, as PEFT adapters, optionally scored on its dev set (adarank/runner/topk_export.py)."""

import sys

from adarank.runner.topk_export import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
