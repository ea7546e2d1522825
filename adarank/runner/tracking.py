"""Experiment tracking: a thin wrapper over Weights & Biases that the runner owns.

The allocator returns data and the runner hands it to a ``Tracker``; nothing else in the
package talks to W&B. A tracker that is disabled (``mode="disabled"`` or ``enabled=False``
on non-zero ranks) does nothing and never imports wandb.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

MODES = ("offline", "online", "disabled")


class Tracker:
    """One W&B run whose files live under ``out_dir``.

    Args:
        mode: "offline" (files only; push later with ``wandb sync``), "online" or "disabled".
        project, group, job_type, tags, name, config: passed to ``wandb.init``.
        out_dir: the run's output directory; wandb writes ``out_dir/wandb/`` and rank heatmaps
            go to ``out_dir/ranks/``.
        run_id: a fixed W&B run id, e.g. stored in a checkpoint.
        resume: continue the run ``run_id`` (wandb ``resume="allow"``). Offline, wandb writes a
            second ``offline-run-*`` folder with the same id; ``wandb sync`` merges them.
        enabled: False on every process but rank 0, so only one process logs.
    """

    def __init__(
        self,
        mode: str = "offline",
        project: str = "adarank",
        group: str | None = None,
        job_type: str | None = None,
        tags: Sequence[str] = (),
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        out_dir: str | os.PathLike = ".",
        run_id: str | None = None,
        resume: bool = False,
        enabled: bool = True,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"tracker mode must be one of {MODES}, got {mode!r}")
        self.out_dir = Path(out_dir)
        self._run_id = run_id
        self._run: Any = None
        if not enabled or mode == "disabled":
            return
        import wandb  # lazy: a disabled tracker must work where wandb is absent or broken

        self._wandb = wandb
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            mode=mode,
            project=project,
            group=group,
            job_type=job_type,
            tags=list(tags),
            name=name,
            config=dict(config or {}),
            dir=str(self.out_dir),
            id=run_id,
            resume="allow" if resume else None,
            # A Hydra multirun runs jobs in one process: a run left open by a crashed job is
            # closed rather than silently reused ("return_previous", wandb's default).
            reinit="finish_previous",
        )

    @property
    def active(self) -> bool:
        """Whether calls reach W&B (False when disabled or after ``finish``)."""
        return self._run is not None

    @property
    def run_id(self) -> str | None:
        """The W&B run id; for a disabled tracker, the ``run_id`` it was given."""
        return self._run.id if self._run is not None else self._run_id

    def log(self, scalars: Mapping[str, Any], step: int) -> None:
        """Log a dict of scalars at optimizer step ``step``."""
        if self._run is not None:
            self._run.log(dict(scalars), step=step)

    def log_ranks(self, ranks: Mapping[str, int], step: int) -> None:
        """Log each module's rank as a table plus a layer x type heatmap image."""
        if self._run is None or not ranks:
            return
        from .plots import parse_module_name, rank_heatmap

        rows = [[name, *parse_module_name(name), int(r)] for name, r in ranks.items()]
        table = self._wandb.Table(columns=["module", "layer", "type", "rank"], data=rows)
        data: dict[str, Any] = {
            "ranks/table": table,
            "ranks/total": sum(int(r) for r in ranks.values()),
            "ranks/mean": sum(int(r) for r in ranks.values()) / len(ranks),
        }
        png = rank_heatmap(ranks, self.out_dir / "ranks" / f"step_{step:07d}.png", f"ranks at step {step}")
        if png is not None:
            data["ranks/heatmap"] = self._wandb.Image(str(png))
        self._run.log(data, step=step)

    def log_image(self, key: str, path: str | os.PathLike, step: int | None = None) -> None:
        """Log a PNG; without ``step`` it joins the current step rather than starting a new one."""
        if self._run is None:
            return
        image = self._wandb.Image(str(path))
        if step is None:
            self._run.log({key: image}, commit=False)
        else:
            self._run.log({key: image}, step=step)

    def summary(self, values: Mapping[str, Any]) -> None:
        """Set run-level summary values (final metrics, parameter counts...)."""
        if self._run is not None:
            self._run.summary.update(dict(values))

    def finish(self, exit_code: int = 0) -> None:
        """Close the run; safe to call twice.

        Offline, wandb-core may still be flushing ``run-<id>.wandb`` when this returns; the
        file is complete once the process exits (or after ``wandb.teardown()``).
        """
        if self._run is not None:
            self._run.finish(exit_code=exit_code)
            self._run = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)


def wandb_credentials() -> bool:
    """Whether W&B can log in without asking: $WANDB_API_KEY, or an entry for its host in ~/.netrc (what
    `wandb login` writes). Offline and disabled modes need neither."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False
