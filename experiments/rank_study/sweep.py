"""The seed article's rank / alpha recipe, run end to end: BBC news with SmolLM2, and MRPC with MiniLM.

    python experiments/rank_study/sweep.py --root multirun/rank_study --out results/rank_study --gpus 2
        [--studies bbc mrpc] [--per-gpu bbc=4 mrpc=12] [--ranks 4 8 16 32 64] [--spectrum-rank 16]
        [--lrs LR ...] [--launch-until S --kill-at S] [-- EXTRA HYDRA OVERRIDES]

Per study, the jobs (each `python -m adarank.run +experiment=rank_search_<study>_... resume=true`, see
experiments/jobqueue.py) are:
  * LoRA with α = r at every rank, and the α/r sweep 0.5, 2, 4 (BBC: at ranks 8, 16 and 32; MRPC: at every
    rank), so that the plateau rank has its α sweep whichever rank it turns out to be;
  * rsLoRA at a fixed α = 16, every rank;
  * adalora at the same final average ranks (α = r);
  * full fine-tuning once, for the spectrum comparison;
  * BBC only: the failure mode, α/r 1 and 4 at learning rates 1e-3 and 3e-3, norms logged every step;
  * with --lrs: LoRA (α = r), rsLoRA and adalora at every rank again at each of those learning rates, under
    <study>/lr<lr>/, each with its own rank_study report in --out/<study>/lr<lr>/ (full fine-tuning as the
    reference line).
Then, in `--out/<study>/`: `python -m adarank.studies.rank_study` (quality against rank per scaling, the plateau rank,
the best α/r), `python -m adarank.studies.norm_study` on the failure-mode runs, and `python -m adarank.analyze` on
LoRA, adalora and full fine-tuning at `--spectrum-rank` (singular values and effective ranks of ΔW).

A study whose jobs have not all ended gets no report (the command says what is missing); calling the
command again continues where it stopped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "experiments")]

from jobqueue import Job, run_queue

STUDIES = {
    # study: (metric for rank_study, lower is better, α-sweep ranks (None: every rank), default jobs per GPU)
    "bbc": ("val/ppl", True, (8, 16, 32), 4),
    "mrpc": ("val/f1", False, None, 12),
}
RATIOS = (0.5, 2.0, 4.0)  # α/r = 1 is the LoRA sweep itself
BLOWUP = [(ratio, lr) for ratio in (1.0, 4.0) for lr in (1e-3, 3e-3)]


def rank_sweep(folder: Path, exp: str, ranks: list[int], extra: list[str]) -> list[Job]:
    """LoRA (α = r), rsLoRA (fixed α) and adalora at every rank, into `folder`."""
    jobs = []
    for r in sorted(ranks, reverse=True):
        jobs += [Job(folder / f"lora_r{r}", [f"{exp}_lora", f"method.r={r}", *extra]),
                 Job(folder / f"rslora_r{r}", [f"{exp}_rslora", f"method.r={r}", *extra]),
                 Job(folder / f"adalora_r{r}", [f"{exp}_adalora", f"method.r={r}", *extra])]
    return jobs


def study_jobs(study: str, root: Path, ranks: list[int], extra: list[str], lrs: list[float] = ()) -> list[Job]:
    """Every run of one study: full fine-tuning, the rank sweeps at each of `lrs` (under `<study>/lr<lr>/`; the
    experiment's own learning rate stays the recipe's), the rank sweeps, the α sweeps, then the blow-up runs."""
    folder = root / study
    exp = f"+experiment=rank_search_{study}"
    jobs = [Job(folder / "full", [f"{exp}_lora", "method=full", *extra])]
    for lr in lrs:
        jobs += rank_sweep(folder / f"lr{lr:g}", exp, ranks, [f"train.lr={lr:g}", *extra])
    jobs += rank_sweep(folder, exp, ranks, extra)
    alpha_ranks = STUDIES[study][2] or ranks
    for r in alpha_ranks:
        if r not in ranks:
            continue
        # BBC has its own α experiment; on MRPC the LoRA experiment sweeps α/r itself
        alpha_exp = f"{exp}_alpha" if study == "bbc" else f"{exp}_lora"
        jobs += [Job(folder / f"lora_r{r}_a{a:g}", [alpha_exp, f"method.r={r}", f"method.alpha_ratio={a}", *extra])
                 for a in RATIOS]
    if study == "bbc":
        jobs += [Job(folder / f"blowup_a{ratio:g}_lr{lr:g}",
                     [f"{exp}_blowup", f"method.alpha_ratio={ratio}", f"train.lr={lr:g}", *extra])
                 for ratio, lr in BLOWUP]
    return jobs


def reports(study: str, root: Path, out: Path, spectrum_rank: int) -> None:
    """rank_study, norm_study and analyze over one finished study."""
    from adarank.studies import norm_study, rank_study
    from adarank.studies import spectra as analyze

    metric, lower, _, _ = STUDIES[study]
    folder, dest = root / study, out / study
    runs = [str(p) for p in sorted(folder.iterdir()) if p.is_dir() and p.name.startswith(("lora_", "rslora_", "adalora_", "full"))]
    flags = ["--metric", metric] + (["--lower-is-better"] if lower else [])
    codes = {"rank_study": rank_study.main([*runs, "--out", str(dest), *flags])}
    for lr_dir in sorted(folder.glob("lr*")):  # the rank sweeps again at another learning rate
        full = [str(folder / "full")] if (folder / "full" / "results.json").exists() else []
        codes[f"rank_study {lr_dir.name}"] = rank_study.main([str(lr_dir), *full, "--out", str(dest / lr_dir.name), *flags])
    blowups = sorted(str(p) for p in folder.glob("blowup_*"))
    if blowups:
        codes["norm_study"] = norm_study.main([*blowups, "--out", str(dest)])
    spectra = [str(folder / n) for n in (f"lora_r{spectrum_rank}", f"adalora_r{spectrum_rank}", "full")]
    codes["analyze"] = analyze.main([*spectra, "--out", str(dest / "spectra")])
    failed = {k: v for k, v in codes.items() if v}
    if failed:
        sys.exit(f"{study}: report step(s) failed: {failed}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="multirun/rank_study", help="where the runs go")
    ap.add_argument("--out", default="results/rank_study", help="where the reports go")
    ap.add_argument("--studies", nargs="+", default=list(STUDIES), choices=list(STUDIES))
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--per-gpu", nargs="*", default=[], metavar="STUDY=N", help="jobs per GPU, per study")
    ap.add_argument("--ranks", nargs="+", type=int, default=[4, 8, 16, 32, 64])
    ap.add_argument("--spectrum-rank", type=int, default=16)
    ap.add_argument("--lrs", nargs="*", type=float, default=[],
                    help="more learning rates: LoRA, rsLoRA and adalora at every rank again, under <study>/lr<lr>/")
    ap.add_argument("--launch-until", type=float, default=float("inf"))
    ap.add_argument("--kill-at", type=float, default=float("inf"))
    ap.add_argument("extra", nargs="*", help="more Hydra overrides for every job (after --)")
    args = ap.parse_args()

    per_gpu = {s: d[3] for s, d in STUDIES.items()}
    for item in args.per_gpu:
        study, _, n = item.partition("=")
        if study not in STUDIES or not n.isdigit():
            sys.exit(f"--per-gpu: expected STUDY=N with STUDY in {list(STUDIES)}, got {item!r}")
        per_gpu[study] = int(n)
    if args.spectrum_rank not in args.ranks:
        sys.exit(f"--spectrum-rank {args.spectrum_rank} is not one of --ranks {args.ranks}")
    root, out = (ROOT / args.root).resolve(), (ROOT / args.out).resolve()
    base = ["resume=true", "wandb.mode=disabled", "train.progress=false", f"data.cache_dir={root / 'cache'}", *args.extra]
    import time

    t0 = time.time()
    for study in args.studies:
        jobs = study_jobs(study, root, args.ranks, base, args.lrs)
        spent = time.time() - t0
        run_queue(jobs, args.gpus, per_gpu[study], args.launch_until - spent, args.kill_at - spent)
        missing = [j.out.name for j in jobs if not j.done()]
        if missing:
            print(f"{study}: {len(missing)} of {len(jobs)} runs not finished ({', '.join(missing)}); "
                  "run the command again to continue; no report yet", flush=True)
            continue
        reports(study, root, out, args.spectrum_rank)
        print(f"{study}: all {len(jobs)} runs ended; reports in {out / study}", flush=True)


if __name__ == "__main__":
    main()
