"""`python -m adarank.analyze RUN_DIR...`: spectra of what runs trained (adarank/studies/spectra.py)."""

import sys

from adarank.studies.spectra import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
