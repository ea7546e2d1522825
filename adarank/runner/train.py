"""The training loop, top to bottom: data, model and method, optimizer, the loop, results.

The loop owns the allocator: `OptimizerStep.step()` (step.py) calls it after every optimizer step, on
unscaled gradients, and adds the orthogonal regulariser's gradient itself. Nobody has to remember a hook.
What differs between methods comes from what their builder returns (methods.py), never from their names.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..quant import quantize_nf4_
from . import checkpoint as ckpt
from . import distributed as dist_
from . import events
from . import fsdp as fsdp_
from . import shapes
from . import speed
from .config import Config, TrainConfig
from .data import Batches, encode, load_task
from .data.buckets import resolve_buckets
from .eva_init import InitData
from .evaluation import Evaluator
from .gradient_checkpointing import enable_gradient_checkpointing
from .methods import Adapted, apply_method, build_allocator
from .models import load_causal_lm, load_model, load_tokenizer
from .monitor import NormWatch, adapter_norms, base_norms
from .provenance import code_sha256
from .resume import check_resumable
from .results import finish_run, load_finished
from .state import LoopState
from .step import OptimizerStep, trainable
from .tracking import Tracker

__all__ = ["train", "TrainingDiverged", "total_steps", "code_sha256"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


def train(cfg: Config, out_dir: str, log=print) -> dict[str, Any]:
    """Run one experiment into `out_dir`; returns what `results.json` holds."""
    t_start = time.time()
    os.makedirs(out_dir, exist_ok=True)
    tc = cfg.train
    env = setup_env(tc, log)
    device, dist, log = env.device, env.dist, env.log
    cfg, mode = speed.resolve(cfg, device.type, dist.world_size, env.amp)  # train.speed: the switches set
    tc = cfg.train
    log(mode.line())
    saved = ckpt.load(out_dir) if cfg.resume else None  # a fallback to the previous checkpoint warns on stderr
    if cfg.resume and saved is None and os.path.exists(os.path.join(out_dir, "results.json")):
        log(f"run in {out_dir} already finished; nothing to resume")
        return load_finished(out_dir)
    if saved is not None:  # before any data or model loads
        check_resumable(saved.get("config"), asdict(cfg), out_dir, log)

    data = prepare_data(cfg, env)
    T = total_steps(len(data.train), tc.epochs, tc.grad_accum, tc.max_steps)
    model, adapted, allocator = prepare_model(cfg, data, env, T, saved)
    log(f"{cfg.method.name}: {adapted.report.summary()}; T={T} optimizer steps")
    unit = make_optimizer(cfg, model, adapted, allocator, env, T, saved)
    loop = LoopState.start(device)
    if saved is not None:
        loop = LoopState.from_checkpoint(saved, device)
        rng = saved["rng"]
        ckpt.set_rng_state(rng[dist.rank] if isinstance(rng, list) else rng)
        log(f"resumed from step {loop.step}")
    compiler = shapes.Compiler(tc.batch_size, data.train.buckets) if tc.compile else None
    fwd, ddp = wrap(model, env, compiler)
    if env.fsdp:  # what trains is replicated under FSDP: its gradients are averaged once per step (fsdp.py)
        unit.sync_grads = lambda: fsdp_.average_grads(unit.params, dist)
    if tc.cuda_graph:
        unit.use_graphs(fwd, device.type, tc.cuda_graph_shapes)
        shapes.warn_graph_shapes(data.train, tc.cuda_graph_shapes, log)
    tracker = make_tracker(cfg, out_dir, loop, resumed=saved is not None, enabled=dist.is_main)
    evaluator = Evaluator(model, data.eval_sets, data.task, device, env.amp, tracker)
    checkpoints = Checkpoints(out_dir, env, last=loop.step if saved is not None else None, config=asdict(cfg))
    eval_every = tc.eval_every or math.ceil(len(data.train) / tc.grad_accum)
    ckpt_every = tc.checkpoint_every or eval_every
    watch = NormWatch(floors=base_norms(model))

    # ---- the loop ------------------------------------------------------------------------------
    model.train()
    bar = progress_bar(tc, T, loop.step, f"{cfg.method.name} {cfg.task.name}", dist.is_main)
    start_step, allocation = loop.step, None
    # this process's seconds outside the training steps; capture_from: graph capture time before the timer started
    timing = {"eval": 0.0, "checkpoint": 0.0, "capture_from": 0.0, "t_loop": time.perf_counter(), "timed_from": start_step}
    try:
        while loop.step < T:
            data.train.set_epoch(loop.epoch, loop.batch_in_epoch)
            micro = 0
            for batch in data.train:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                last_micro = (micro + 1) % tc.grad_accum == 0 or loop.batch_in_epoch + 1 >= len(data.train)
                # DDP all-reduces gradients only on the last micro-batch of an optimizer step
                loss = unit.micro(fwd, batch, ddp.no_sync() if dist.enabled and not last_micro else None)
                loop.add_loss(loss)
                loop.batch_in_epoch += 1
                micro += 1
                if micro % tc.grad_accum and loop.batch_in_epoch < len(data.train):
                    continue
                # ---- one optimizer step ----
                out = unit.step()
                loop.add_step(out.orth, out.allocation)
                events.record(loop.history, out.allocation)  # the per-module ranks at a masking event
                if out.allocation is not None:
                    allocation = out.allocation
                    if tc.check_masks:
                        dist_.check_equal(dist, allocation.mask, f"the allocator mask at step {loop.step}")
                if out.replaced and (dist.enabled or tc.compile):
                    fwd, ddp = wrap(model, env, compiler)  # DDP's gradient buckets were built for the old shapes
                unit.zero_grad()
                if loop.step == start_step + 1 and loop.step < T:
                    # the first step carries one-off set-up (cuBLAS handles, the caching allocator): not timed
                    restart_timer(timing, unit, device, loop.step)
                if loop.step % tc.log_every == 0 or loop.step == T:
                    scalars = log_step(loop, unit, allocation, model, watch, env, tracker, checkpoints)
                    if bar is not None:
                        bar.set_postfix({"loss": f"{scalars['train/loss']:.4f}"}
                                        | ({"budget": allocation.budget} if allocation is not None else {}))
                if bar is not None:
                    bar.update(1)
                done = loop.step >= T
                if loop.step % eval_every == 0 or done:
                    t0 = time.perf_counter()
                    res = evaluator.run(loop.step, loop.history)
                    timing["eval"] += time.perf_counter() - t0
                    say(f"step {loop.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in res.items()), log, bar)
                if loop.step % ckpt_every == 0 and not done:
                    # at an optimizer-step boundary, so resuming re-enters the loop exactly
                    timing["checkpoint"] += checkpoints.save(loop, model, unit)
                if done:
                    break
            if loop.step >= T:
                break
            loop.epoch += 1
            loop.batch_in_epoch = 0
    except BaseException:  # a crash or a kill: close the W&B run as failed, keep the checkpoint
        tracker.finish(exit_code=1)
        raise
    finally:
        if bar is not None:
            bar.close()

    # ---- results -------------------------------------------------------------------------------
    step_seconds = stop_timer(timing, unit, device)
    return finish_run(cfg, out_dir, model, adapted, allocation, loop, evaluator, tracker, env,
                      t_start=t_start, step_seconds=step_seconds, timed_from=timing["timed_from"],
                      shapes=shapes.shape_record(compiler, unit.graphs, data.train.buckets) | {"speed": mode.record()})


# ---- set-up --------------------------------------------------------------------------------------
@dataclass
class Env:
    """Where a run computes: the device, the processes (torchrun), autocast, and who talks."""

    device: torch.device
    dist: dist_.DistInfo
    amp: torch.dtype | None
    log: Callable[..., None]
    fsdp: bool = False  # train.distributed=fsdp under torchrun: the frozen base sharded (fsdp.py)


def setup_env(train_cfg: TrainConfig, log: Callable[..., None]) -> Env:
    """The device (one GPU per process under torchrun), the process group, autocast's dtype."""
    device = pick_device(train_cfg.device)
    dist = dist_.setup(device.type)  # torchrun: one process per GPU; a no-op otherwise
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    if device.type == "cuda" and device.index is not None:
        # what launches on the current device (Triton's kernels in method.fused, for one) follows the model: a
        # multirun job pinned to cuda:k would otherwise launch on cuda:0
        torch.cuda.set_device(device)
    if not dist.is_main:
        log = lambda *a, **k: None  # noqa: E731 - only rank 0 talks
    check_cuda_graph(train_cfg.cuda_graph, device, dist.world_size)
    fsdp = train_cfg.distributed == "fsdp"
    if fsdp and not dist.enabled:
        raise ValueError("train.distributed: fsdp needs several processes; launch with torchrun --nproc_per_node N "
                         "(or use the default, ddp)")
    return Env(device, dist, amp_dtype(train_cfg.precision, device), log, fsdp)


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


# ---- phases ----------------------------------------------------------------------------------------
@dataclass
class RunData:
    """The task, its tokenizer and its batches: `train` for training, `eval_sets` scored at evaluations."""

    task: Any
    tokenizer: Any
    train: Batches
    eval_sets: dict[str, Batches]


def prepare_data(cfg: Config, env: Env) -> RunData:
    """Load, subsample, tokenise (cached) and batch the task's splits. The test split is never scored."""
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
    tc, dist = cfg.train, env.dist
    train_batches = batcher(enc["train"], tc.batch_size, shuffle=True, seed=cfg.seed, rank=dist.rank,
                            world_size=dist.world_size, pin_memory=env.device.type == "cuda",
                            buckets=resolve_buckets(cfg.data.length_buckets, cfg.task.max_length))
    eval_sets = {k: batcher(v, tc.eval_batch_size, shuffle=False) for k, v in enc.items() if k not in ("train", "test")}
    return RunData(task, tokenizer, train_batches, eval_sets)


def prepare_model(cfg: Config, data: RunData, env: Env, total: int, saved: dict | None):
    """The base model with the method applied, on the device, and its allocator (None for fixed-rank
    methods); a resumed run's allocator state and trainable weights loaded."""
    mc = cfg.model
    model = load_base(cfg, data, env)
    adapted: Adapted = apply_method(model, cfg.method, mc)
    if adapted.init_from_data is not None:  # eva: ranks and A from training batches (resuming: the checkpoint's)
        adapted.init_from_data(InitData(data.train, env.device, env.dist, saved, env.log))
    model = adapted.model.to(env.device)
    allocator = build_allocator(adapted, cfg.method, total)
    if saved is not None and allocator is not None:
        allocator.load_state_dict(saved["allocator"])  # may shrink layers: before building the optimizer
    if saved is not None:
        ckpt.load_trainable_state(model, saved["model"])
    return model, adapted, allocator


def load_base(cfg: Config, data: RunData, env: Env) -> nn.Module:
    """The base model as the run's seed builds it (a random model's weights come from it), quantised where
    model.quantization says; `adarank.export_topk` rebuilds a finished run's base with it."""
    seed_everything(cfg.seed)
    mc, tokenizer = cfg.model, data.tokenizer
    if data.task.is_causal:
        model = load_causal_lm(mc.name_or_path, mc.dtype, mc.random_config, len(tokenizer), mc.config_overrides)
    else:
        model = load_model(mc.name_or_path, data.task.num_labels, mc.dtype, mc.random_config, len(tokenizer),
                           tokenizer.pad_token_id, mc.config_overrides)
    if cfg.train.gradient_checkpointing:  # on the transformers model itself, before adapters wrap its layers
        enable_gradient_checkpointing(model)
    quantize_base(model, cfg, env)
    return model


def quantize_base(model: nn.Module, cfg: Config, env: Env) -> None:
    """model.quantization=nf4: the base's linear layers to NF4 on the training device, before adapters wrap them."""
    if cfg.model.quantization == "none":
        return
    env.log(quantize_nf4_(model, cfg.model.train_modules, env.device).summary())
    if cfg.method.fused:
        env.log("method.fused: the NF4 layers take the unfused path (the fused GEMMs read a dense weight, and a "
                "dequantised copy would be held for backward); the dense ones stay fused")


def make_optimizer(cfg: Config, model: nn.Module, adapted: Adapted, allocator, env: Env, total: int,
                   saved: dict | None) -> OptimizerStep:
    """AdamW, the warm-up/linear-decay schedule and the loss scaler, restored from a checkpoint when resuming."""
    tc = cfg.train
    lr = applied_lr(cfg)
    # capturable: the step counter and learning rate live on the device, so a CUDA graph can replay the step
    opt = torch.optim.AdamW(trainable(model), lr=lr, weight_decay=tc.weight_decay, fused=env.device.type == "cuda",
                            capturable=tc.cuda_graph)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(round(tc.warmup_frac * total), total))
    scaler = torch.amp.GradScaler(env.device.type, enabled=env.amp == torch.float16)
    if saved is not None:
        opt.load_state_dict(saved["optimizer"])
        for g in opt.param_groups:  # the checkpoint's flag is that of the run that saved it
            g["capturable"] = g.get("capturable", False) or tc.cuda_graph
        sched.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
    return OptimizerStep(model, opt, sched, scaler, adapted.orth_grad, tc.max_grad_norm, allocator, tc.grad_accum, env.amp)


def applied_lr(cfg: Config) -> float:
    """The peak learning rate: method.lr when set, else train.lr."""
    return cfg.method.lr if cfg.method.lr is not None else cfg.train.lr


def wrap(model: nn.Module, env: Env, compiler: shapes.Compiler | None) -> tuple[Callable[..., Any], nn.Module]:
    """(what the loop calls, the module whose `no_sync` it uses): DDP averages gradients across ranks, FSDP
    shards the frozen base (train.distributed=fsdp: fsdp.py), compile fuses kernels (train.compile: the
    compiler's forward, shapes.py)."""
    net = model
    if env.fsdp:  # in place; a second call (after a shrink) changes nothing
        return fsdp_.shard(model), fsdp_.ReplicatedGrads()
    if env.dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    return (compiler.wrap(net) if compiler is not None else net), net


def make_tracker(cfg: Config, out_dir: str, loop: LoopState, resumed: bool, enabled: bool) -> Tracker:
    """W&B (or nothing), grouped by experiment; a resumed run continues its W&B run."""
    m = cfg.method
    tracker = Tracker(
        mode=cfg.wandb.mode, project=cfg.wandb.project, group=cfg.experiment_name, job_type=m.name,
        tags=[cfg.task.name, m.name, cfg.model.name], name=os.path.basename(os.path.normpath(out_dir)),
        config=asdict(cfg), out_dir=out_dir, run_id=loop.history["wandb_id"], resume=resumed, enabled=enabled,
    )
    loop.history["wandb_id"] = tracker.run_id
    return tracker


def say(msg: str, log: Callable[..., None], bar) -> None:
    """A line on its own, not on the progress bar's line: the bar is cleared, then drawn again below it."""
    if bar is not None:
        bar.clear()
    log(msg)
    if bar is not None:
        bar.refresh()


def progress_bar(train_cfg: TrainConfig, total: int, initial: int, desc: str, is_main: bool):
    if not (train_cfg.progress and is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr)


# ---- inside the loop -------------------------------------------------------------------------------
def log_step(loop: LoopState, unit: OptimizerStep, allocation, model: nn.Module, watch: NormWatch, env: Env,
             tracker: Tracker, checkpoints: "Checkpoints") -> dict[str, float]:
    """Log the mean loss and R since the last log, the lr, the adapter norms and the allocation; returns the
    scalars. Raises TrainingDiverged on a non-finite loss."""
    mean_loss = dist_.mean_over_ranks(env.dist, loop.loss_sum / max(loop.loss_n, 1)).item()
    if not math.isfinite(mean_loss):
        raise checkpoints.diverged(f"loss is {mean_loss}", loop.step)
    scalars: dict[str, float] = {"train/loss": mean_loss, "train/lr": unit.lr, "train/epoch": loop.epoch}
    if loop.orth_n:
        scalars["train/orth"] = (loop.orth_sum / loop.orth_n).item()  # R, before its weight
        loop.orth_sum.zero_()
        loop.orth_n = 0
    norms = {k: float(v) for k, v in adapter_norms(model).items()}
    scalars.update({f"norm/{k}": v for k, v in norms.items()})
    for msg in watch.check(norms, loop.epoch):
        env.log("WARNING: " + msg)
    if allocation is not None:
        scalars["alloc/budget"] = allocation.budget
        if allocation.threshold is not None:
            scalars["alloc/threshold"] = float(allocation.threshold)
        scalars.update({f"rank/{k}": v for k, v in allocation.rank_dict().items()})
    tracker.log(scalars, loop.step)
    # the local record (results.json): loss, lr, orth, budget and the norms' summary
    entry = {k: v for k, v in scalars.items() if not k.startswith(("norm/", "rank/"))}
    if norms:
        entry["norm/mean"] = sum(norms.values()) / len(norms)
        entry["norm/max"] = max(norms.values())
    loop.history["log"].append({"step": loop.step, **entry})
    loop.loss_sum.zero_()
    loop.loss_n = 0
    return scalars


class Checkpoints:
    """Writes the run's checkpoint (rank 0), never replacing a good one with a diverged one."""

    def __init__(self, out_dir: str, env: Env, last: int | None, config: dict[str, Any]) -> None:
        self.out_dir, self.env, self.config = out_dir, env, config  # the resolved config: resuming checks it
        self.path = os.path.join(out_dir, ckpt.CKPT_NAME)
        self.last = last  # the step of the checkpoint on disk (None before the first)

    def diverged(self, what: str, step: int) -> TrainingDiverged:
        """The error of a run that stopped at `step`, saying which checkpoint is kept."""
        kept = (f"The last good checkpoint (step {self.last}) is kept in {self.path}" if self.last is not None
                else "No checkpoint had been written yet")
        return TrainingDiverged(f"{what} at step {step}; stopped. {kept}")

    def save(self, loop: LoopState, model: nn.Module, unit: OptimizerStep) -> float:
        """Checkpoint at an optimizer-step boundary; returns the seconds it took."""
        t0 = time.perf_counter()
        # the loss of the steps since the last log, and the weights themselves (one step can overflow them
        # while its loss was still finite)
        if loop.loss_n and not torch.isfinite(loop.loss_sum).item():
            raise self.diverged("loss is not finite", loop.step)
        weights = ckpt.trainable_state(model)
        if not all(torch.isfinite(v).all() for v in weights.values()):
            raise self.diverged("trainable weights are not finite", loop.step)
        dist = self.env.dist
        rng = dist_.gather_objects(dist, ckpt.rng_state())  # every rank's RNG, so each resumes exactly
        if dist.is_main:
            allocator = unit.allocator
            ckpt.save(self.out_dir, {
                "model": weights, "optimizer": unit.optimizer.state_dict(), "scheduler": unit.scheduler.state_dict(),
                "scaler": unit.scaler.state_dict(), "allocator": allocator.state_dict() if allocator is not None else None,
                "rng": rng, "config": self.config, **loop.to_checkpoint(),
            })
        dist_.barrier(dist)
        self.last = loop.step
        return time.perf_counter() - t0


def restart_timer(timing: dict[str, float], unit: OptimizerStep, device: torch.device, step: int) -> None:
    """Start timing the steps here, at `step`: the first one carried one-off set-up."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timing["t_loop"], timing["timed_from"] = time.perf_counter(), step
    timing["eval"] = timing["checkpoint"] = 0.0
    timing["capture_from"] = unit.graphs.capture_seconds if unit.graphs is not None else 0.0


def stop_timer(timing: dict[str, float], unit: OptimizerStep, device: torch.device) -> float:
    """This process's seconds in training steps since the timer started (no evaluation, checkpoints, captures)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - timing["t_loop"] - timing["eval"] - timing["checkpoint"]
    if unit.graphs is not None:  # capturing a graph is one-off set-up too (once per batch shape)
        seconds -= unit.graphs.capture_seconds - timing["capture_from"]
    return seconds
