"""Singular-value spectra of the weight updates ΔW that fine-tuning runs learned, compared across methods.

    python -m adarank.analyze RUN_DIR... [--out DIR]

A run dir holds ``adapter/`` (a PEFT LoRA export, ΔW = scale·B@A per module) or, for full fine-tuning,
``delta.safetensors`` (module name -> ΔW of shape (out, in)), and ``results.json`` (for "method").
Writes ``spectra.csv`` (one row per run and module), ``spectra.md`` (mean effective rank and 90%-energy
rank per method) and ``spectra.png`` (the median normalised spectrum of each method).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from adarank.atomic import atomic_write_text
from adarank.runner.plots import new_figure, save_png
from adarank.studies.errors import StudyError

TOP_K = 8  # singular values written per module in spectra.csv
PLOT_K = 64  # spectrum indices plotted
ENERGY = 0.9


# ---------------------------------------------------------------- spectra


def spectrum(delta: torch.Tensor) -> np.ndarray:
    """Singular values of `delta` (2-D), descending, in float64.

    Values below max(m, n)·eps·s_1, with eps of `delta`'s own dtype (numpy.linalg.matrix_rank's
    tolerance), are set to 0: they are rounding noise, e.g. of a rank-r product stored in float32, and
    would otherwise add a little to the effective rank of every low-rank update.
    """
    if delta.ndim != 2:
        raise ValueError(f"spectrum: expected a matrix, got shape {tuple(delta.shape)}")
    eps = torch.finfo(delta.dtype).eps if delta.is_floating_point() else 0.0
    s = torch.linalg.svdvals(delta.detach().to("cpu", torch.float64)).numpy()
    if s.size:
        s[s < max(delta.shape) * eps * s[0]] = 0.0
    return s


def effective_rank(singular_values: np.ndarray) -> float:
    """Entropy effective rank (Roy & Vetterli, 2007): exp(H(p)) with p_i = s_i / Σ_j s_j.

    Takes singular values (not their squares); 0·log 0 counts as 0, and an all-zero spectrum has rank 0.
    It equals k for k equal nonzero singular values and lies in [1, k] for any k nonzero ones.
    """
    s = np.abs(np.asarray(singular_values, dtype=np.float64))
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def energy_rank(singular_values: np.ndarray, frac: float = ENERGY) -> int:
    """Smallest k with Σ_{i<=k} s_i² >= frac · Σ_i s_i² (s: `singular_values` sorted descending); 0 for a zero
    spectrum."""
    if not 0 < frac <= 1:
        raise ValueError(f"energy_rank: frac must be in (0, 1], got {frac}")
    e = np.sort(np.asarray(singular_values, dtype=np.float64) ** 2)[::-1]
    total = e.sum()
    if total <= 0:
        return 0
    # The slack absorbs rounding, so that e.g. 9 of 10 equal values count as exactly 90%.
    return int(np.searchsorted(np.cumsum(e), frac * total * (1 - 1e-12)) + 1)


# ---------------------------------------------------------------- reading runs


def load_deltas(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """Module name -> ΔW (out, in) of a run, from ``adapter/`` (PEFT LoRA) or ``delta.safetensors``.

    For an adapter, ΔW = scale·B@A, formed in float64, with PEFT's scale: lora_alpha / r (or / √r with
    use_rslora), per-module values from rank_pattern / alpha_pattern. adarank's own export folds the scale
    into B and sets alpha = r, so its scale is 1. (With fan_in_fan_out PEFT applies ΔWᵀ; the singular
    values are the same.) Modules an AdaLoRA run pruned to rank 0 are absent from its export.
    Raises FileNotFoundError when the dir has neither.
    """
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    adapter = run_dir / "adapter" / "adapter_model.safetensors"
    if adapter.is_file():
        config_path = adapter.parent / "adapter_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        return _lora_deltas(load_file(str(adapter)), config)
    delta = run_dir / "delta.safetensors"
    if delta.is_file():
        return load_file(str(delta))
    raise FileNotFoundError(f"{run_dir}: no adapter/adapter_model.safetensors or delta.safetensors")


_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<name>.+)\.lora_A(?:\.[^.]+)?\.weight$")


def _lora_deltas(tensors: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    out = {}
    for key, A in tensors.items():
        m = _LORA_KEY.match(key)
        if m is None:
            continue  # lora_B, or a modules_to_save weight such as the classifier
        B = tensors[key.replace(".lora_A", ".lora_B", 1)]
        name, r = m["name"], A.shape[0]
        alpha = _pattern(config.get("alpha_pattern"), name, config.get("lora_alpha", r))
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        out[name] = (B.double() @ A.double()) * scale
    return out


def _pattern(patterns: dict | None, name: str, default: float) -> float:
    # PEFT's rule: a pattern key matches when it fully matches a dotted suffix of the module name.
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(?:.*\.)?{key}", name):
            return value
    return default


def run_method(run_dir: Path) -> str:
    """The "method" in the run's results.json, or "unknown" without one."""
    path = run_dir / "results.json"
    if path.is_file():
        return str(json.loads(path.read_text()).get("method", "unknown"))
    return "unknown"


def analyze_run(run_dir: str | Path) -> list[dict]:
    """One row per module: run, method, module, shape, erank, energy90, and the spectrum `s`."""
    run_dir = Path(run_dir)
    method = run_method(run_dir)
    rows = []
    for name, delta in sorted(load_deltas(run_dir).items()):
        s = spectrum(delta)
        rows.append({"run": str(run_dir), "method": method, "module": name, "shape": tuple(delta.shape),
                     "erank": effective_rank(s), "energy90": energy_rank(s, ENERGY), "s": s})
    return rows


# ---------------------------------------------------------------- outputs


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["run", "method", "module", "out", "in", "erank", "energy90"] + [f"s{i + 1}" for i in range(TOP_K)])
    for r in rows:
        top = [f"{v:.6g}" for v in r["s"][:TOP_K]]
        writer.writerow([r["run"], r["method"], r["module"], *r["shape"], f"{r['erank']:.4f}", r["energy90"]]
                        + top + [""] * (TOP_K - len(top)))
    atomic_write_text(path, buf.getvalue())


def summarize(rows: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Per method: runs, modules, mean and median effective rank, mean 90%-energy rank."""
    by: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by[r["method"]].append(r)
    return {m: {"runs": len({r["run"] for r in rs}), "modules": len(rs),
                "erank_mean": float(np.mean([r["erank"] for r in rs])),
                "erank_median": float(np.median([r["erank"] for r in rs])),
                "energy90_mean": float(np.mean([r["energy90"] for r in rs]))}
            for m, rs in by.items()}


def render_markdown(summary: dict[str, dict[str, float]]) -> str:
    lines = ["# ΔW spectra by method", "",
             "Effective rank: exp of the entropy of the normalised singular values (Roy & Vetterli, 2007). "
             f"energy{int(ENERGY * 100)}: the fewest singular values holding {ENERGY:.0%} of ‖ΔW‖²_F. "
             "Means over every (run, module); modules pruned to rank 0 are absent from exports.", "",
             "| method | runs | modules | mean erank | median erank | mean energy90 |", "|---|---|---|---|---|---|"]
    for m, v in summary.items():
        lines.append(f"| {m} | {v['runs']} | {v['modules']} | {v['erank_mean']:.2f} | "
                     f"{v['erank_median']:.2f} | {v['energy90_mean']:.2f} |")
    return "\n".join(lines) + "\n"


def median_spectra(rows: Sequence[dict], length: int = PLOT_K) -> dict[str, np.ndarray]:
    """Per method, the median over its modules of s_i / s_1 for the first min(length, shortest spectrum) i."""
    by: dict[str, list[np.ndarray]] = defaultdict(list)
    for r in rows:
        if r["s"].size and r["s"][0] > 0:
            by[r["method"]].append(r["s"] / r["s"][0])
    out = {}
    for m, specs in by.items():
        n = min(length, min(len(s) for s in specs))
        out[m] = np.median(np.stack([s[:n] for s in specs]), axis=0)
    return out


def plot_spectra(curves: dict[str, np.ndarray], path: Path) -> Path | None:
    if not curves:
        return None
    fig = new_figure(6, 4)
    ax = fig.add_subplot()
    for m, c in curves.items():
        # A zero (beyond the rank) cannot go on a log axis: the curve ends at the last nonzero value.
        ax.plot(np.arange(1, len(c) + 1), np.where(c > 0, c, np.nan), marker=".", label=m)
    ax.set_yscale("log")
    ax.set_xlabel("singular value index i")
    ax.set_ylabel("median over modules of s_i / s_1")
    ax.set_title("ΔW spectra")
    ax.legend()
    return save_png(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adarank.analyze", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders with adapter/ or delta.safetensors")
    parser.add_argument("--out", default=".", help="folder for spectra.csv, spectra.md, spectra.png")
    args = parser.parse_args(argv)
    try:
        rows = []
        for d in args.runs:
            if not Path(d).is_dir():
                raise StudyError(f"{d}: no such directory")
            try:
                rows += analyze_run(d)
            except FileNotFoundError as e:
                raise StudyError(str(e)) from None
    except StudyError as e:
        print(f"analyze: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "spectra.csv", rows)
    summary = summarize(rows)
    atomic_write_text(out / "spectra.md", render_markdown(summary))
    plot_spectra(median_spectra(rows), out / "spectra.png")
    print(render_markdown(summary), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
