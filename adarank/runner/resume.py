"""Resuming refuses a changed config: a run's results must describe the settings it ran with.

The checkpoint stores the resolved config. On `resume=true` every field that can change what is computed must
equal the checkpoint's; otherwise the run stops with one line naming each differing field and both values,
before any data or model loads. `MAY_DIFFER` lists the fields that cannot change the result.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["MAY_DIFFER", "ResumeRefused", "check_resumable", "config_differences"]

#: Fields a resumed run may change: where things are written or read from, how much is printed, which device
#: computes (the same numbers up to the device's rounding), how often it checkpoints (a resumed run is
#: bit-identical whatever the interval), debug checks and W&B's mode; and gradient checkpointing, which
#: recomputes the same activations (bit-identical on a CPU: tests/e2e/test_gradient_checkpointing.py), so a
#: run that ran out of memory can resume with it.
MAY_DIFFER = frozenset({
    "resume", "overwrite", "data.dir", "data.cache_dir", "train.device", "train.progress", "train.log_every",
    "train.checkpoint_every", "train.check_masks", "train.cuda_graph_shapes", "wandb.mode", "wandb.project",
    "train.gradient_checkpointing",
    # the switches train.speed resolved to (method.fused, train.cuda_graph, ...) are compared themselves
    "train.speed",
})


class ResumeRefused(ValueError):
    """The resumed run's config differs from its checkpoint's in a field that changes the computation."""


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(_flat(value, name) if isinstance(value, dict) and value else {name: value})
    return out


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, checkpoint's value, this run's value) for every field outside MAY_DIFFER that differs."""
    a, b = _flat(saved), _flat(current)
    missing = object()
    out = []
    for name in sorted(set(a) | set(b)):
        if name in MAY_DIFFER:
            continue
        va, vb = a.get(name, missing), b.get(name, missing)
        if va != vb:
            out.append((name, None if va is missing else va, None if vb is missing else vb))
    return out


def check_resumable(saved: dict[str, Any] | None, current: dict[str, Any], out_dir: str,
                    warn: Callable[[str], None]) -> None:
    """Raise ResumeRefused if `current` (the resolved config) changes what the checkpoint's run computed."""
    if saved is None:
        warn(f"{out_dir}: the checkpoint records no config (written by an older adarank): resuming unchecked")
        return
    diffs = config_differences(saved, current)
    if diffs:
        listed = "; ".join(f"{name}: {old!r} in the checkpoint, {new!r} now" for name, old, new in diffs)
        raise ResumeRefused(f"resume=true: this config differs from the run being resumed in {out_dir} ({listed}); "
                            f"resume with the run's settings, or start over with overwrite=true")
