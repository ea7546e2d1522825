"""`train.speed`: which fast paths a run takes (method.fused, train.compile, train.cuda_graph).

`decide()` is a pure function of facts known before any model loads (the device, the processes, autocast's
dtype, the model family, what the method supports) and of what the user asked for:

- `eager` and each name in `MODES` (`fused`, `graph`, `fused+graph`, `compile`, `fused+compile`) set the
  switches to exactly that mode. A switch set to true by hand that the named mode lacks is an error (the
  config names `train.speed`); compile and graphs together are not a mode, the loop cannot run them.
- `auto` (the default) decides only when no switch was set by hand: a `method.fused`, `train.compile` or
  `train.cuda_graph` set to true means the user chose, and auto keeps those switches as they are. The switches
  default to false, so a false one cannot mean "off on purpose": to keep auto from choosing, name a mode
  (`train.speed=eager`).
- On a CPU auto is eager: CPU runs compute exactly what they did before `train.speed` existed.

What auto picks on a CUDA device, from the H200 measurements in results/bench/README.md (h200.json for W2,
Llama ~1.1B 8 × 1024; h200_w3.json for W3; h200_w1.json for W1, DeBERTaV3-base; median ms per step):

- `fused+graph` for lora, rslora and adalora on one GPU without fp16: the fastest mode measured that the
  runner can run, on both workloads where graphs ran. W2 lora 156.2 eager, 155.9 graph, 139.0 fused+graph;
  adalora 182.4 eager, 164.7 graph, 141.9 fused+graph. W3 lora 639.6 eager (noisy), 262.1 graph, 225.9
  fused+graph; adalora 647.7, 286.1, 234.9. In the runner, MiniLM SST-2 LoRA (r = 8, one H200) trained at 27.7
  steps/s with both switches against 16.0 eager (issue 21's measurement). `data.length_buckets` stays as the
  user set it: a graph holds one batch shape, so bucketing (`pow2`) would bound the captures, but that was
  not measured against the eager batches it saves, so auto does not choose it.
- Not compile, though the benchmark's per-block compile was faster per step on W2 (lora 95.1, adalora 104.2):
  the runner compiles the whole model, which was not measured; compiling took 8.3–18.2 s per shape on W2
  (`first_step_s`), again for each bucket width and after an adalora shrink; compile was not measured on W3
  or W1; and the fused layers under compile (opaque custom ops, adarank/fast/ops.py) are not measured yet.
- `eager` wherever graphs cannot run, since `fused` without graphs was not faster: W2 lora 157.2 fused
  against 156.2, adalora 191.7 against 182.4; W1 lora 158.5 against 130.5, adalora 191.8 against 146.4. Graphs
  cannot run with several processes (DDP), with fp16 (the GradScaler decides on the host which steps to
  skip), for DeBERTa-v2 (W1's family: its forward copies a CPU tensor to the GPU, which a capture cannot
  hold, adarank/fast/graphs.py), or with an NF4 base (never captured in a test).
- `eager` for the methods whose fast modes were not measured faster: full fine-tuning (the frozen model's
  step under graphs was slower on W2, 127.3 against 118.7, faster on W3, 196.6 against 215.7), PEFT's
  methods (only eager measured), and increlora (its growth replaces the parameters every delta_t steps,
  which drops every captured graph; not measured).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["AUTO", "MODES", "SPEEDS", "Choice", "Facts", "Mode", "check_request", "decide", "mode_of"]

AUTO = "auto"


@dataclass(frozen=True)
class Mode:
    """The fast paths one run takes (data.length_buckets is left as configured)."""

    fused: bool = False
    compile: bool = False
    cuda_graph: bool = False

    @property
    def name(self) -> str:
        parts = [p for p, on in (("fused", self.fused), ("compile", self.compile), ("graph", self.cuda_graph)) if on]
        return "+".join(parts) or "eager"


#: the modes `train.speed` may name (compile and graphs together are not one: the loop refuses them)
MODES = {m.name: m for m in (Mode(), Mode(fused=True), Mode(cuda_graph=True), Mode(fused=True, cuda_graph=True),
                             Mode(compile=True), Mode(fused=True, compile=True))}
SPEEDS = (AUTO, *MODES)


@dataclass(frozen=True)
class Facts:
    """What the decision depends on, all known before the model loads."""

    device_type: str  # "cuda" or "cpu"
    world_size: int  # processes (torchrun); DDP when > 1
    precision: Optional[str]  # autocast's dtype as "bf16" / "fp16", None for fp32
    model_type: Optional[str]  # the transformers config's model_type ("bert", "llama", "deberta-v2"); None unknown
    fusable: bool  # method.fused applies to the method (its MethodSpec)
    grows: bool  # the method grows its rank (parameters replaced every delta_t steps)
    peft: bool  # built by PEFT
    quantized: bool  # model.quantization is not none


@dataclass(frozen=True)
class Choice:
    """The mode a run takes, what was asked and why; `record()` is results.json's "speed"."""

    requested: str
    mode: Mode
    reason: str

    def record(self) -> dict[str, Any]:
        return {"requested": self.requested, "mode": self.mode.name, "reason": self.reason}

    def line(self) -> str:
        return f"train.speed={self.requested}: {self.mode.name} ({self.reason})"


def mode_of(fused: bool, compile: bool, cuda_graph: bool) -> Mode:
    """The mode that these hand-set switches make."""
    return Mode(fused=bool(fused), compile=bool(compile), cuda_graph=bool(cuda_graph))


def check_request(speed: str, hand: Mode) -> None:
    """Config-time: `speed` is a known value and the hand-set switches do not contradict a named mode."""
    if speed not in SPEEDS:
        raise ValueError(f"train.speed: must be one of {SPEEDS}, got {speed!r}")
    if speed == AUTO:
        return
    mode = MODES[speed]
    extra = [name for name, on, want in (("method.fused", hand.fused, mode.fused),
                                         ("train.compile", hand.compile, mode.compile),
                                         ("train.cuda_graph", hand.cuda_graph, mode.cuda_graph)) if on and not want]
    if extra:
        raise ValueError(f"train.speed: {speed} contradicts {', '.join(f'{e}=true' for e in extra)}; name the mode "
                         f"you want in train.speed, or use train.speed=auto with the switches")


def _graph_blocker(f: Facts) -> Optional[str]:
    """Why CUDA graphs cannot (or are not known to) run here; None when they can."""
    if f.world_size > 1:
        return f"{f.world_size} processes: CUDA graphs replay one process's step"
    if f.precision == "fp16":
        return "fp16: the GradScaler decides on the host which steps to skip"
    if f.model_type == "deberta-v2":
        return "DeBERTa-v2 copies a CPU tensor to the GPU in every forward, which a CUDA graph cannot hold"
    if f.quantized:
        return "an NF4 base was never captured in a test"
    return None


def _auto(f: Facts) -> tuple[Mode, str]:
    if f.device_type != "cuda":
        return MODES["eager"], "not a CUDA device"
    if f.grows:
        return MODES["eager"], "no fast mode measured for a growing method (increlora: each growth drops the graphs)"
    if not f.fusable or f.peft:
        return MODES["eager"], "no fast mode of this method was measured faster"
    blocker = _graph_blocker(f)
    if blocker is not None:
        return MODES["eager"], f"no CUDA graphs ({blocker}); fused alone was not faster"
    # data.length_buckets is left as configured: the runner's measured fused+graph speed (MiniLM SST-2, 27.7
    # steps/s against 16.0 eager) was with dynamic padding; buckets under graphs are not measured yet
    return Mode(fused=True, cuda_graph=True), "the fastest measured mode (results/bench/README.md, W2 and W3)"


def decide(speed: str, hand: Mode, facts: Facts) -> Choice:
    """The mode of a run that asked for `speed`, with `hand` the switches the user set to true."""
    if speed != AUTO:
        return Choice(speed, MODES[speed], "named in train.speed")
    if hand != MODES["eager"]:
        return Choice(speed, hand, "switches set by hand are kept")
    mode, reason = _auto(facts)
    return Choice(speed, mode, reason)


# ---- the runner's side: facts from a Config, the choice applied to it ---------------------------------
def model_type(name_or_path: str, causal: bool) -> Optional[str]:
    """The transformers model_type of model.name_or_path, read from its config (no weights); None if unreadable."""
    if name_or_path == "random":
        return "llama" if causal else "bert"  # the tiny test models (models.model_config)
    if name_or_path in ("minilm", "smollm2"):
        return "bert" if name_or_path == "minilm" else "llama"
    from .models import _pretrained_config

    try:
        return _pretrained_config(name_or_path).model_type
    except OSError:  # the model's loading reports it, naming the field
        return None


def facts_of(cfg: Any, device_type: str, world_size: int, amp: Any) -> Facts:
    """The Facts of a run (cfg: a runner Config) on this device; the model's config is read only on a GPU."""
    import torch

    from .data.tasks import TASKS
    from .methods import METHODS

    spec, causal = METHODS[cfg.method.name], TASKS[cfg.task.name].is_causal
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(amp)
    return Facts(device_type=device_type, world_size=world_size, precision=precision,
                 model_type=model_type(cfg.model.name_or_path, causal) if device_type == "cuda" else None,
                 fusable=spec.fusable, grows=spec.grows, peft=spec.peft, quantized=cfg.model.quantization != "none")


def resolve(cfg: Any, device_type: str, world_size: int, amp: Any) -> tuple[Any, Choice]:
    """(cfg with the chosen mode's switches set, the choice). A mode that cannot run here is refused, naming
    train.speed."""
    import dataclasses

    tc = cfg.train
    choice = decide(tc.speed, mode_of(cfg.method.fused, tc.compile, tc.cuda_graph),
                    facts_of(cfg, device_type, world_size, amp))
    mode = choice.mode
    if tc.speed != AUTO and mode.cuda_graph and (device_type != "cuda" or world_size > 1):
        raise ValueError(f"train.speed: {tc.speed} needs one CUDA device and one process, got {device_type} with "
                         f"{world_size} process{'es' if world_size > 1 else ''}")
    return dataclasses.replace(
        cfg, method=dataclasses.replace(cfg.method, fused=mode.fused),
        train=dataclasses.replace(tc, compile=mode.compile, cuda_graph=mode.cuda_graph)), choice
