"""Where the GLUE sweep puts its runs: <root>/<stage>/<task>/<method>_r<budget>/[<folder>/]lr<lr>_seed<seed>
(full fine-tuning has no budget: <root>/<stage>/<task>/full/...). The sweep, its supersede step and the lever
table all read and write this one layout."""

from __future__ import annotations

from pathlib import Path


def group_dir(root: Path, stage: str, task: str, method: str, budget: int) -> Path:
    """The folder of one (task, method, budget) in one stage."""
    return root / stage / task / ("full" if method == "full" else f"{method}_r{budget}")


def lr_prefix(lr: float) -> str:
    """What the folder names of every run at learning rate `lr` start with."""
    return f"lr{lr:g}_"


def run_name(lr: float, seed: int) -> str:
    """The folder name of one run inside its group (or inside a lever's folder there)."""
    return f"{lr_prefix(lr)}seed{seed}"
