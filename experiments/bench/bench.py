"""Training-step benchmark: adarank's adapters and allocator against PEFT and a frozen floor, one GPU.

    python experiments/bench/bench.py --out results/bench/h200.json [--workloads W1,W2,W3]
        [--variants lora,adalora] [--steps 30] [--warmup 10] [--fused] [--ckpt] [--graph] [--compile] [--profile DIR]
        [--smoke]

Every (workload, variant) pair builds a fresh random-init model from a config (no downloads), applies
the variant, runs `--warmup` steps, then times `--steps` steps one by one (CUDA-synchronised around
each) and reports the median, p10 and p90 and the peak memory. A step is the runner's own step unit
(`adarank.runner.step.OptimizerStep`): forward + loss + backward under bf16 autocast, then the orth
gradient, AdamW and the allocator (no clipping, constant learning rate). README.md in this folder explains the
variants and the output. `--smoke` runs tiny configs on a CPU in seconds (the test uses it).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

import adarank
from adarank.atomic import atomic_write_json, atomic_write_text
from adarank.layers import base_dims
from adarank.orth import OrthGrad
from adarank.runner.gradient_checkpointing import enable_gradient_checkpointing
from adarank.runner.peft_baselines import PeftAllocator, peft_task_type
from adarank.runner.step import OptimizerStep

# ---- fixed hyper-parameters (the speed of a step does not depend on their values) ----------------
R = 8  # LoRA rank, and AdaLoRA's target average rank
INIT_R = 12  # AdaLoRA's initial rank (1.5 x 8, the paper's ratio)
ALPHA = 16.0  # as in conf/method/*.yaml
ORTH_WEIGHT = 0.1
LR = 1e-4
#: Schedule length of the masking variants. Long enough that every timed step is in the budgeting
#: phase (t_init = t_final = 0, delta_t = 1: a new mask at every step, the allocator's worst case),
#: short enough that the budget really decreases (k = init - budget >= 1 from step 1 on).
BUDGET_STEPS = 10_000

VARIANTS = ("floor", "peft_lora", "peft_adalora", "lora", "rslora", "adalora", "adalora_final")
COMPILABLE = ("floor", "lora", "rslora", "adalora", "adalora_final")  # ours (and the floor); the allocator stays eager
#: the modes a variant name can end in: "+compile" (torch.compile of the blocks) and "+graph" (CUDA-graph
#: replay of the step, adarank.fast.graphs.GraphedStep, as train.cuda_graph runs it); both for COMPILABLE only
MODES = ("compile", "graph")
#: "+fused" before the mode: adapters built with method.fused (adarank/fast/fused.py)
FUSABLE = ("lora", "rslora", "adalora", "adalora_final")
#: what --compile adds. rslora+compile differs from lora+compile only in a constant, so it would cost a
#: full compilation to learn nothing; ask for it by name.
COMPILE_DEFAULT = ("floor", "lora", "adalora", "adalora_final")
GRAPH_DEFAULT = COMPILE_DEFAULT  # what --graph adds
FUSED_DEFAULT = ("lora", "adalora", "adalora_final")  # what --fused adds (also with +graph under --graph)
#: "+ckpt" after "+fused" (if any), before the mode: the model's blocks under gradient checkpointing, as
#: train.gradient_checkpointing=true runs them (adarank/runner/gradient_checkpointing.py); for every variant.
#: --ckpt adds the +ckpt twin of every variant of the run.
CKPT = "ckpt"


def split_variant(name: str) -> tuple[str, bool, str]:
    """"lora+fused+graph" -> ("lora", True, "graph"); a plain name is unfused with mode "eager". A "+ckpt"
    after "+fused" is allowed and left out here (`checkpointed` reads it)."""
    base, *mods = name.split("+")
    fused = mods[:1] == ["fused"]
    rest = mods[1:] if fused else mods
    if rest[:1] == [CKPT]:
        rest = rest[1:]
    if len(rest) > 1 or (rest and rest[0] not in MODES) or base not in VARIANTS \
            or (fused and base not in FUSABLE) or (rest and base not in COMPILABLE):
        raise ValueError(f"--variants: unknown variant {name!r}; choose from {', '.join(VARIANTS)}, with +fused "
                         f"for {', '.join(FUSABLE)}, then +ckpt, then +compile or +graph for {', '.join(COMPILABLE)}")
    return base, fused, rest[0] if rest else "eager"


def checkpointed(name: str) -> bool:
    """Whether the variant runs under gradient checkpointing ("+ckpt")."""
    return CKPT in name.split("+")[1:]


def with_ckpt(name: str) -> str:
    """The +ckpt twin of a variant: "lora+fused+graph" -> "lora+fused+ckpt+graph"."""
    base, fused, mode = split_variant(name)
    return base + ("+fused" if fused else "") + f"+{CKPT}" + ("" if mode == "eager" else f"+{mode}")


def all_variant_names() -> list[str]:
    """Every valid variant name, in the order tables list them."""
    out = []
    for mode in ("", "+graph", "+compile"):
        for fused in ("", "+fused"):
            for ckpt in ("", f"+{CKPT}"):
                out += [f"{v}{fused}{ckpt}{mode}" for v in VARIANTS
                        if (not fused or v in FUSABLE) and (not mode or v in COMPILABLE)]
    return out


# ---- workloads ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """One model shape and batch. `size` and `smoke_size` are the config fields that differ."""

    name: str
    model: str  # what the shape imitates
    task: str  # "cls" (sequence classification, 2 labels) or "lm" (causal LM, labels = inputs)
    size: dict
    smoke_size: dict
    batch: tuple[int, int]  # (batch, sequence length)
    targets: tuple[str, ...]
    base_dtype: torch.dtype  # dtype of the frozen base weights

    def config(self, smoke: bool):
        size = self.smoke_size if smoke else self.size
        if self.task == "cls":
            from transformers import DebertaV2Config

            # microsoft/deberta-v3-base's config.json, apart from the size fields
            return DebertaV2Config(
                **size, relative_attention=True, pos_att_type="p2c|c2p", max_relative_positions=-1,
                norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False, type_vocab_size=0,
                max_position_embeddings=512, layer_norm_eps=1e-7, hidden_act="gelu", num_labels=2,
            )
        from transformers import LlamaConfig

        # use_cache=False: training needs no KV cache (and filling one per layer defeats regional compile)
        return LlamaConfig(**size, max_position_embeddings=2048, tie_word_embeddings=False, use_cache=False)


LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WORKLOADS = {
    "W1": Workload(
        "W1", "deberta-v3-base", "cls",
        size=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                  vocab_size=128100, position_buckets=256),
        smoke_size=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        vocab_size=1000, position_buckets=16),
        batch=(32, 128),
        # "output.dense" also matches attention.output.dense; listed anyway so the six types are explicit
        targets=("query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense", "output.dense"),
        base_dtype=torch.float32,
    ),
    "W2": Workload(
        "W2", "llama ~1.1B (TinyLlama shape)", "lm",
        size=dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                  intermediate_size=5632, vocab_size=32000),
        smoke_size=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=128, vocab_size=1000),
        batch=(8, 1024), targets=LLAMA_TARGETS, base_dtype=torch.bfloat16,
    ),
    "W3": Workload(
        "W3", "deep narrow llama (80 layers)", "lm",
        size=dict(hidden_size=1024, num_hidden_layers=80, num_attention_heads=16, num_key_value_heads=4,
                  intermediate_size=2816, vocab_size=32000),
        smoke_size=dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=64, vocab_size=1000),
        batch=(8, 1024), targets=LLAMA_TARGETS, base_dtype=torch.bfloat16,
    ),
}
SMOKE_BATCH = (2, 16)


def build_model(wl: Workload, smoke: bool, device: torch.device) -> nn.Module:
    """Random-init model, built directly on `device` (initialising 1B parameters on a CPU takes long)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)  # every variant of a workload starts from the same weights
    with torch.device(device):
        if wl.task == "cls":  # DeBERTa's disentangled attention has no SDPA path
            model = AutoModelForSequenceClassification.from_config(wl.config(smoke), dtype=wl.base_dtype)
        else:
            model = AutoModelForCausalLM.from_config(wl.config(smoke), dtype=wl.base_dtype, attn_implementation="sdpa")
    # .to: a no-op when the device context did its job; dropout stays on, as in fine-tuning
    return model.to(device).train()


def make_batch(wl: Workload, vocab: int, batch: tuple[int, int], device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    b, s = batch
    ids = torch.randint(0, vocab, (b, s), generator=g)
    if wl.task == "cls":
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (b,), generator=g)}
    else:
        out = {"input_ids": ids, "labels": ids}  # no padding: SDPA takes its causal fast path
    return {k: v.to(device) for k, v in out.items()}


# ---- variants -----------------------------------------------------------------------------------
@dataclass
class Rig:
    """A model with a variant applied, and the training step that drives it: the runner's own
    `OptimizerStep` (adarank/runner/step.py), so the benchmark times the step users run."""

    model: nn.Module
    fwd: Callable[..., Any]  # what the loop calls: the model, or its torch.compile'd form
    step: OptimizerStep | None = None  # None for the floor: forward and backward only
    allocator: adarank.RankAllocator | None = None
    info: dict = field(default_factory=dict)


def build_rig(variant: str, model: nn.Module, wl: Workload, device: torch.device, capturable: bool = False,
              fused: bool = False) -> Rig:
    """Apply `variant` (the base name) to `model`. Only adapter parameters train; heads stay frozen
    so that every variant does the same work outside the adapters. `capturable`: an optimizer a CUDA
    graph can replay (as train.cuda_graph builds it). `fused`: adapters with method.fused. The step has
    no clipping and a constant learning rate (the speed of a step does not depend on them)."""
    targets = list(wl.targets)
    if variant == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()  # the embedding output requires grad: backward runs to the inputs
        return Rig(model, model, step=OptimizerStep(model, None, amp=torch.bfloat16))
    rig = Rig(model, model, info={"n_adapted": len(adarank.find_targets(model, targets))})
    allocator, orth = None, None
    if variant in ("peft_lora", "peft_adalora"):
        import peft

        # the task type makes get_peft_model return the class whose forward reaches AdaLoraModel.forward,
        # which adds the orth loss (a plain PeftModel skips it; before this fix the PEFT AdaLoRA timings did)
        common = dict(target_modules=targets, lora_alpha=ALPHA, lora_dropout=0.0, task_type=peft_task_type(model))
        if variant == "peft_lora":
            model = peft.get_peft_model(model, peft.LoraConfig(r=R, **common))
        else:
            cfg = peft.AdaLoraConfig(init_r=INIT_R, target_r=R, tinit=0, tfinal=0, deltaT=1, total_step=BUDGET_STEPS,
                                     orth_reg_weight=ORTH_WEIGHT, **common)  # its forward adds the orth loss
            model = peft.get_peft_model(model, cfg)
            allocator = PeftAllocator(model, adarank.make_schedule(BUDGET_STEPS, 0.0, 0.0, 1))  # as the runner drives it
        rig.model = rig.fwd = model
    elif variant in ("lora", "rslora"):
        adarank.inject(model, "lora", r=R, alpha=ALPHA, targets=targets, rslora=variant == "rslora", fused=fused)
    elif variant in ("adalora", "adalora_final"):
        shapes = [base_dims(model.get_submodule(n)) for n in adarank.find_targets(model, targets)]
        budget = adarank.resolve_budget(shapes, target_rank=R, init_rank=INIT_R)
        adarank.inject(model, "svd", r=budget.init_rank, alpha=ALPHA, targets=targets, fused=fused)
        named = adarank.svd_adapters(model)
        # adalora: every timed step masks. adalora_final: 3 budgeting steps, the final mask at step 4,
        # then the shrink hand-off (during `settle`), so the timed steps run the shrunk adapters.
        schedule = (adarank.make_schedule(BUDGET_STEPS, 0.0, 0.0, 1) if variant == "adalora"
                    else adarank.make_schedule(8, 0.0, 0.5, 1))
        allocator = rig.allocator = adarank.RankAllocator(named, schedule, budget.target_total, shrink_at_final=True)
        # as the runner does: the regulariser's gradient in closed form, added after backward
        orth = OrthGrad([m for _, m in named], ORTH_WEIGHT)
    else:
        raise ValueError(f"--variants: unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")

    params = [p for p in rig.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, fused=device.type == "cuda", capturable=capturable)
    rig.step = OptimizerStep(rig.model, opt, orth_grad=orth, allocator=allocator, amp=torch.bfloat16)
    rig.info["trainable_params"] = sum(p.numel() for p in params)
    return rig


def settle(rig: Rig, batch: dict) -> None:
    """adalora_final: train until the final mask is fixed and the step's shrink hand-off has shrunk the
    adapters (slicing the optimizer state)."""
    while not rig.allocator.shrunk:
        train_step(rig, batch)
    ranks = rig.allocator.ranks()
    rig.info["ranks_after_shrink"] = {"total": int(ranks.sum()), "min": int(ranks.min()), "max": int(ranks.max())}


def compile_model(rig: Rig, scope: str, backend: str, mode: str | None = None) -> None:
    """torch.compile the model. scope "blocks" compiles each transformer block in place (regional
    compilation: identical blocks share one compiled graph, so an 80-layer model compiles about as fast
    as a 1-layer one); "model" compiles the whole forward. `mode`: torch.compile's (e.g. reduce-overhead:
    inductor's CUDA-graph trees)."""
    if scope == "model":
        rig.fwd = torch.compile(rig.model, backend=backend, mode=mode)
        return
    lists = [m for m in rig.model.modules() if isinstance(m, nn.ModuleList)]
    for block in max(lists, key=len):
        block.compile(backend=backend, mode=mode)


def graph_rig(rig: Rig, device: torch.device) -> None:
    """"+graph": replay the step as CUDA graphs, as the runner does with train.cuda_graph."""
    rig.step.use_graphs(rig.fwd, device.type)


# ---- one step, and timing -----------------------------------------------------------------------
def train_step(rig: Rig, batch: dict) -> None:
    """forward + loss + backward, then (unless the floor) the optimizer step with the orth gradient and the
    allocator: the runner's `OptimizerStep`, micro-batch and step."""
    rig.step.micro(rig.fwd, batch)
    if rig.step.optimizer is None:  # floor: nothing to update
        return
    rig.step.step()
    rig.step.zero_grad()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(rig: Rig, batch: dict, device: torch.device, n: int) -> list[float]:
    """Wall time of each of `n` steps in ms, synchronised before and after each."""
    out = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        train_step(rig, batch)
        sync(device)
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def time_allocator(rig: Rig, batch: dict, device: torch.device, n: int) -> dict[str, float | None]:
    """The step's parts with syncs around the orth gradient and around the allocator call (as
    `OptimizerStep.step` runs them): their cost alone, in ms (medians)."""
    unit, orth, alloc = rig.step, [], []
    for _ in range(n):
        unit.micro(rig.fwd, batch)
        sync(device)
        t0 = time.perf_counter()
        if unit.orth_grad is not None:
            unit.orth_grad()
        sync(device)
        t1 = time.perf_counter()
        unit.optimizer.step()
        sync(device)
        t2 = time.perf_counter()
        unit.allocator.step()
        sync(device)
        t3 = time.perf_counter()
        unit.zero_grad()
        orth.append(1e3 * (t1 - t0))
        alloc.append(1e3 * (t3 - t2))
    orth_ms = float(np.median(orth)) if unit.orth_grad is not None else None
    call_ms = float(np.median(alloc))
    return {"alloc_call_ms": call_ms, "orth_ms": orth_ms, "alloc_ms": call_ms + (orth_ms or 0.0)}


def profile_steps(rig: Rig, batch: dict, device: torch.device, n: int, path: str, title: str) -> dict[str, float | None]:
    """Profile `n` steps; write the top ops to `path`; return kernel and host-sync counts per step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            train_step(rig, batch)
        sync(device)
    events = prof.events()
    counts: dict[str, float | None] = {"aten_ops_per_step": sum(e.name.startswith("aten::") for e in events) / n}
    if cuda:  # on a CPU these would count nothing useful (.item() on a CPU tensor does not wait)
        names = [e.name for e in events]
        counts.update({
            "gpu_ops_per_step": sum(e.device_type == DeviceType.CUDA for e in events) / n,  # kernels, memcpy, memset
            "kernel_launches_per_step": sum(x.startswith("cudaLaunchKernel") for x in names) / n,
            # .item(), .tolist(), bool(t), nonzero(): the host waits until the GPU catches up.
            # The -1 is this function's own synchronize.
            "host_syncs_per_step": (sum(x in ("cudaStreamSynchronize", "cudaDeviceSynchronize") for x in names) - 1) / n,
            "item_calls_per_step": names.count("aten::_local_scalar_dense") / n,
        })
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=60, max_name_column_width=100)
    head = f"# {title}: {n} profiled steps\n" + "".join(f"# {k}: {v:.1f}\n" for k, v in counts.items())
    atomic_write_text(path, head + table + "\n")
    return counts


# ---- one variant --------------------------------------------------------------------------------
def run_variant(wl: Workload, variant: str, shape: tuple[int, int], args: argparse.Namespace, device: torch.device,
                facts: dict) -> dict:
    """Build, warm up, time and measure one (workload, variant) at batch `shape`; the result entry of
    the JSON. Facts about the base model go into `facts`."""
    base, fused, mode = split_variant(variant)
    model = build_model(wl, args.smoke, device)
    facts.setdefault("base_params", sum(p.numel() for p in model.parameters()))
    if checkpointed(variant):  # before the adapters, as the runner does
        enable_gradient_checkpointing(model)
    batch = make_batch(wl, model.config.vocab_size, shape, device)
    rig = build_rig(base, model, wl, device, capturable=mode == "graph", fused=fused)
    del model
    if base == "adalora_final":
        settle(rig, batch)  # eager, before compiling or capturing: a shrink swaps parameters
    if mode == "compile":
        compile_model(rig, args.compile_scope, args.compile_backend, args.compile_mode)
    elif mode == "graph":
        graph_rig(rig, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    sync(device)
    t0 = time.perf_counter()
    train_step(rig, batch)  # includes compilation for the +compile variants
    sync(device)
    first_step_s = time.perf_counter() - t0
    for _ in range(max(args.warmup - 1, 2 if mode == "graph" else 0)):  # +graph: eager, then capture
        train_step(rig, batch)
    graphs = rig.step.graphs
    if graphs is not None and graphs.capture_error is not None:
        raise RuntimeError(f"+graph: the forward cannot be captured: {graphs.capture_error}")
    ms = time_steps(rig, batch, device, args.steps)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    res: dict[str, Any] = {
        "median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)), "p90_ms": float(np.percentile(ms, 90)),
        "peak_gib": peak, "steps": len(ms), "first_step_s": round(first_step_s, 3), **rig.info,
    }
    if graphs is not None:
        res["graph_captures"] = graphs.captures
    if base in ("adalora", "peft_adalora") and mode == "eager" and args.alloc_steps > 0:
        res.update(time_allocator(rig, batch, device, args.alloc_steps))
    if args.profile:
        path = os.path.join(args.profile, f"{wl.name}_{variant.replace('+', '_')}.txt")  # "+": not a portable file name
        res["profile"] = profile_steps(rig, batch, device, args.profile_steps, path, f"{wl.name} {variant}")
    return res


def free(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()  # compiled blocks of the next variant share code objects: start the count afresh
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- results ------------------------------------------------------------------------------------
#: name: (numerator variant, denominator variant, field)
RATIOS = {
    "adalora/lora": ("adalora", "lora", "median_ms"),
    "lora/floor": ("lora", "floor", "median_ms"),
    "adalora/floor": ("adalora", "floor", "median_ms"),
    "adalora_mem/lora_mem": ("adalora", "lora", "peak_gib"),
    "peft_adalora/peft_lora": ("peft_adalora", "peft_lora", "median_ms"),
    "adalora/peft_adalora": ("adalora", "peft_adalora", "median_ms"),
    "lora/peft_lora": ("lora", "peft_lora", "median_ms"),
    "rslora/lora": ("rslora", "lora", "median_ms"),
    "adalora_final/lora": ("adalora_final", "lora", "median_ms"),
    "adalora_final_mem/lora_mem": ("adalora_final", "lora", "peak_gib"),
    "lora+compile/lora": ("lora+compile", "lora", "median_ms"),
    "lora+compile/floor+compile": ("lora+compile", "floor+compile", "median_ms"),
    "adalora+compile/floor+compile": ("adalora+compile", "floor+compile", "median_ms"),
    "adalora+compile/lora+compile": ("adalora+compile", "lora+compile", "median_ms"),
    "adalora_final+compile/lora+compile": ("adalora_final+compile", "lora+compile", "median_ms"),
    "lora+graph/lora": ("lora+graph", "lora", "median_ms"),
    "lora+graph/floor+graph": ("lora+graph", "floor+graph", "median_ms"),
    "adalora+graph/lora+graph": ("adalora+graph", "lora+graph", "median_ms"),
    "adalora+graph/floor+graph": ("adalora+graph", "floor+graph", "median_ms"),
    "adalora+graph_mem/lora+graph_mem": ("adalora+graph", "lora+graph", "peak_gib"),
    "adalora_final+graph/lora+graph": ("adalora_final+graph", "lora+graph", "median_ms"),
    # method.fused: the targets again, for the fused adapters (eager and graphed)
    "lora+fused/lora": ("lora+fused", "lora", "median_ms"),
    "adalora+fused/lora+fused": ("adalora+fused", "lora+fused", "median_ms"),
    "lora+fused/floor": ("lora+fused", "floor", "median_ms"),
    "adalora+fused/floor": ("adalora+fused", "floor", "median_ms"),
    "adalora+fused_mem/lora+fused_mem": ("adalora+fused", "lora+fused", "peak_gib"),
    "adalora_final+fused/lora+fused": ("adalora_final+fused", "lora+fused", "median_ms"),
    "lora+fused+graph/floor+graph": ("lora+fused+graph", "floor+graph", "median_ms"),
    "adalora+fused+graph/lora+fused+graph": ("adalora+fused+graph", "lora+fused+graph", "median_ms"),
    "adalora+fused+graph/floor+graph": ("adalora+fused+graph", "floor+graph", "median_ms"),
    "adalora+fused+graph_mem/lora+fused+graph_mem": ("adalora+fused+graph", "lora+fused+graph", "peak_gib"),
    "adalora_final+fused+graph/lora+fused+graph": ("adalora_final+fused+graph", "lora+fused+graph", "median_ms"),
    # fused adapters under torch.compile (adarank/fast/ops.py keeps them as opaque ops)
    "lora+fused+compile/floor+compile": ("lora+fused+compile", "floor+compile", "median_ms"),
    "adalora+fused+compile/floor+compile": ("adalora+fused+compile", "floor+compile", "median_ms"),
    "lora+fused+compile/lora+compile": ("lora+fused+compile", "lora+compile", "median_ms"),
    "adalora+fused+compile/adalora+compile": ("adalora+fused+compile", "adalora+compile", "median_ms"),
    "adalora+fused+compile/lora+fused+compile": ("adalora+fused+compile", "lora+fused+compile", "median_ms"),
    # gradient checkpointing (+ckpt): its time and memory against the same variant without it
    **{f"{v}+ckpt{m}/{v}{m}": (f"{v}+ckpt", v, key) for v in ("lora", "adalora", "lora+fused", "adalora+fused")
       for m, key in (("", "median_ms"), ("_mem", "peak_gib"))},
}


def _get(variants: dict, name: str, key: str) -> float | None:
    v = variants.get(name, {}).get(key)
    return v if isinstance(v, (int, float)) else None


#: the families whose fastest mode "best" reports (adalora: a new mask at every timed step, not adalora_final)
BEST_OF = ("floor", "lora", "adalora")
BEST_RATIOS = {"lora/floor": ("lora", "floor"), "adalora/lora": ("adalora", "lora"), "adalora/floor": ("adalora", "floor")}


def best_modes(variants: dict) -> tuple[dict, dict]:
    """("best", "ratios_best") of a workload: for each of BEST_OF, its measured variant with the lowest median
    (mode "eager" for the plain name, else what follows the base name, e.g. "fused+graph"), None when none was
    measured; and the ratios of those bests, each best over best. Errors and skipped variants do not count."""
    best: dict = {}
    for family in BEST_OF:
        timed = [(r["median_ms"], name) for name, r in variants.items()
                 if split_variant(name)[0] == family and isinstance(r.get("median_ms"), (int, float))]
        if timed:
            ms, name = min(timed)
            best[family] = {"mode": name.partition("+")[2] or "eager", "ms": ms}
        else:
            best[family] = None
    ratios = {k: (round(best[a]["ms"] / best[b]["ms"], 4) if best[a] and best[b] else None)
              for k, (a, b) in BEST_RATIOS.items()}
    return best, ratios


def summarize(entry: dict) -> None:
    """Fill the ratios, the best mode of each family and the allocator's share of the adalora step into a
    workload entry."""
    v = entry["variants"]
    entry["best"], entry["ratios_best"] = best_modes(v)
    ratios = {}
    for name, (num, den, key) in RATIOS.items():
        a, b = _get(v, num, key), _get(v, den, key)
        ratios[name] = round(a / b, 4) if a is not None and b else None
    entry["ratios"] = ratios
    alloc, step = _get(v, "adalora", "alloc_ms"), _get(v, "adalora", "median_ms")
    entry["alloc_ms"] = alloc
    entry["alloc_share"] = round(alloc / step, 4) if alloc is not None and step else None
    step_c = _get(v, "adalora+compile", "median_ms")
    entry["alloc_share_compiled"] = round(alloc / step_c, 4) if alloc is not None and step_c else None
    peft_alloc, peft_step = _get(v, "peft_adalora", "alloc_call_ms"), _get(v, "peft_adalora", "median_ms")
    entry["peft_alloc_call_ms"] = peft_alloc  # update_and_allocate only; its orth loss hides in forward
    entry["peft_alloc_share"] = round(peft_alloc / peft_step, 4) if peft_alloc is not None and peft_step else None


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "–" if x is None else format(x, spec)


def markdown(result: dict) -> str:
    """One table per workload: time, spread, memory, and time relative to floor and to lora."""
    lines = [f"GPU: {result['gpu']} · torch {result['torch']} · transformers {result['transformers']} · peft {result['peft']}", ""]
    for name, entry in result["workloads"].items():
        s, v = entry["shape"], entry["variants"]
        lines += [
            f"### {name}: {s['model']}, batch {s['batch']}×{s['seq']}, {s.get('adapted_matrices', '?')} adapted matrices, "
            f"base weights {s['base_dtype']}",
            "",
            "| variant | median ms | p10–p90 ms | peak GiB | × floor | × lora | note |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        floor, lora = _get(v, "floor", "median_ms"), _get(v, "lora", "median_ms")
        for vn, r in v.items():
            if "median_ms" not in r:
                lines.append(f"| {vn} | | | | | | {r.get('error') or r.get('skipped')} |")
                continue
            m = r["median_ms"]
            note = []
            if r.get("alloc_ms") is not None:
                note.append(f"alloc+orth {r['alloc_ms']:.1f} ms" if r.get("orth_ms") is not None else f"alloc {r['alloc_ms']:.1f} ms")
            if "ranks_after_shrink" in r:
                note.append(f"ranks after shrink {r['ranks_after_shrink']}")
            if vn.endswith(("+compile", "+graph")):
                note.append(f"first step {r['first_step_s']:.0f} s")
            lines.append(
                f"| {vn} | {m:.1f} | {r['p10_ms']:.1f}–{r['p90_ms']:.1f} | {_fmt(r['peak_gib'], '.2f')} | "
                f"{_fmt(m / floor if floor else None, '.2f')} | {_fmt(m / lora if lora else None, '.2f')} | {'; '.join(note)} |"
            )
        ratios = ", ".join(f"{k} {x:.3f}" for k, x in entry["ratios"].items() if x is not None)
        lines += ["", f"ratios: {ratios or '–'}"]
        best = ", ".join(f"{k} {b['mode']} {b['ms']:.1f} ms" for k, b in entry.get("best", {}).items() if b)
        best_r = ", ".join(f"{k} {x:.3f}" for k, x in entry.get("ratios_best", {}).items() if x is not None)
        lines.append(f"best of each: {best or '–'}; best over best: {best_r or '–'}")
        if entry["alloc_share"] is not None:
            lines.append(f"allocator + orth penalty: {entry['alloc_ms']:.2f} ms = {100 * entry['alloc_share']:.1f}% of the adalora step")
        if entry["peft_alloc_share"] is not None:
            lines.append(f"PEFT update_and_allocate: {entry['peft_alloc_call_ms']:.2f} ms = "
                         f"{100 * entry['peft_alloc_share']:.1f}% of the peft_adalora step")
        lines.append("")
    return "\n".join(lines)


def _version(pkg: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


# ---- main ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write (atomically, after every variant)")
    p.add_argument("--workloads", default="W1,W2,W3", help=f"comma-separated subset of {','.join(WORKLOADS)}")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)}; NAME+compile or NAME+graph selects one "
                        "compiled or CUDA-graph variant")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 30; smoke 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10; smoke 1)")
    p.add_argument("--alloc-steps", type=int, default=None,
                   help="steps of the extra pass timing the allocator and orth penalty alone (default 15; smoke 2; 0: off)")
    p.add_argument("--compile", action="store_true", help=f"also run {','.join(COMPILE_DEFAULT)} under torch.compile")
    p.add_argument("--graph", action="store_true", help=f"also run {','.join(GRAPH_DEFAULT)} as CUDA graphs (+graph)")
    p.add_argument("--fused", action="store_true",
                   help=f"also run {','.join(FUSED_DEFAULT)} with fused adapters (+fused; with --graph also +fused+graph, "
                        "with --compile also +fused+compile)")
    p.add_argument("--ckpt", action="store_true",
                   help="also run every variant of the run under gradient checkpointing (+ckpt), as "
                        "train.gradient_checkpointing=true does")
    p.add_argument("--compile-scope", choices=("blocks", "model"), default="blocks",
                   help="blocks: compile each transformer block (fast to compile; default); model: the whole model")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: trace only, for tests)")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode, e.g. reduce-overhead (inductor's CUDA-graph trees); default: torch's")
    p.add_argument("--profile", metavar="DIR", help="write a torch.profiler table per variant into DIR")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--batch", type=lambda s: tuple(int(x) for x in s.split("x")), default=None,
                   help="override every workload's batch, e.g. 4x1024")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; variants not started by then are recorded as skipped (default 400; smoke: none; 0: none)")
    p.add_argument("--resume", action="store_true",
                   help="keep the measured variants already in --out; run only the missing, skipped or failed ones")
    p.add_argument("--smoke", action="store_true", help="tiny configs, CPU-friendly, a few steps")
    args = p.parse_args(argv)
    defaults = dict(steps=3, warmup=1, alloc_steps=2, time_budget=0.0) if args.smoke else dict(steps=30, warmup=10, alloc_steps=15, time_budget=400.0)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")
    return args


def jobs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(workload, variant) in run order: every eager variant first, then the compiled ones, so a run cut
    short by the time budget still has the main numbers."""
    wls = [w.strip() for w in args.workloads.split(",") if w.strip()]
    vs = [v.strip() for v in args.variants.split(",") if v.strip()]
    for w in wls:
        if w not in WORKLOADS:
            raise SystemExit(f"--workloads: unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    for v in vs:
        try:
            split_variant(v)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    plain = [v for v in vs if "+" not in v]
    if args.fused:
        vs += [v + "+fused" for v in plain if v in FUSED_DEFAULT]
    if args.graph:
        vs += [v + "+graph" for v in plain if v in GRAPH_DEFAULT]
        if args.fused:
            vs += [v + "+fused+graph" for v in plain if v in FUSED_DEFAULT]
    if args.compile:
        vs += [v + "+compile" for v in plain if v in COMPILE_DEFAULT]
        if args.fused:
            vs += [v + "+fused+compile" for v in plain if v in FUSED_DEFAULT]
    if args.ckpt:
        vs += [with_ckpt(v) for v in vs if not checkpointed(v)]
    vs = list(dict.fromkeys(vs))
    # eager first, then graphs (no compilation time), then compile (it changes dynamo's global state), so a
    # run cut short by the time budget still has the main numbers
    by_mode = {m: [v for v in vs if split_variant(v)[2] == m] for m in ("eager", "graph", "compile")}
    return [(w, v) for m in by_mode.values() for w in wls for v in m]


def workload_entry(wl: Workload, args: argparse.Namespace) -> dict:
    cfg = wl.config(args.smoke)
    b, s = args.batch or (SMOKE_BATCH if args.smoke else wl.batch)
    shape = {"model": wl.model, "task": "sequence classification, 2 labels" if wl.task == "cls" else "causal LM",
             "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "heads": cfg.num_attention_heads,
             "kv_heads": getattr(cfg, "num_key_value_heads", cfg.num_attention_heads),
             "intermediate": cfg.intermediate_size, "vocab": cfg.vocab_size, "batch": b, "seq": s,
             "targets": list(wl.targets), "base_dtype": str(wl.base_dtype).removeprefix("torch.")}
    return {"shape": shape, "variants": {}, "ratios": {}, "alloc_ms": None, "alloc_share": None}


def merge_previous(result: dict, path: str) -> set[tuple[str, str]]:
    """--resume: carry over the measured variants of an earlier run into `result`; return them."""
    with open(path) as f:
        old = json.load(f)
    for key in ("steps", "warmup", "smoke", "compile_scope", "compile_mode"):
        if old["settings"].get(key) != result["settings"][key]:
            raise SystemExit(f"--resume: {path} was measured with {key}={old['settings'].get(key)}, "
                             f"this run has {result['settings'][key]}; write to another --out")
    if old["gpu"] != result["gpu"]:
        raise SystemExit(f"--resume: {path} was measured on {old['gpu']}, this is {result['gpu']}")
    done = set()
    for w, e in old["workloads"].items():
        entry = result["workloads"].setdefault(w, e)
        if entry["shape"]["batch"] != e["shape"]["batch"] or entry["shape"]["seq"] != e["shape"]["seq"]:
            raise SystemExit(f"--resume: {path} has {w} at another batch shape; write to another --out")
        entry["shape"] = {**e["shape"], **entry["shape"]}
        for v, r in e["variants"].items():
            if "median_ms" in r:
                entry["variants"][v] = r
                done.add((w, v))
        result["dtype"]["base_weights"].setdefault(w, e["shape"]["base_dtype"])
    return done


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and args.smoke:
        torch.set_num_threads(1)  # tiny ops: threads only contend (and CI boxes are small and shared)
    if args.compile or any(v.endswith("+compile") for v in args.variants.split(",")):
        # After a shrink the blocks' adapter ranks differ; let dynamo make them dynamic after the first
        # recompile instead of compiling one graph per distinct set of ranks.
        torch._dynamo.config.force_parameter_static_shapes = False
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 64)
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    todo = jobs(args)
    names = list(dict.fromkeys(w for w, _ in todo))
    result: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "torch": torch.__version__, "transformers": _version("transformers"), "peft": _version("peft"),
        "python": platform.python_version(),
        "dtype": {"autocast": "bfloat16", "adapters": "float32",
                  "base_weights": {w: str(WORKLOADS[w].base_dtype).removeprefix("torch.") for w in names}},
        "settings": {"steps": args.steps, "warmup": args.warmup, "alloc_steps": args.alloc_steps, "smoke": args.smoke,
                     "compile_scope": args.compile_scope, "compile_backend": args.compile_backend,
                     "compile_mode": args.compile_mode,
                     "r": R, "init_r": INIT_R, "alpha": ALPHA, "orth_weight": ORTH_WEIGHT, "optimizer": "AdamW",
                     "lr": LR, "fused_adamw": device.type == "cuda", "budget_steps": BUDGET_STEPS},
        "workloads": {w: workload_entry(WORKLOADS[w], args) for w in names},
    }
    done = merge_previous(result, args.out) if args.resume and os.path.exists(args.out) else set()

    t_start = time.perf_counter()
    failed = False
    for w, variant in todo:
        if (w, variant) in done:
            continue
        entry = result["workloads"][w]
        if args.time_budget and time.perf_counter() - t_start > args.time_budget:
            res: dict[str, Any] = {"skipped": f"time budget ({args.time_budget:.0f} s) spent"}
        else:
            facts: dict = {}
            t_var = time.perf_counter()
            try:
                res = run_variant(WORKLOADS[w], variant, (entry["shape"]["batch"], entry["shape"]["seq"]), args, device, facts)
            except torch.OutOfMemoryError as e:
                res = {"error": "OOM", "detail": str(e).splitlines()[0]}
            except Exception as e:  # record and go on: one broken variant must not cost the whole GPU run
                traceback.print_exc()
                res = {"error": f"{type(e).__name__}: {e}"}
                failed = True
            res["wall_s"] = round(time.perf_counter() - t_var, 1)
            entry["shape"].update(facts)
            if "n_adapted" in res:
                entry["shape"].setdefault("adapted_matrices", res["n_adapted"])
            free(device)
        entry["variants"][variant] = res
        summarize(entry)
        atomic_write_json(args.out, result)
        brief = (f"{res['median_ms']:.1f} ms (p10 {res['p10_ms']:.1f}, p90 {res['p90_ms']:.1f}), "
                 f"peak {_fmt(res['peak_gib'], '.2f')} GiB" if "median_ms" in res else res.get("error") or res.get("skipped"))
        print(f"[{time.perf_counter() - t_start:6.1f} s] {w} {variant}: {brief}", file=sys.stderr, flush=True)

    order = {v: i for i, v in enumerate(all_variant_names())}
    for entry in result["workloads"].values():  # tables and JSON list variants in the canonical order
        entry["variants"] = dict(sorted(entry["variants"].items(), key=lambda kv: order[kv[0]]))
        summarize(entry)
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    atomic_write_json(args.out, result)
    print(markdown(result))
    skipped = [f"{w}:{v}" for w, e in result["workloads"].items() for v, r in e["variants"].items() if "skipped" in r]
    if skipped:
        print(f"\nskipped for time: {' '.join(skipped)}; run the same command with --resume to measure them",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
