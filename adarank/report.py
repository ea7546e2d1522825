"""`python -m adarank.report DIR...`: result tables and plots from finished runs (adarank/studies/report.py)."""

import sys

from adarank.studies.report import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
