"""`AdaRankCallback`: adarank's rank allocation inside `transformers.Trainer` (and TRL's `SFTTrainer`, which is one).

The callback does around the Trainer's optimizer step what the runner's `OptimizerStep` does around its own
(the shared pieces are in adarank/update.py), once per optimizer step, so once per gradient-accumulation cycle:

- `on_train_begin`: T is the Trainer's `state.max_steps`; the schedule, the `RankAllocator` and the orthogonal
  regulariser are built over the model's SVD adapters; a resumed run loads the allocator's state from its checkpoint.
- `on_pre_optimizer_step` (gradients accumulated and unscaled): the regulariser's gradient, then clipping. The
  Trainer clips before this event, which would leave the regulariser's gradient out of the clipped norm, so the
  callback clips instead: TrainingArguments.max_grad_norm must be 0 and `AdaRankCallback(max_grad_norm=...)` sets it.
- `on_optimizer_step` (before the gradients are cleared): the allocator's step and the shrink, which slices the
  optimizer's state.
- `on_log`: budget, threshold, R and the ranks added to the Trainer's log record, ahead of its report_to loggers.
- `on_save`: the allocator's state written into each checkpoint folder (`adarank_allocator.pt`).
- `on_train_end`: the adapters exported in PEFT's LoRA format (`<output_dir>/adapter` by default).

Resuming across a shrink: the checkpoint's weights have the shrunk shapes; each `SVDLinear` takes them as the Trainer
loads the weights (layers.py), before it builds its optimizer, and the allocator's state then restores the rest.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

from ..allocation import Allocation
from ..allocator import RankAllocator
from ..atomic import atomic_torch_save
from ..export import export_peft, task_type_of
from ..importance import SCORES
from ..inject import adapters, svd_adapters
from ..orth import ORTH_FORMS, OrthGrad
from ..schedule import make_schedule
from ..update import after_optimizer, before_optimizer

__all__ = ["AdaRankCallback", "ALLOCATOR_FILE"]

#: the allocator's state in each Trainer checkpoint folder
ALLOCATOR_FILE = "adarank_allocator.pt"


def _check(ok: bool, field: str, msg: str) -> None:
    if not ok:
        raise ValueError(f"AdaRankCallback({field}=...): {msg}")


class AdaRankCallback(TrainerCallback):
    """Adaptive rank for SVD adapters (`adarank.inject(model, "svd", r=<initial rank>, ...)`) in a Trainer.

    Args:
        target_rank: the final average rank per adapted matrix (the runner's method.r); or
        target_total_rank: the final budget in triplets. Give exactly one.
        init_frac, final_frac: the schedule's initial and final phases as fractions of the Trainer's max_steps.
        delta_t: mask every delta_t steps in the budgeting phase.
        beta1, beta2: the importance EMAs' coefficients. score: "uncertainty", "sensitivity" or "magnitude".
        orth_weight, orth_form: the orthogonal regulariser (0: none).
        max_grad_norm: clip the gradient norm to this after adding the regulariser's gradient (0: no clipping);
            TrainingArguments.max_grad_norm must then be 0.
        shrink: remove the pruned triplets once the final mask is fixed (one process only).
        export_dir: where the PEFT LoRA adapter is written at the end, relative to TrainingArguments.output_dir
            (None: not exported).
        modules_to_save: modules trained in full that the export carries; None: every module outside the adapters
            that has trainable parameters of its own (e.g. the classifier).

    After training, `allocator` holds the final allocation (`allocator.ranks()`), `history` each step's
    `Allocation`.
    """

    def __init__(self, target_rank: float | None = None, target_total_rank: int | None = None, init_frac: float = 0.1,
                 final_frac: float = 0.2, delta_t: int = 10, beta1: float = 0.85, beta2: float = 0.85,
                 score: str = "uncertainty", orth_weight: float = 0.1, orth_form: str = "mean_norm",
                 max_grad_norm: float = 1.0, shrink: bool = True, export_dir: str | None = "adapter",
                 modules_to_save: list[str] | None = None) -> None:
        _check((target_rank is None) != (target_total_rank is None), "target_rank",
               "give exactly one of target_rank and target_total_rank")
        _check(target_rank is None or target_rank > 0, "target_rank", f"must be > 0, got {target_rank}")
        for name, f in (("init_frac", init_frac), ("final_frac", final_frac), ("beta1", beta1), ("beta2", beta2)):
            _check(0 <= f < 1, name, f"must be in [0, 1), got {f}")
        _check(delta_t >= 1, "delta_t", f"must be >= 1, got {delta_t}")
        _check(score in SCORES, "score", f"must be one of {SCORES}, got {score!r}")
        _check(orth_form in ORTH_FORMS, "orth_form", f"must be one of {ORTH_FORMS}, got {orth_form!r}")
        _check(orth_weight >= 0, "orth_weight", f"must be >= 0, got {orth_weight}")
        _check(max_grad_norm >= 0, "max_grad_norm", f"must be >= 0, got {max_grad_norm}")
        self.target_rank, self.target_total_rank = target_rank, target_total_rank
        self.init_frac, self.final_frac, self.delta_t = init_frac, final_frac, delta_t
        self.beta1, self.beta2, self.score = beta1, beta2, score
        self.orth_weight, self.orth_form, self.max_grad_norm = orth_weight, orth_form, max_grad_norm
        self.shrink, self.export_dir, self.modules_to_save = shrink, export_dir, modules_to_save
        self.allocator: RankAllocator | None = None
        self.history: list[Allocation] = []
        self._orth: OrthGrad | None = None
        self._params: list[nn.Parameter] = []
        self._orth_sum: torch.Tensor | None = None  # R summed over the steps since the last log
        self._orth_n = 0
        self._logged_step = -1

    # ----- set-up -------------------------------------------------------------------------------------
    def check_args(self, args) -> None:
        """TrainingArguments this callback cannot train with: a one-line ValueError naming the field."""
        if args.max_grad_norm > 0 and (self.orth_weight > 0 or self.max_grad_norm > 0):
            raise ValueError(
                f"TrainingArguments.max_grad_norm: must be 0 with AdaRankCallback (got {args.max_grad_norm}): the "
                "Trainer clips before the callback adds the orthogonal regulariser's gradient; the callback clips "
                f"after it instead (AdaRankCallback(max_grad_norm={self.max_grad_norm or args.max_grad_norm}))")
        if self.shrink and args.world_size > 1:
            raise ValueError(f"AdaRankCallback(shrink=True): needs one process, got {args.world_size} (the Trainer's "
                             "DDP wrapper keeps the parameters a shrink replaces); pass shrink=False")

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self.check_args(args)  # at the Trainer's construction: before any step
        if model is not None and not svd_adapters(model):
            raise ValueError("AdaRankCallback: the model has no SVD adapters; adarank.inject(model, 'svd', ...) first")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.check_args(args)
        _log_before_reporters(self)
        layers = svd_adapters(model)
        if not layers:
            raise ValueError("AdaRankCallback: the model has no SVD adapters; adarank.inject(model, 'svd', ...) first")
        schedule = make_schedule(state.max_steps, self.init_frac, self.final_frac, self.delta_t)
        total = (self.target_total_rank if self.target_total_rank is not None
                 else round(self.target_rank * len(layers)))
        init_total = sum(m.r_init for _, m in layers)
        _check(1 <= total <= init_total, "target_rank" if self.target_rank is not None else "target_total_rank",
               f"the final budget of {total} triplets must be in [1, {init_total}], the total initial rank of the "
               f"{len(layers)} SVD adapters (inject them at a higher r)")
        self.allocator = RankAllocator(layers, schedule, total, self.beta1, self.beta2, self.score,
                                       shrink_at_final=self.shrink)
        self._orth = OrthGrad([m for _, m in layers], self.orth_weight, self.orth_form) if self.orth_weight > 0 else None
        self._params = _trainable(model)
        self.history, self._orth_sum, self._orth_n, self._logged_step = [], None, 0, -1
        if state.global_step > 0:  # resuming: the Trainer has loaded the checkpoint's weights and optimizer
            self._load(args, state)

    # ----- the step -------------------------------------------------------------------------------------
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        r = before_optimizer(self._params, self._orth, self.max_grad_norm)
        if r is not None:
            self._orth_sum = r if self._orth_sum is None else self._orth_sum + r
            self._orth_n += 1

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        # fp16: accelerate's optimizer says whether its loss scaler skipped the step (inf/NaN gradients)
        skipped = bool(getattr(optimizer, "step_was_skipped", False))
        raw = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        allocation, replaced = after_optimizer(self.allocator, raw, update_importance=not skipped)
        if replaced:
            self._params = _trainable(model)
        self.history.append(allocation)

    # ----- logging, checkpoints, export ---------------------------------------------------------------
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not self.history or state.global_step <= self._logged_step or "loss" not in logs:
            return  # only the training log of a step: not evaluations, not the final summary
        self._logged_step = state.global_step
        scalars = self.scalars()
        logs.update(scalars)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(scalars)  # the Trainer recorded its copy before calling the callbacks

    def scalars(self) -> dict[str, float]:
        """The allocation's budget, threshold and ranks, and the mean R since the last log (syncs with the device)."""
        a = self.history[-1]
        out: dict[str, float] = {"alloc/budget": a.budget}
        if a.threshold is not None:
            out["alloc/threshold"] = float(a.threshold)
        if self._orth_n:
            out["orth"] = float(self._orth_sum) / self._orth_n  # R before its weight, as the runner logs train/orth
            self._orth_sum, self._orth_n = None, 0
        out.update({f"rank/{k}": v for k, v in a.rank_dict().items()})
        return out

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.allocator is not None:
            # the Trainer has written checkpoint-<step>/ (weights, optimizer, trainer_state.json) by now
            atomic_torch_save({"global_step": state.global_step, "allocator": self.allocator.state_dict()},
                              _checkpoint_file(args, state.global_step))

    def _load(self, args, state) -> None:
        path = _checkpoint_file(args, state.global_step)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"AdaRankCallback: resuming at step {state.global_step}, but {path} is missing (a checkpoint without "
                "the callback, one that stopped while saving, or one outside TrainingArguments.output_dir); resume "
                "from a checkpoint folder in output_dir that has it")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["global_step"] != state.global_step:
            raise ValueError(f"AdaRankCallback: {path} is from step {saved['global_step']}, "
                             f"the Trainer resumes at step {state.global_step}")
        # the weights loaded at the saved (possibly shrunk) shapes, so this replaces no parameter the optimizer holds
        self.allocator.load_state_dict(saved["allocator"])

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.export_dir is None or not state.is_world_process_zero:
            return
        modules = self.modules_to_save if self.modules_to_save is not None else trained_in_full(model)
        export_peft(model, os.path.join(args.output_dir, self.export_dir), getattr(model, "name_or_path", None) or None,
                    modules_to_save=modules, task_type=task_type_of(model))


def _checkpoint_file(args, step: int) -> str:
    return os.path.join(args.output_dir, f"checkpoint-{step}", ALLOCATOR_FILE)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def trained_in_full(model: nn.Module) -> list[str]:
    """Modules outside the adapters with trainable parameters of their own (the classifier head, say)."""
    inside = {n for n, a in adapters(model)}
    out = []
    for name, module in model.named_modules():
        if any(name == a or name.startswith(a + ".") for a in inside):
            continue
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            out.append(name)
    return out


_warned_order = False


def _log_before_reporters(callback: AdaRankCallback) -> None:
    """Move `callback` ahead of the Trainer's report_to loggers (W&B, TensorBoard, ...), so that what its `on_log`
    adds reaches them.

    The Trainer lists those loggers before the user's callbacks and calls `on_log` in list order, and it hands a
    callback no reference to itself or to its CallbackHandler. The handler is the caller of this event, a frame or
    two up the stack. Moving within the list the handler is iterating is safe: the callback moves to an earlier
    place, so the iteration continues with the callback that followed it.
    """
    global _warned_order
    frame = sys._getframe(1)
    for _ in range(4):
        frame = frame.f_back
        if frame is None:
            break
        handler = frame.f_locals.get("self")
        if isinstance(handler, CallbackHandler) and any(c is callback for c in handler.callbacks):
            cbs = handler.callbacks
            cbs.remove(callback)
            at = max((i + 1 for i, c in enumerate(cbs) if isinstance(c, DefaultFlowCallback)), default=0)
            cbs.insert(at, callback)
            return
    if not _warned_order:
        _warned_order = True
        warnings.warn("AdaRankCallback: could not find the Trainer's callback list, so its budget and ranks reach "
                      "only the callbacks listed after it, not the report_to loggers", UserWarning, stacklevel=2)
