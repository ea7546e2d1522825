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
    # the loss of each micro-batch divided by the accumulation steps, as the runner's step computes it. BERT's forward
    # takes **kwargs, so transformers 5 assumes its loss is already normalised over the accumulated batch and does not
    # divide; but its classification loss is a per-batch mean, so with accumulation the gradient would be
    # grad_accum times larger (seen: the same masks, weights apart by 1e-2)
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
    cb = adarank.AdaRankCallback(**SCHEDULE)  # exported to tmp_path/adapter at the end
    trainer(model, args(tmp_path, grad_accum), ds, [cb]).train()

    ref, _ = svd_bert()
    want = our_loop(ref, ds, grad_accum)
    assert_same_allocations(cb.history, want)
    assert any(a.masked and a.phase == "budget" for a in want) and cb.allocator.shrunk
    got, ref_w = trainable(model), trainable(ref)
    assert got.keys() == ref_w.keys()
    for n in got:  # the same updates bit for bit: the regulariser and clipping in the same order, the same shrink
        assert torch.equal(got[n], ref_w[n]), n

    # the export is PEFT's: the tiny BERT with the exported LoRA adapter computes what the trained model does
    peft = pytest.importorskip("peft")
    from conftest import tiny_bert

    loaded = peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "adapter")).eval()
    batch = {k: torch.stack([x[k] for x in ds[:4]]) for k in ("input_ids", "attention_mask")}
    torch.testing.assert_close(loaded(**batch).logits, model.eval()(**batch).logits, rtol=1e-4, atol=1e-5)


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


def test_gradient_accumulation_calls_the_allocator_once_per_optimizer_step(tmp_path, monkeypatch):
    import adarank.integrations.trainer as integration

    calls = {"before": 0, "after": 0}
    for name in calls:
        real = getattr(integration, f"{name}_optimizer")

        def counted(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(integration, f"{name}_optimizer", counted)
    model, _ = svd_bert()
    forwards = []
    model.register_forward_pre_hook(lambda m, a: forwards.append(m.training))
    cb = adarank.AdaRankCallback(**SCHEDULE, export_dir=None)
    ds = dataset(n=BATCH * 7)  # 7 batches an epoch at 3 per step: each epoch ends with a 1-batch step
    trainer(model, args(tmp_path, grad_accum=3), ds, [cb]).train()
    assert sum(forwards) == 7 * 4  # 12 steps = 4 epochs of 3 optimizer steps
    assert calls == {"before": T, "after": T} and cb.allocator.t == T
    assert [a.step for a in cb.history] == list(range(1, T + 1))


class Recorder(TrainerCallback):
    """A stand-in for a report_to logger (W&B, TensorBoard): it keeps what on_log hands it."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_budget_threshold_and_ranks_reach_the_report_to_loggers(tmp_path, monkeypatch):
    from transformers.integrations import integration_utils

    # registered as a report_to integration: the Trainer lists those before the user's callbacks
    monkeypatch.setitem(integration_utils.INTEGRATION_TO_CALLBACK, "recorder", Recorder)
    model, _ = svd_bert()
    cb = adarank.AdaRankCallback(**SCHEDULE, export_dir=None)
    t = trainer(model, args(tmp_path, report_to=["recorder"], logging_steps=4), dataset(n=BATCH * 3), [cb])
    (recorder,) = [c for c in t.callback_handler.callbacks if isinstance(c, Recorder)]
    t.train()
    train_logs = [row for row in recorder.logs if "loss" in row]
    assert len(train_logs) == 3
    for row, a in zip(train_logs, (cb.history[3], cb.history[7], cb.history[11])):
        assert row["alloc/budget"] == a.budget and row["orth"] > 0
        assert {k[len("rank/"):]: v for k, v in row.items() if k.startswith("rank/")} == a.rank_dict()
    assert "alloc/threshold" in train_logs[0]  # step 4 masks (delta_t = 2)
    assert all("alloc/budget" not in row for row in recorder.logs if "loss" not in row)  # not in the final summary
    history = [row for row in t.state.log_history if "loss" in row]  # and trainer_state.json has them too
    assert [row["alloc/budget"] for row in history] == [row["alloc/budget"] for row in train_logs]


def test_a_trainer_without_the_callback_warns_once_that_nothing_allocates(tmp_path):
    model, _ = svd_bert()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(model, args(tmp_path, max_steps=3), dataset(n=BATCH * 3), []).train()
    assert [str(w.message) for w in record].count(MESSAGE) == 1


@pytest.mark.parametrize("make,match", [
    (lambda out: (adarank.AdaRankCallback(target_rank=2), args(out, max_grad_norm=1.0)),
     r"^TrainingArguments.max_grad_norm: must be 0 with AdaRankCallback \(got 1.0\)"),
    (lambda out: (adarank.AdaRankCallback(target_rank=50), args(out)),
     r"^AdaRankCallback\(target_rank=...\): the final budget of 550 triplets must be in \[1, 44\]"),
])
def test_settings_it_cannot_train_with_fail_in_one_line(tmp_path, make, match):
    model, _ = svd_bert()
    cb, training_args = make(tmp_path)
    with pytest.raises(ValueError, match=match) as e:
        trainer(model, training_args, dataset(n=BATCH), [cb]).train()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kw,match", [
    ({}, r"give exactly one of target_rank and target_total_rank"),
    ({"target_rank": 2, "target_total_rank": 4}, r"give exactly one"),
    ({"target_rank": 2, "final_frac": 1.0}, r"^AdaRankCallback\(final_frac=...\): must be in \[0, 1\), got 1.0$"),
    ({"target_rank": 2, "score": "grad"}, r"^AdaRankCallback\(score=...\): must be one of"),
])
def test_bad_arguments_fail_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        adarank.AdaRankCallback(**kw)


def test_a_model_without_svd_adapters_is_refused_when_the_trainer_is_built(tmp_path):
    from conftest import BERT_TARGETS, tiny_bert

    model = tiny_bert()
    adarank.inject(model, "lora", r=2, alpha=2.0, targets=BERT_TARGETS)
    with pytest.raises(ValueError, match=r"^AdaRankCallback: the model has no SVD adapters"):
        Trainer(model=model, args=args(tmp_path), train_dataset=dataset(n=BATCH),
                callbacks=[adarank.AdaRankCallback(target_rank=1)])


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## With transformers' Trainer\n", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    printed = section.split("checks that it prints `", 1)[1].split("`", 1)[0]
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip().splitlines()[-1] == printed
    assert [str(w.message) for w in record].count(MESSAGE) == 0
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_the_core_never_imports_the_integration():
    """Only `adarank.AdaRankCallback`, the package's lazy attribute, reaches it: `import adarank` loads no Trainer."""
    import ast
    from pathlib import Path

    from test_layout import GRAPH

    importers = {v for v, ws in GRAPH.items() if not v.startswith("adarank.integrations")
                 and any(w.startswith("adarank.integrations") for w in ws)}
    assert importers == {"adarank"}
    init = ast.parse((Path(adarank.__file__)).read_text())
    top_level = [n for n in init.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert all("integrations" not in (n.module or "") for n in top_level if isinstance(n, ast.ImportFrom))
