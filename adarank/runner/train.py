"""The training loop, top to bottom: data, model, method, allocator, optimisation, evaluation, results.

The loop owns the allocator: it calls `allocator.step()` after every optimizer step, on unscaled
gradients, and adds the orthogonal regulariser's gradient itself (`orth.orth_grad_`, the gradient of
weight·R in closed form, batched). Nobody has to remember a hook.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import checkpoint as ckpt
from . import distributed as dist_
from ..fast import graphs as graphs_
from ..allocator import RankAllocator
from ..atomic import atomic_write_json
from .config import Config
from .data import Batches, compute_metrics, encode, load_task
from .methods import Adapted, apply_method, build_allocator
from .models import load_causal_lm, load_model, load_tokenizer
from .monitor import NormWatch, adapter_norms, base_norms

__all__ = ["train", "TrainingDiverged", "total_steps"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device: {name} requested but no CUDA device is available")
    return torch.device(name)


def check_cuda_graph(enabled: bool, device: torch.device, world_size: int) -> None:
    """train.cuda_graph replays one process's step on one GPU."""
    if enabled and (device.type != "cuda" or world_size > 1):
        raise ValueError(f"train.cuda_graph: needs one CUDA device and one process, got {device.type} "
                         f"with {world_size} process{'es' if world_size > 1 else ''}")


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for plain fp32. CPU always trains in fp32."""
    if device.type != "cuda" or precision == "fp32":
        return None
    return torch.float16 if precision == "fp16" else torch.bfloat16


def total_steps(n_batches: int, epochs: float, grad_accum: int, max_steps: int | None) -> int:
    """T, derived from the data loader, the epochs and gradient accumulation (never asked of the user)."""
    if max_steps is not None:
        return max_steps
    # an epoch ends with a partial accumulation step, so it has ceil(n_batches / grad_accum) steps
    return max(1, math.ceil(epochs * math.ceil(n_batches / grad_accum)))


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "datasets", "peft", "hydra-core", "wandb", "numpy", "scipy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _git_sha() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5).stdout.strip() or None
    except Exception:
        return None


def code_sha256() -> str:
    """sha256 of the package's own source (every adarank/**/*.py, path and bytes, in path order): which code
    ran, also from an uncommitted tree or a copy without its .git, where `git_sha` says less or nothing."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, task, device: torch.device, amp: torch.dtype | None, prefix: str) -> dict[str, float]:
    if task.is_causal:  # held-out perplexity, token-weighted
        from .data.causal import perplexity

        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            res = perplexity(model, batches, device)
        return {f"{prefix}ppl": res["ppl"], f"{prefix}nll": res["nll"]}
    model.eval()
    preds, labels = [], []
    for batch in batches:
        labels.append(batch.pop("labels"))
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(**batch).logits
        preds.append(logits.float().cpu())
    model.train()
    return compute_metrics(task, torch.cat(preds).numpy(), torch.cat(labels).numpy(), prefix=prefix)


def train(cfg: Config, out_dir: str, log=print) -> dict[str, Any]:
    """Run one experiment into `out_dir`; returns what `results.json` holds."""
    from ..studies.plots import budget_curve, rank_heatmap
    from .tracking import Tracker

    t_start = time.time()
    os.makedirs(out_dir, exist_ok=True)
    m, tc = cfg.method, cfg.train
    device = pick_device(tc.device)
    dist = dist_.setup(device.type)  # torchrun: one process per GPU; a no-op otherwise
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    if device.type == "cuda" and device.index is not None:
        # what launches on the current device (Triton's kernels in method.fused, for one) follows the model: a
        # multirun job pinned to cuda:k would otherwise launch on cuda:0
        torch.cuda.set_device(device)
    if not dist.is_main:
        log = lambda *a, **k: None  # noqa: E731 - only rank 0 talks
    check_cuda_graph(tc.cuda_graph, device, dist.world_size)
    amp = amp_dtype(tc.precision, device)
    state = ckpt.load(out_dir) if cfg.resume else None
    if cfg.resume and os.path.exists(os.path.join(out_dir, "results.json")) and state is None:
        log(f"run in {out_dir} already finished; nothing to resume")
        import json

        with open(os.path.join(out_dir, "results.json")) as f:
            return json.load(f)

    # ---- data ----------------------------------------------------------------------------------
    seed_everything(cfg.seed)
    data = load_task(cfg.task.name, cfg.data.dir, cfg.seed, cfg.data.val_fraction, cfg.data.max_train_samples)
    task = data.task
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.tokenizer)
    if task.is_causal:
        from .data.causal import LMBatches, encode_lm

        if tokenizer.eos_token is None and tokenizer.sep_token is not None:
            tokenizer.eos_token = tokenizer.sep_token  # an encoder's tokenizer (tests): [SEP] separates documents
    cache = cfg.data.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "adarank")
    enc = {}
    for name, ds in data.splits.items():
        if name == "test":
            continue  # held out: never scored during development (tweets ships one)
        if name != "train" and cfg.data.max_eval_samples is not None and len(ds) > cfg.data.max_eval_samples:
            # a fixed random subset (seed 0, not the run seed): every run is scored on the same rows
            ds = ds.select(np.random.default_rng(0).permutation(len(ds))[: cfg.data.max_eval_samples])
        if task.is_causal:  # continued pretraining: packed blocks of task.max_length tokens
            enc[name] = encode_lm(list(ds[task.text_fields[0]]), tokenizer, cfg.task.max_length, "pretrain")
        else:
            enc[name] = encode(ds, tokenizer, task.text_fields, cfg.task.max_length, cache)
    batcher = LMBatches if task.is_causal else Batches
    # train.batch_size is per process: the global batch is batch_size × world_size × grad_accum
    train_batches = batcher(enc["train"], tc.batch_size, shuffle=True, seed=cfg.seed, rank=dist.rank,
                            world_size=dist.world_size, pin_memory=device.type == "cuda")
    eval_sets = {k: batcher(v, tc.eval_batch_size, shuffle=False) for k, v in enc.items() if k not in ("train", "test")}

    # ---- model and method ----------------------------------------------------------------------
    seed_everything(cfg.seed)
    if task.is_causal:
        model = load_causal_lm(cfg.model.name_or_path, cfg.model.dtype, cfg.model.random_config, len(tokenizer),
                               cfg.model.config_overrides)
    else:
        model = load_model(cfg.model.name_or_path, task.num_labels, cfg.model.dtype, cfg.model.random_config,
                           len(tokenizer), tokenizer.pad_token_id, cfg.model.config_overrides)
    adapted: Adapted = apply_method(model, m, cfg.model)
    model = adapted.model.to(device)
    full_init = _target_weights(model, adapted) if m.name == "full" else None  # for ΔW of full fine-tuning
    T = total_steps(len(train_batches), tc.epochs, tc.grad_accum, tc.max_steps)
    allocator = build_allocator(adapted, m, T)
    log(f"{m.name}: {adapted.report.summary()}; T={T} optimizer steps")

    start_step, epoch, batch_in_epoch = 0, 0, 0
    history: dict[str, Any] = {"budget_curve": [], "evals": [], "log": [], "best": None, "wandb_id": None}
    if state is not None and allocator is not None:
        allocator.load_state_dict(state["allocator"])  # may shrink layers: before building the optimizer
    if state is not None:
        ckpt.load_trainable_state(model, state["model"])

    params = [p for p in model.parameters() if p.requires_grad]
    lr = m.lr if m.lr is not None else tc.lr
    # capturable: the step counter and learning rate live on the device, so a CUDA graph can replay the step
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=tc.weight_decay, fused=device.type == "cuda", capturable=tc.cuda_graph)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(round(tc.warmup_frac * T), T))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        for g in opt.param_groups:  # the checkpoint's flag is that of the run that saved it
            g["capturable"] = g.get("capturable", False) or tc.cuda_graph
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        history = state["history"]
        history.setdefault("log", [])  # checkpoints written before the log existed
        rng = state["rng"]
        ckpt.set_rng_state(rng[dist.rank] if isinstance(rng, list) else rng)
        log(f"resumed from step {start_step}")

    def wrap() -> nn.Module:
        """The module the loop calls: DDP averages gradients across ranks, compile fuses kernels."""
        net = model
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        return torch.compile(net) if tc.compile else net

    fwd = wrap()
    ddp = fwd if dist.enabled and not tc.compile else getattr(fwd, "_orig_mod", fwd)

    def apply_update() -> torch.Tensor | None:
        """Everything between the last backward and the allocator; returns R when there is a regulariser."""
        scaler.unscale_(opt)  # the allocator and clipping see true gradients
        # the orthogonal regulariser: its gradient added explicitly, once per optimizer step (the same as
        # adding it to every micro-batch's loss / grad_accum), before clipping
        r = adapted.orth_grad() if adapted.orth_grad is not None else None
        if tc.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        scaler.step(opt)
        return r

    graphs, lr_tensors = None, []
    if tc.cuda_graph:
        lr_tensors = graphs_.bind_lr(opt)

        def loss_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            # no autocast cast cache: cached casts would outlive the capture that made them
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None, cache_enabled=False):
                return fwd(**batch).loss

        graphs = graphs_.GraphedStep(loss_of, apply_update, params, tc.grad_accum, tc.cuda_graph_shapes)

    tracker = Tracker(
        mode=cfg.wandb.mode, project=cfg.wandb.project, group=cfg.experiment_name, job_type=m.name,
        tags=[cfg.task.name, m.name, cfg.model.name], name=os.path.basename(os.path.normpath(out_dir)),
        config=_plain(cfg), out_dir=out_dir, run_id=history["wandb_id"], resume=state is not None,
        enabled=dist.is_main,
    )
    history["wandb_id"] = tracker.run_id
    main_key = f"{task.dev_splits[0]}/{task.main_metric}"
    val_key = f"val/{task.main_metric}"
    eval_every = tc.eval_every or math.ceil(len(train_batches) / tc.grad_accum)
    ckpt_every = tc.checkpoint_every or eval_every
    watch = NormWatch(floors=base_norms(model))

    # this process's seconds outside the training steps; capture_from: graph capture time before the timer started
    timing = {"eval": 0.0, "checkpoint": 0.0, "capture_from": 0.0}

    def run_eval(step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        res: dict[str, float] = {}
        # Every rank scores the full sets with the plain model (no DDP hooks), so all ranks agree on
        # the best step without a collective; only rank 0 logs.
        for name, b in eval_sets.items():
            res.update(evaluate(model, b, task, device, amp, prefix=f"{name}/"))
        history["evals"].append({"step": step, **res})
        best = history["best"]
        better = (lambda a, b: a > b) if task.higher_is_better else (lambda a, b: a < b)
        if best is None or better(res[val_key], best[val_key]):
            history["best"] = {"step": step, **res}
        tracker.log({f"eval/{k}": v for k, v in res.items()}, step)
        timing["eval"] += time.perf_counter() - t0
        return res

    last_ckpt = start_step if state is not None else None  # step of the checkpoint on disk

    def diverged(what: str) -> TrainingDiverged:
        kept = (
            f"The last good checkpoint (step {last_ckpt}) is kept in {os.path.join(out_dir, ckpt.CKPT_NAME)}"
            if last_ckpt is not None else "No checkpoint had been written yet"
        )
        return TrainingDiverged(f"{what} at step {step}; stopped. {kept}")

    def save_checkpoint(step: int) -> None:
        nonlocal last_ckpt
        t0 = time.perf_counter()
        # Never replace a good checkpoint with a diverged one: the loss of the steps since the last log,
        # and the weights themselves (one step can overflow them while its loss was still finite).
        if loss_n and not torch.isfinite(loss_sum).item():
            raise diverged("loss is not finite")
        weights = ckpt.trainable_state(model)
        if not all(torch.isfinite(v).all() for v in weights.values()):
            raise diverged("trainable weights are not finite")
        rng = dist_.gather_objects(dist, ckpt.rng_state())  # every rank's RNG, so each resumes exactly
        if dist.is_main:
            ckpt.save(out_dir, {
                "model": weights, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(), "allocator": allocator.state_dict() if allocator is not None else None,
                "rng": rng, "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "history": history,
                # the loss and R logged next average over the same steps as in an uninterrupted run
                "loss_sum": loss_sum.item(), "loss_n": loss_n, "orth_sum": orth_sum.item(), "orth_n": orth_n,
            })
        dist_.barrier(dist)
        last_ckpt = step
        timing["checkpoint"] += time.perf_counter() - t0

    # ---- the loop ------------------------------------------------------------------------------
    model.train()
    step = start_step
    bar = None
    if tc.progress and dist.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=T, initial=step, desc=f"{m.name} {cfg.task.name}", dynamic_ncols=True, file=sys.stderr)
    # torch.tensor(float) restores a float32 sum exactly
    loss_sum = torch.tensor(state.get("loss_sum", 0.0) if state is not None else 0.0, device=device)
    orth_sum = torch.tensor(state.get("orth_sum", 0.0) if state is not None else 0.0, device=device)
    orth_n = state.get("orth_n", 0) if state is not None else 0
    loss_n = state.get("loss_n", 0) if state is not None else 0
    alloc_res = None
    t_loop, timed_from = time.perf_counter(), start_step
    try:
        while step < T:
            train_batches.set_epoch(epoch, batch_in_epoch)
            micro = 0
            for batch in train_batches:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                last_micro = (micro + 1) % tc.grad_accum == 0 or batch_in_epoch + 1 >= len(train_batches)
                # DDP all-reduces gradients only on the last micro-batch of an optimizer step
                sync = ddp.no_sync() if dist.enabled and not last_micro else contextlib.nullcontext()
                if graphs is not None:
                    loss = graphs.micro(batch)
                else:
                    with sync:
                        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                            loss = fwd(**batch).loss
                        scaler.scale(loss / tc.grad_accum).backward()
                loss_sum += loss.detach().float()
                loss_n += 1
                batch_in_epoch += 1
                micro += 1
                if micro % tc.grad_accum and batch_in_epoch < len(train_batches):
                    continue
                # ---- one optimizer step ----
                scale_before = scaler.get_scale() if scaler.is_enabled() else None
                r = graphs.update() if graphs is not None else apply_update()
                if r is not None:
                    orth_sum += r.to(device)
                    orth_n += 1
                scaler.update()
                skipped = scale_before is not None and scaler.get_scale() < scale_before
                sched.step()
                if graphs is not None:
                    graphs_.sync_lr(opt, lr_tensors)
                step += 1
                if allocator is not None:
                    # the gradients are DDP's averages here, so every rank computes the same masks
                    alloc_res = allocator.step(update_importance=not skipped)
                    history["budget_curve"].append([step, alloc_res.budget])
                    if tc.check_masks and isinstance(allocator, RankAllocator):
                        dist_.check_equal(dist, allocator.mask, f"the allocator mask at step {step}")
                    if alloc_res.phase == "final" and m.shrink and m.name == "adalora" and not allocator.shrunk:
                        allocator.shrink(opt)
                        params = [p for p in model.parameters() if p.requires_grad]
                        if graphs is not None:
                            graphs.reset(params)  # new parameters: new gradient buffers, new graphs
                        if dist.enabled or tc.compile:
                            fwd = wrap()  # DDP's gradient buckets were built for the old shapes
                            ddp = fwd if dist.enabled and not tc.compile else getattr(fwd, "_orig_mod", fwd)
                if graphs is not None:
                    graphs.zero_grads()
                else:
                    opt.zero_grad(set_to_none=True)
                if step == start_step + 1 and step < T:
                    # the first step carries one-off set-up (cuBLAS handles, the caching allocator): not timed
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    t_loop, timed_from = time.perf_counter(), step
                    timing["eval"] = timing["checkpoint"] = 0.0
                    timing["capture_from"] = graphs.capture_seconds if graphs is not None else 0.0

                if step % tc.log_every == 0 or step == T:
                    mean_loss = dist_.mean_over_ranks(dist, loss_sum / max(loss_n, 1)).item()
                    if not math.isfinite(mean_loss):
                        raise diverged(f"loss is {mean_loss}")
                    scalars: dict[str, float] = {"train/loss": mean_loss, "train/lr": float(sched.get_last_lr()[0]), "train/epoch": epoch}
                    if orth_n:
                        scalars["train/orth"] = (orth_sum / orth_n).item()  # R, before its weight
                        orth_sum.zero_()
                        orth_n = 0
                    norms = {k: float(v) for k, v in adapter_norms(model).items()}
                    scalars.update({f"norm/{k}": v for k, v in norms.items()})
                    for msg in watch.check(norms, epoch):
                        log("WARNING: " + msg)
                    if alloc_res is not None:
                        scalars["alloc/budget"] = alloc_res.budget
                        if alloc_res.threshold is not None:
                            scalars["alloc/threshold"] = float(alloc_res.threshold)
                        scalars.update({f"rank/{k}": v for k, v in alloc_res.rank_dict().items()})
                    tracker.log(scalars, step)
                    # the local record (results.json): loss, lr, orth, budget and the norms' summary
                    entry = {k: v for k, v in scalars.items() if not k.startswith(("norm/", "rank/"))}
                    if norms:
                        entry["norm/mean"] = sum(norms.values()) / len(norms)
                        entry["norm/max"] = max(norms.values())
                    history["log"].append({"step": step, **entry})
                    if bar is not None:
                        post = {"loss": f"{mean_loss:.4f}"}
                        if alloc_res is not None:
                            post["budget"] = alloc_res.budget
                        bar.set_postfix(post)
                    loss_sum.zero_()
                    loss_n = 0
                if bar is not None:
                    bar.update(1)
                done = step >= T
                if step % eval_every == 0 or done:
                    res = run_eval(step)
                    log(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in res.items()))
                if step % ckpt_every == 0 and not done:
                    save_checkpoint(step)  # at an optimizer-step boundary, so resuming re-enters the loop exactly
                if done:
                    break
            if step >= T:
                break
            epoch += 1
            batch_in_epoch = 0
    except BaseException:  # a crash or a kill: close the W&B run as failed, keep the checkpoint
        tracker.finish(exit_code=1)
        raise
    finally:
        if bar is not None:
            bar.close()

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    loop_seconds = time.perf_counter() - t_loop
    step_seconds = loop_seconds - timing["eval"] - timing["checkpoint"]
    if graphs is not None:  # capturing a graph is one-off set-up too (once per batch shape)
        step_seconds -= graphs.capture_seconds - timing["capture_from"]

    # ---- results -------------------------------------------------------------------------------
    final = history["evals"][-1] if history["evals"] and history["evals"][-1]["step"] == step else run_eval(step)
    best = history["best"]
    ranks = alloc_res.rank_dict() if alloc_res is not None else {}
    if allocator is not None and alloc_res is None:
        ranks = dict(zip(allocator.names, allocator.ranks().tolist()))
    if ranks:
        path = rank_heatmap(ranks, os.path.join(out_dir, "rank_heatmap.png"), title=f"{m.name} {cfg.task.name}")
        tracker.log_ranks(ranks, step)
        if path:
            tracker.log_image("rank_heatmap", path, step)
    if history["budget_curve"]:
        bpath = budget_curve(history["budget_curve"], os.path.join(out_dir, "budget_curve.png"), title=f"{m.name} {cfg.task.name}")
        if bpath:
            tracker.log_image("budget_curve", bpath, step)
    # the final average rank: method.r, or what a total-rank / parameter target resolved to
    budget: float | None = None if m.name == "full" else m.r
    if adapted.target_total and adapted.targets:
        avg = adapted.target_total / len(adapted.targets)
        budget = int(avg) if avg == int(avg) else round(avg, 3)
    results = {
        "experiment": cfg.experiment_name, "task": cfg.task.name, "method": m.name, "model": cfg.model.name,
        "budget": budget, "seed": cfg.seed, "metric": task.main_metric,
        "value": final[main_key], "best_value": best[main_key],
        "metrics": {"final": final, "best": best, "best_step": best["step"]},
        "trainable_params": adapted.report.trainable, "trainable_share": adapted.report.share,
        # after a shrink (or rank-0 pruning) the adapters are smaller than at the start
        "trainable_params_final": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "steps": step, "seconds": round(time.time() - t_start, 2),
        # this process's training steps after its first (no evaluation, no checkpoints): the throughput
        "train_seconds": round(step_seconds, 3), "steps_per_second": round((step - timed_from) / step_seconds, 3) if step_seconds > 0 else None,
        "world_size": dist.world_size,
        "final_ranks": ranks, "budget_curve": history["budget_curve"],
        "evals": history["evals"], "train_log": history["log"],
        "config": _plain(cfg), "git_sha": _git_sha(), "code_sha256": code_sha256(), "versions": _versions(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
    }
    if dist.is_main:
        save_trained(model, adapted, m.name, list(cfg.model.train_modules), out_dir, full_init)
        atomic_write_json(os.path.join(out_dir, "results.json"), results)
    tracker.summary({"final/" + k: v for k, v in final.items()} | {"best/" + k: v for k, v in best.items()})
    tracker.finish()
    dist_.barrier(dist)
    ck = os.path.join(out_dir, ckpt.CKPT_NAME)
    if dist.is_main and os.path.exists(ck):
        os.remove(ck)  # the run finished: results.json is the record, the checkpoint is obsolete
    return results


def _target_weights(model: nn.Module, adapted: Adapted) -> dict[str, torch.Tensor]:
    """CPU copies of the weights of the adapter targets, to write ΔW of full fine-tuning at the end."""
    return {n: model.get_submodule(n).weight.detach().float().cpu().clone() for n in adapted.targets}


def save_trained(model: nn.Module, adapted: Adapted, method: str, train_modules: list[str], out_dir: str,
                 full_init: dict[str, torch.Tensor] | None) -> None:
    """What a run trained: `adapter/` in PEFT's LoRA format (servable as is), or `delta.safetensors`
    (ΔW = W_end − W_start of the adapter targets) for full fine-tuning. `adarank.studies.spectra` reads both."""
    from safetensors.torch import save

    from ..atomic import atomic_write_bytes
    from ..export import export_peft

    if method in ("lora", "rslora", "adalora"):
        export_peft(model, os.path.join(out_dir, "adapter"), modules_to_save=train_modules)
    elif method in ("peft_lora", "peft_adalora"):
        model.save_pretrained(os.path.join(out_dir, "adapter"))
    elif full_init is not None:
        delta = {n: (model.get_submodule(n).weight.detach().float().cpu() - w0).contiguous() for n, w0 in full_init.items()}
        atomic_write_bytes(os.path.join(out_dir, "delta.safetensors"), save(delta))


def _plain(cfg: Config) -> dict[str, Any]:
    return asdict(cfg)
