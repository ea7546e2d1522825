"""The seed article's failure mode: LoRA with α/r = 4 and a learning rate above 3e-4 blows up the adapter
norm early in training, against α/r = 1.

    python -m adarank.studies.norm_study DIR... --out OUT [--early 0.1] [--blowup-factor 2]
    (also: python -m adarank.studies.rank_study --norms DIR... --out OUT)

reads every results.json (its train_log: norm/max, norm/mean, train/loss per logged step) and every
diverged.json under the DIRs (settings from the run's .hydra/config.yaml and the overrides it lists; curve
from its last checkpoint, when there is one), groups runs by (α/r, lr) with seeds averaged (the α and the
learning rate a run applied: results.json's ``alpha`` and ``lr``, or for older files and diverged runs the
values `adarank.studies.runs` derives from the config), and writes
``norm_blowup.png`` (the three curves against the step), ``norm_blowup.md`` and ``norm_blowup.json``. The
indicator is computed, never assumed: norm/max at `early` of training, α/r = 4 over α/r = 1 at the same lr,
divided by the 4× that the scale α/r alone accounts for (`compare_ratios`); a diverged α/r = 4 run with a
surviving α/r = 1 run counts as a blow-up.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adarank.atomic import atomic_write_json, atomic_write_text
from adarank.studies.errors import StudyError
from adarank.studies.plots import norm_blowup
from adarank.studies.runs import (
    applied_alpha_ratio,
    applied_lr,
    find_runs,
    finite,
    read_record,
)

CLAIM = ("LoRA with α/r = 4 and a learning rate above 3e-4 blows up the adapter norm early in training "
         "(against α/r = 1)")
HIGH_RATIO, REF_RATIO, LR_THRESHOLD = 4.0, 1.0, 3e-4  # the claim's numbers
CURVES = ("norm/max", "norm/mean", "train/loss")
CONFIG_GROUPS = ("method", "task", "model")  # Hydra config groups of conf/


def curve_of(log: Iterable[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of `key` in a train_log, in step order; entries without a finite value are skipped."""
    pts: dict[int, float] = {}
    for e in log:
        v = finite(e.get(key)) if isinstance(e, dict) else None
        if v is not None and e.get("step") is not None:
            pts[int(e["step"])] = v
    return sorted(pts.items())


def mean_curve(curves: Iterable[Sequence[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Per-step mean over runs (seeds) of the values logged at that step.

    A run that diverged stops early: past its last step the mean is over the runs that went on.
    """
    by: dict[int, list[float]] = defaultdict(list)
    for c in curves:
        for s, v in c:
            by[int(s)].append(float(v))
    return [(s, float(np.mean(vs))) for s, vs in sorted(by.items())]


def blowup_indicators(curve: Sequence[tuple[int, float]], total_steps: int | None,
                      early: float = 0.1) -> dict[str, Any]:
    """How early a norm curve (`[(step, value), ...]`, step-sorted) grew, against a run of `total_steps`.

    - ``early``: the value at the last logged step <= early · total_steps (``early_step``); None when
      nothing was logged by then or total_steps is unknown.
    - ``peak`` / ``peak_step``, ``final`` / ``final_step`` (the last logged step).
    - ``early_over_final``: early / final. A norm that grows over the whole run gives well below 1; one that
      reached its end-of-training size in the first `early` of training (or overshot and came back) gives >= 1.
    - ``half_peak_frac``: the first step at which the value reaches half its peak, over total_steps.
      Small means the norm rushed up early. (Not "10x the first logged value": LoRA starts at B = 0, so every
      run multiplies its first-step norm many times over within a few steps.)
    """
    if not curve:
        raise ValueError("blowup_indicators: empty curve")
    steps = [s for s, _ in curve]
    values = [v for _, v in curve]
    i_peak = int(np.argmax(values))
    peak, final = values[i_peak], values[-1]
    half_step = next(s for s, v in curve if v >= peak / 2)
    early_step = early_value = None
    if total_steps:
        before = [(s, v) for s, v in curve if s <= early * total_steps]
        if before:
            early_step, early_value = before[-1]
    return {"first": values[0], "early_step": early_step, "early": early_value,
            "peak": peak, "peak_step": steps[i_peak], "final": final, "final_step": steps[-1],
            "early_over_final": early_value / final if early_value is not None and final > 0 else None,
            "half_peak_step": half_step, "half_peak_frac": half_step / total_steps if total_steps else None}


def _method_params(record: dict) -> dict[str, Any]:
    """kind (lora, rslora, or the method's name), r, α/r and the applied lr of a run (a results.json
    record, or ``{"config": ...}`` for a diverged run)."""
    config = record.get("config") if isinstance(record.get("config"), dict) else {}
    m = config.get("method") if isinstance(config.get("method"), dict) else {}
    name = m.get("name")
    kind = "rslora" if m.get("rslora") is True or name == "rslora" else "lora" if name in ("lora", "peft_lora") else name
    r = finite(m.get("r"))
    ratio = applied_alpha_ratio(record)
    return {"kind": kind, "r": None if r is None else int(r), "ratio": None if ratio is None else round(ratio, 6),
            "lr": applied_lr(record)}


def run_from_results(record: dict) -> dict[str, Any]:
    """One finished run (a results.json record) for the norm study."""
    config = record.get("config") if isinstance(record.get("config"), dict) else {}
    method = dict(config.get("method") or {})
    method.setdefault("name", record.get("method"))
    log = record.get("train_log") or []
    metric = record.get("metric")
    final = (record.get("metrics") or {}).get("final") or {}
    steps = finite(record.get("steps"))
    return _method_params(record | {"config": config | {"method": method}}) | {
        "path": record.get("path"), "task": record.get("task"), "seed": record.get("seed"),
        "diverged": False, "diverged_at": None, "error": None,
        "steps": int(steps) if steps else (log[-1].get("step") if log else None),
        "curves": {k: curve_of(log, k) for k in CURVES},
        "metric": metric, "val": finite(final.get(f"val/{metric}")) if metric else None}


def _override_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none", "~"):
        return None
    try:
        return int(text)  # seed=1 stays an int
    except ValueError:
        return finite(text) if finite(text) is not None else text.strip()


def apply_overrides(config: dict, overrides: Iterable[str]) -> dict:
    """`config` (nested dicts) with Hydra command-line overrides applied: ``train.lr=0.003``,
    ``+method.alpha_ratio=4.0``; a config group (``method=lora``) sets its ``name``; deletions are ignored."""
    out = json.loads(json.dumps(config))  # a deep copy
    for o in overrides:
        if not isinstance(o, str) or "=" not in o or o.startswith("~"):
            continue
        key, value = o.lstrip("+").split("=", 1)
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        if not parents and leaf in CONFIG_GROUPS:  # method=lora picks the group's file, named after it
            node[leaf] = (node[leaf] if isinstance(node.get(leaf), dict) else {}) | {"name": value}
        else:
            node[leaf] = _override_value(value)
    return out


def _checkpoint_log(folder: Path, warn: Callable[[str], None]) -> list[dict]:
    """The train_log a diverged run had at its last good checkpoint (empty when there is none)."""
    from adarank.runner.checkpoint import CKPT_NAME, load  # lazy: torch

    if not (folder / CKPT_NAME).exists():
        return []
    try:
        state = load(str(folder))
    except Exception as e:  # noqa: BLE001 - torch.load fails in many ways; the run still counts as diverged
        warn(f"warning: {folder / CKPT_NAME}: cannot read its train log ({type(e).__name__}: {e})")
        return []
    history = state.get("history") if isinstance(state, dict) else None
    return list((history or {}).get("log") or [])


def run_from_diverged(path: Path, warn: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """One diverged run (a diverged.json) for the norm study.

    Its settings come from Hydra's ``.hydra/config.yaml`` next to it when there is one, with the overrides in
    diverged.json applied on top (they are what the sweep varied: lr, alpha_ratio, r). Its curves are the
    train_log of its last good checkpoint, so the steps before the blow-up are still drawn.
    """
    import yaml

    info = json.loads(path.read_text())
    if not isinstance(info, dict):
        raise TypeError("not a JSON object")
    config: dict = {}
    hydra_cfg = path.parent / ".hydra" / "config.yaml"
    if hydra_cfg.is_file():
        try:
            loaded = yaml.safe_load(hydra_cfg.read_text())
            config = loaded if isinstance(loaded, dict) else {}
        except (OSError, yaml.YAMLError) as e:
            warn(f"warning: {hydra_cfg}: {e}")
    config = apply_overrides(config, info.get("overrides") or [])
    task = config.get("task")
    at = re.search(r"at step (\d+)", str(info.get("error") or ""))
    log = _checkpoint_log(path.parent, warn)
    return _method_params({"config": config}) | {
        "path": str(path), "task": task.get("name") if isinstance(task, dict) else task, "seed": config.get("seed"),
        "diverged": True, "diverged_at": int(at[1]) if at else None, "error": info.get("error"), "steps": None,
        "curves": {k: curve_of(log, k) for k in CURVES}, "metric": None, "val": None}


def load_runs(dirs: Sequence[str], warn: Callable[[str], None] = lambda m: None) -> list[dict]:
    """Every run under `dirs`: finished ones with a norm/max curve, and every diverged one."""
    results, diverged = find_runs(dirs)
    runs = []
    for path in results:
        try:
            record = read_record(path)
        except (OSError, ValueError, TypeError) as e:
            warn(f"warning: skipping {path}: {e}")
            continue
        run = run_from_results(record | {"path": str(path)})
        if not run["curves"]["norm/max"]:
            warn(f"warning: skipping {path}: no norm/max in its train_log (a method without our adapters?)")
            continue
        runs.append(run)
    for path in diverged:
        try:
            runs.append(run_from_diverged(path, warn))
        except (OSError, ValueError, TypeError) as e:
            warn(f"warning: skipping {path}: {e}")
    return runs


def _g(x: float | None) -> str:
    return "?" if x is None else f"{x:g}"


def group_label(kind: str | None, rank: int | None, ratio: float | None, lr: float | None,
                show_rank: bool = False) -> str:
    """``α/r=4, lr=0.001``; with ``, r=16`` when the study spans several ranks (`show_rank`), and the kind
    unless plain LoRA."""
    label = f"α/r={_g(ratio)}, lr={_g(lr)}" + (f", r={_g(rank)}" if show_rank else "")
    return label if kind == "lora" else f"{kind} {label}"


def _key_order(key: tuple) -> tuple:
    return tuple((x is None, x if isinstance(x, (int, float)) else 0, str(x)) for x in key)


def norm_groups(runs: Sequence[dict], early: float = 0.1) -> list[dict]:
    """Runs grouped by (kind, r, α/r, lr), seeds averaged; the indicators of each group's mean norm/max curve.

    T, the training length a group is measured against, is the longest finished run of the group; a group
    whose every seed diverged is measured against the longest finished run of the study (same data and
    epochs, so the length it would have had).
    """
    study_steps = max((x["steps"] for x in runs if not x["diverged"] and x["steps"]), default=None)
    show_rank = len({x["r"] for x in runs}) > 1
    by: dict[tuple, list[dict]] = defaultdict(list)
    for x in runs:
        by[(x["kind"], x["r"], x["ratio"], x["lr"])].append(x)
    groups = []
    for (kind, r, ratio, lr), rs in sorted(by.items(), key=lambda kv: _key_order(kv[0])):
        finished = [x for x in rs if not x["diverged"]]
        steps = max((x["steps"] for x in finished if x["steps"]), default=None) or study_steps
        curves = {k: mean_curve(x["curves"][k] for x in rs) for k in CURVES}
        vals = [x["val"] for x in finished if x["val"] is not None]
        metrics = {x["metric"] for x in finished if x["metric"]}
        groups.append({
            "label": group_label(kind, r, ratio, lr, show_rank), "kind": kind, "r": r, "ratio": ratio, "lr": lr,
            "seeds": sorted({x["seed"] for x in rs}, key=str), "runs": len(rs),
            "diverged": sum(x["diverged"] for x in rs),
            "diverged_at": sorted(x["diverged_at"] for x in rs if x["diverged_at"] is not None),
            "total_steps": steps,
            "norm_max": blowup_indicators(curves["norm/max"], steps, early) if curves["norm/max"] else None,
            "final_norm_mean": curves["norm/mean"][-1][1] if curves["norm/mean"] else None,
            "final_train_loss": curves["train/loss"][-1][1] if curves["train/loss"] else None,
            "val_metric": ", ".join(sorted(metrics)) or None,
            "final_val": float(np.mean(vals)) if vals else None, "curves": curves})
    return groups


def _ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    x, y = (a or {}).get(key), (b or {}).get(key)
    return x / y if x is not None and y else None


def compare_ratios(groups: Sequence[dict], high_ratio: float = HIGH_RATIO, ref_ratio: float = REF_RATIO,
                   blowup_factor: float = 2.0) -> list[dict]:
    """α/r = `high_ratio` against α/r = `ref_ratio`, for every LoRA (r, lr) run at both.

    For the same B·A, ΔW = (α/r)·B·A is high/ref times larger, so a norm ratio of high/ref is the scale
    alone. ``beyond_scale`` is the norm/max ratio at the early point divided by high/ref: above 1, B·A itself
    grew larger. ``blowup`` (the rule): True when α/r = high diverged and α/r = ref did not, or when
    beyond_scale >= `blowup_factor`; False when neither holds (or only α/r = ref diverged); None when both
    diverged (the lr alone explains it) or there is no early point to compare. ``final_ratio`` is None when either
    group diverged: its last logged step is not the end of training.
    """
    by = {(g["r"], g["lr"], g["ratio"]): g for g in groups if g["kind"] == "lora"}
    out = []
    for (r, lr, ratio), h in by.items():
        b = by.get((r, lr, ref_ratio))
        if ratio != high_ratio or b is None:
            continue
        h_div, b_div = h["diverged"] > 0, b["diverged"] > 0
        early, final, peak = (_ratio(h["norm_max"], b["norm_max"], k) for k in ("early", "final", "peak"))
        if h_div or b_div:
            final = None  # a diverged group's last logged step is not the end of training: not comparable
        beyond = early / (high_ratio / ref_ratio) if early is not None else None
        if h_div and b_div:
            blowup, why = None, "both diverged"
        elif h_div:
            blowup, why = True, f"α/r={high_ratio:g} diverged"
        elif b_div:
            blowup, why = False, f"only α/r={ref_ratio:g} diverged"
        elif beyond is None:
            blowup, why = None, "no early point"
        else:
            blowup = beyond >= blowup_factor
            why = f"beyond scale {beyond:.3g} {'>=' if blowup else '<'} {blowup_factor:g}"
        out.append({"r": r, "lr": lr, "high": h["label"], "ref": b["label"],
                    "early_ratio": early, "beyond_scale": beyond, "final_ratio": final, "peak_ratio": peak,
                    "diverged_high": f"{h['diverged']}/{h['runs']}", "diverged_ref": f"{b['diverged']}/{b['runs']}",
                    "blowup": blowup, "why": why})
    return sorted(out, key=lambda c: _key_order((c["r"], c["lr"])))


def claim_verdict(comparisons: Sequence[dict], lr_threshold: float = LR_THRESHOLD) -> dict[str, Any]:
    """Count the rule's blow-ups above and at-or-below `lr_threshold`; the claim holds where every
    comparison above the threshold is a blow-up."""
    def side(cs: list[dict]) -> dict[str, Any]:
        tested = [c for c in cs if c["blowup"] is not None]
        return {"comparisons": len(cs), "tested": len(tested), "blowup": sum(c["blowup"] for c in tested),
                "lrs": sorted({c["lr"] for c in cs})}
    above = side([c for c in comparisons if c["lr"] is not None and c["lr"] > lr_threshold])
    below = side([c for c in comparisons if c["lr"] is not None and c["lr"] <= lr_threshold])
    if not above["tested"]:
        verdict = "not tested (no comparison above the lr threshold the rule could decide)"
    elif above["blowup"] == above["tested"]:
        verdict = "supported"
    elif above["blowup"] == 0:
        verdict = "not supported"
    else:
        verdict = f"partly supported ({above['blowup']} of {above['tested']})"
    return {"lr_threshold": lr_threshold, "above": above, "at_or_below": below, "verdict": verdict}


def _f(x: float | None, spec: str = ".3g") -> str:
    return "—" if x is None else format(x, spec)


def _diverged_cell(g: dict) -> str:
    if not g["diverged"]:
        return "no"
    at = f", at step {', '.join(map(str, g['diverged_at']))}" if g["diverged_at"] else ""
    return f"yes ({g['diverged']}/{g['runs']}{at})"


def render_norms_markdown(groups: Sequence[dict], comparisons: Sequence[dict], verdict: dict, early: float,
                          blowup_factor: float, high_ratio: float = HIGH_RATIO, ref_ratio: float = REF_RATIO) -> str:
    """The text of ``norm_blowup.md``: the run groups, α/r = `high_ratio` against α/r = `ref_ratio` at each lr,
    and the verdict."""
    high, ref = high_ratio, ref_ratio
    e = f"{early:.0%}"
    metrics = sorted({g["val_metric"] for g in groups if g["val_metric"]})
    val_head = f"final val/{metrics[0]}" if len(metrics) == 1 else "final val metric"
    about = ("norm/max and norm/mean are ‖ΔW‖_F of the adapters, ΔW = (α/r)·B·A, the max and the mean over the "
             "adapted modules, from each run's train_log. Curves and numbers are means over seeds at each logged "
             "step; a seed that diverged counts up to its last good checkpoint (its train_log is read from "
             "checkpoint.pt).")
    head = (f"| run group | runs | diverged | T | norm/max at {e} | peak norm/max (step) | final norm/max "
            f"| at {e} ÷ final | ½ peak at | final norm/mean | final train loss | {val_head} |")
    lines = ["# Failure mode: adapter norm blow-up", "", f"Claim under test: {CLAIM}.", "", about, "",
             "## Run groups", "", head, "|---" * 12 + "|"]
    for g in groups:
        n = g["norm_max"] or {}
        val = _f(g["final_val"], ".4g")
        if len(metrics) != 1 and g["val_metric"] and g["final_val"] is not None:
            val = f"{g['val_metric']} {val}"
        lines.append(
            f"| {g['label']} | {g['runs']} | {_diverged_cell(g)} | {_f(g['total_steps'], 'd')} "
            f"| {_f(n.get('early'))} | {_f(n.get('peak'))} ({_f(n.get('peak_step'), 'd')}) | {_f(n.get('final'))} "
            f"| {_f(n.get('early_over_final'), '.2f')} | {_f(n.get('half_peak_frac'), '.0%')} "
            f"| {_f(g['final_norm_mean'])} | {_f(g['final_train_loss'], '.4g')} | {val} |")
    lines += [
        "",
        "- T: training length in steps (a group whose every seed diverged: the longest finished run).",
        (f"- norm/max at {e}: at the last logged step <= {early:g}·T. \"final\" is the last logged step "
         "(for a diverged group, the last before the blow-up)."),
        (f"- at {e} ÷ final: well below 1 for a norm that grows over the whole run; near or above 1 when it "
         f"reached its final size within the first {e} of training."),
        "- ½ peak at: the first step where norm/max reaches half its peak, as a share of T (small: grew early).",
        "", f"## α/r = {high:g} against α/r = {ref:g} at the same learning rate", "",
        (f"For the same B·A, ΔW at α/r = {high:g} is {high / ref:g}× that at α/r = {ref:g}: that much is the "
         f"scale alone. *Beyond scale* = (norm/max ratio at {e} of training) ÷ {high / ref:g}; above 1, B·A "
         f"itself grew larger. The rule calls a blow-up when α/r = {high:g} diverged and α/r = {ref:g} did "
         f"not, or when beyond scale >= {blowup_factor:g}."),
        ""]
    t = verdict["lr_threshold"]
    if comparisons:
        lines += [(f"| r | lr | lr > {t:g} | norm/max at {e}: {high:g} ÷ {ref:g} | beyond scale "
                   f"| final norm/max: {high:g} ÷ {ref:g} | peak: {high:g} ÷ {ref:g} | diverged ({high:g} / {ref:g}) "
                   "| blow-up by the rule |"), "|---" * 9 + "|"]
        for c in comparisons:
            rule = {True: "yes", False: "no", None: "undecided"}[c["blowup"]]
            lines.append(
                f"| {_g(c['r'])} | {_g(c['lr'])} | {'yes' if c['lr'] and c['lr'] > t else 'no'} "
                f"| {_f(c['early_ratio'])} | {_f(c['beyond_scale'])} | {_f(c['final_ratio'])} | {_f(c['peak_ratio'])} "
                f"| {c['diverged_high']} / {c['diverged_ref']} | {rule} ({c['why']}) |")
        for c in comparisons:
            if c["early_ratio"] is not None:
                where = f"lr = {_g(c['lr'])}" + ("" if c["r"] is None else f", r = {c['r']}")
                end = f"; at the end {c['final_ratio']:.3g}×." if c["final_ratio"] is not None else "."
                lines.append(f"\nAt {where}: norm/max at {e} of training at α/r = {high:g} is {c['early_ratio']:.3g}× "
                             f"that at α/r = {ref:g} ({c['beyond_scale']:.3g}× the {high / ref:g}× of the scale "
                             f"alone){end}")
    else:
        lines.append(f"No learning rate has LoRA runs at both α/r = {high:g} and α/r = {ref:g}.")
    a, b = verdict["above"], verdict["at_or_below"]
    lines += ["", "## Verdict", "",
              (f"- lr > {t:g}: the rule finds a blow-up in {a['blowup']} of {a['tested']} decided comparisons "
               f"({a['comparisons']} in all; lr = {', '.join(map(_g, a['lrs'])) or '—'})."),
              (f"- lr <= {t:g}: {b['blowup']} of {b['tested']} decided ({b['comparisons']} in all; "
               f"lr = {', '.join(map(_g, b['lrs'])) or '—'})."),
              f"- The claim is **{verdict['verdict']}** by these runs."]
    return "\n".join(lines) + "\n"


def norm_report(runs: Sequence[dict], out_dir: str | Path, early: float = 0.1, blowup_factor: float = 2.0,
                high_ratio: float = HIGH_RATIO, ref_ratio: float = REF_RATIO,
                lr_threshold: float = LR_THRESHOLD) -> dict[str, Any]:
    """Write ``norm_blowup.png``, ``norm_blowup.md`` and ``norm_blowup.json`` into `out_dir`; return what
    the JSON holds: claim, settings, groups (without their curves), comparisons, verdict, files."""
    if not any(x["curves"]["norm/max"] for x in runs):
        n_div = sum(x["diverged"] for x in runs)
        raise StudyError("no run has norm/max in its train_log" + (f" ({n_div} diverged without one)" if n_div else ""))
    tasks = {x["task"] for x in runs if x["task"] is not None}
    if len(tasks) > 1:
        raise StudyError(f"the runs span several tasks ({', '.join(sorted(map(str, tasks)))}); study one at a time")
    if not 0 < early < 1:
        raise StudyError(f"--early must be in (0, 1), got {early:g}")
    groups = norm_groups(runs, early)
    comparisons = compare_ratios(groups, high_ratio, ref_ratio, blowup_factor)
    verdict = claim_verdict(comparisons, lr_threshold)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = norm_blowup([{"label": g["label"], "ratio": g["ratio"], "lr": g["lr"], "diverged": g["diverged"] > 0,
                        "curves": g["curves"]} for g in groups], out / "norm_blowup.png",
                      title=f"adapter norm, {next(iter(tasks))}" if tasks else "adapter norm")
    atomic_write_text(out / "norm_blowup.md",
                      render_norms_markdown(groups, comparisons, verdict, early, blowup_factor, high_ratio, ref_ratio))
    files = [out / "norm_blowup.md", out / "norm_blowup.json", png]
    result = {"claim": CLAIM, "task": next(iter(tasks)) if tasks else None, "early": early,
              "blowup_factor": blowup_factor, "high_ratio": high_ratio, "ref_ratio": ref_ratio,
              "groups": [{k: v for k, v in g.items() if k != "curves"} for g in groups],
              "comparisons": comparisons, "verdict": verdict, "files": [str(f) for f in files if f is not None]}
    atomic_write_json(out / "norm_blowup.json", result)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--early", type=float, default=0.1, help="the early point, as a share of training")
    parser.add_argument("--blowup-factor", type=float, default=2.0,
                        help="the norm ratio beyond the α/r scale that counts as a blow-up")


def run(dirs: Sequence[str], out_dir: str | Path, early: float, blowup_factor: float) -> int:
    """The CLI's work: 0, or 2 with one line on stderr for bad input."""
    try:
        runs = load_runs(dirs, warn=lambda message: print(message, file=sys.stderr))
        res = norm_report(runs, out_dir, early, blowup_factor)
    except StudyError as e:
        print(f"rank_study: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"verdict": res["verdict"]["verdict"], "groups": [g["label"] for g in res["groups"]],
                      "files": res["files"]}, ensure_ascii=False))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adarank.studies.norm_study", description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="folders searched for results.json and diverged.json")
    parser.add_argument("--out", required=True, help="output folder")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args.dirs, args.out, args.early, args.blowup_factor)


if __name__ == "__main__":
    sys.exit(main())
