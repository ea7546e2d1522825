"""AdaRankCallback in transformers' Trainer: the same training as the runner's step, resume, accumulation, logs."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import adarank
from adarank.runner.step import OptimizerStep
from adarank.runner.train import lr_lambda
from adarank.unallocated import MESSAGE

from conftest import VOCAB, svd_bert

LR, T, BATCH = 1e-2, 12, 4
#: the schedule of every run here: 1 initial step, budgeting to step 8, the final mask at step 9, then a shrink
SCHEDULE = dict(target_rank=2, init_frac=0.1, final_frac=0.25, delta_t=2, orth_weight=0.1, max_grad_norm=0.5,
                shrink=True)


def dataset(n: int = 48, seq: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, seq), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(seq, dtype=torch.long), "labels": labels[i]}
            for i in range(n)]


def args(out, grad_accum: int = 1, **kw) -> TrainingArguments:
    kw = dict(max_steps=T, per_device_train_batch_size=BATCH, gradient_accumulation_steps=grad_accum,
              learning_rate=LR, weight_decay=0.0, warmup_steps=0, lr_scheduler_type="linear", optim="adamw_torch",
              max_grad_norm=0.0, train_sampling_strategy="sequential", report_to="none", save_strategy="no",
              logging_steps=1, disable_tqdm=True, use_cpu=True, seed=0) | kw
    return TrainingArguments(str(out), **kw)


def trainer(model, training_args, ds, callbacks) -> Trainer:
    t = Trainer(model=model, args=training_args, train_dataset=ds, callbacks=callbacks)
    # a per-batch mean loss divided by the accumulation steps, as the runner's step computes it (transformers 5
    # would otherwise normalise BERT's loss by the items of the whole accumulated batch: equal, but not bit for bit)
    t.model_accepts_loss_kwargs = False
    return t


def our_loop(model, ds, grad_accum: int):
    """The runner's step (adarank/runner/step.py) over the same batches, optimizer and schedule."""
    layers = adarank.svd_adapters(model)
    c = adarank.AdaRankCallback(**SCHEDULE)
    allocator = adarank.RankAllocator(layers, adarank.make_schedule(T, c.init_frac, c.final_frac, c.delta_t),
                                      2 * len(layers), shrink_at_final=True)
    orth = adarank.orth.OrthGrad([m for _, m in layers], c.orth_weight)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(0, T))
    unit = OptimizerStep(model, opt, sched, orth_grad=orth, max_grad_norm=c.max_grad_norm, allocator=allocator,
                         grad_accum=grad_accum)
    model.train()
    batches = [{k: torch.stack([x[k] for x in ds[i:i + BATCH]]) for k in ds[0]} for i in range(0, len(ds), BATCH)]
    out = []
    for step in range(T):
        for b in batches[(step * grad_accum) % len(batches):][:grad_accum]:
            unit.micro(model, b)
        out.append(unit.step().allocation)
        unit.zero_grad()
    return out


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_allocations(got, want) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a.step, a.budget, a.phase, a.masked) == (b.step, b.budget, b.phase, b.masked)
        assert torch.equal(a.mask, b.mask), f"step {a.step}"
        assert a.rank_dict() == b.rank_dict(), f"step {a.step}"


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_trainer_with_the_callback_trains_as_our_loop_does(tmp_path, grad_accum):
    ds = dataset(n=BATCH * grad_accum * 3)  # the epoch wraps: every step's batches are the same in both loops
    model, _ = svd_bert()
    cb = adarank.AdaRankCallback(**SCHEDULE, export_dir=None)
    trainer(model, args(tmp_path, grad_accum), ds, [cb]).train()

    ref, _ = svd_bert()
    want = our_loop(ref, ds, grad_accum)
    assert_same_allocations(cb.history, want)
    assert any(a.masked and a.phase == "budget" for a in want) and cb.allocator.shrunk
    got, ref_w = trainable(model), trainable(ref)
    assert got.keys() == ref_w.keys()
    for n in got:  # the same updates bit for bit: the regulariser and clipping in the same order, the same shrink
        assert torch.equal(got[n], ref_w[n]), n


def test_resuming_from_a_trainer_checkpoint_equals_the_uninterrupted_run(tmp_path):
    """Checkpoints at step 5 (budgeting) and 10 (after the final mask at 9 and the shrink); resuming from either
    in a fresh model reaches the uninterrupted run's allocations and weights bit for bit."""
    import shutil

    ds = dataset(n=BATCH * 3)
    model, _ = svd_bert()
    full = adarank.AdaRankCallback(**SCHEDULE, export_dir=None)
    trainer(model, args(tmp_path / "a", save_strategy="steps", save_steps=5), ds, [full]).train()
    want = trainable(model)
    assert full.history[8].phase == "final" and full.allocator.shrunk
    shutil.copytree(tmp_path / "a" / "checkpoint-10", tmp_path / "c" / "checkpoint-10")

    for out, resume, start in ((tmp_path / "a", str(tmp_path / "a" / "checkpoint-5"), 5), (tmp_path / "c", True, 10)):
        fresh, _ = svd_bert()  # full rank: a shrunk checkpoint's weights bring their own shapes
        cb = adarank.AdaRankCallback(**SCHEDULE, export_dir=None)
        trainer(fresh, args(out, save_strategy="steps", save_steps=5), ds, [cb]).train(resume_from_checkpoint=resume)
        assert [a.step for a in cb.history] == list(range(start + 1, T + 1))
        assert_same_allocations(cb.history, full.history[start:])
        got = trainable(fresh)
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want), start
