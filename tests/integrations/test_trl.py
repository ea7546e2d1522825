"""AdaRankCallback in TRL's SFTTrainer (a transformers Trainer) on the tiny Llama."""

from __future__ import annotations

import warnings

import pytest
import torch

import adarank
from adarank.unallocated import MESSAGE

from conftest import LLAMA_TARGETS, VOCAB, tiny_llama

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

WORDS = ["<pad>", "<unk>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]  # the tiny Llama's 50 ids
T = 10


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def texts(n: int = 32, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[3 + i] for i in torch.randint(0, VOCAB - 3, (int(k),), generator=g).tolist())
            for k in torch.randint(4, 12, (n,), generator=g)]


def test_sft_trainer_allocates_ranks_with_the_callback(tmp_path):
    model = tiny_llama()
    torch.manual_seed(1)
    adarank.inject(model, "svd", r=3, alpha=3.0, targets=LLAMA_TARGETS)  # initial rank 3, 14 matrices
    cb = adarank.AdaRankCallback(target_rank=2, delta_t=1, init_frac=0.1, final_frac=0.3)
    config = trl.SFTConfig(str(tmp_path), max_steps=T, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                           learning_rate=1e-2, max_grad_norm=0.0, max_length=16, report_to="none", save_strategy="no",
                           logging_steps=5, disable_tqdm=True, use_cpu=True, dataset_num_proc=None)
    ds = datasets.Dataset.from_dict({"text": texts()})
    sft = trl.SFTTrainer(model=model, args=config, train_dataset=ds, processing_class=tokenizer(), callbacks=[cb])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        sft.train()
    assert [str(w.message) for w in record].count(MESSAGE) == 0

    assert cb.allocator.t == T and [a.step for a in cb.history] == list(range(1, T + 1))
    final = cb.history[-1]
    assert final.phase == "final" and cb.allocator.shrunk
    ranks = {n: m.r for n, m in adarank.svd_adapters(model)}
    assert sum(ranks.values()) == 2 * 14 and ranks == final.rank_dict()  # shrunk to the final budget
    assert len(set(ranks.values())) > 1  # allocated unevenly, not a fixed rank 2
    logged = [row for row in sft.state.log_history if "loss" in row]
    assert [row["alloc/budget"] for row in logged] == [cb.history[4].budget, cb.history[9].budget]
    assert all(row["orth"] > 0 for row in logged)
    exported = (tmp_path / "adapter" / "adapter_config.json").read_text()
    assert '"task_type": "CAUSAL_LM"' in exported
