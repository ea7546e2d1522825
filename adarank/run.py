"""`python -m adarank.run [+experiment=NAME] [overrides]`: the runner's command line (adarank/runner/cli.py)."""

from adarank.runner.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
