"""Shared tiny CPU models for the algorithm tests.

Every model is built from a fixed seed, with dropout off, so two calls give bit-identical copies: one
copy is wrapped by PEFT and one by adarank, and the tests compare them.
"""

from __future__ import annotations

import os

import torch

# Without a GPU, adarank/fast/kernels.py's Triton kernels run in Triton's interpreter (fp16 only), so the CPU tests
# cover them: this must be set before adarank (and with it Triton) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from torch import nn
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

import adarank

# The models here are tiny: intra-op threads only add synchronisation (on a busy 2-core machine a 16-wide
# LayerNorm took 3 ms with 2 threads and 20 µs with 1), so the whole suite runs single-threaded.
torch.set_num_threads(1)

#: Suffixes adapted in the tiny BERT: query/value (16×16), attention.output.dense (16×16),
#: intermediate.dense (16→32), output.dense (32→16) and pooler.dense (16×16), so the allocator sees
#: three different matrix shapes.
BERT_TARGETS = ["query", "value", "dense"]
GPT2_TARGETS = ["c_attn", "c_proj"]
VOCAB = 50


def tiny_bert(layers: int = 2, seed: int = 0) -> BertForSequenceClassification:
    """BERT with vocab 50, hidden 16, 2 heads, intermediate 32, 2 labels, no dropout, eval mode."""
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """GPT-2 (Conv1D projections) with vocab 50, width 16, 2 layers, 2 heads, no dropout, eval mode."""
    cfg = GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg).eval()


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    """Llama (q, k, v on one input; gate and up on one input) with vocab 50, width 16, 4 heads with 2 KV
    heads, intermediate 24, eval mode."""
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=24, max_position_embeddings=32, use_cache=False,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def adamw_curve(model: nn.Module, batches: list[dict[str, torch.Tensor]], lr: float = 1e-2) -> list[float]:
    """Train `model`'s trainable parameters with AdamW, one step per batch; the losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    curve = []
    for b in batches:
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        curve.append(loss.item())
    return curve


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ over the whole tensor, in fp32: half-precision results are compared this way, since one
    element's bf16 cancellation can make its own relative error large."""
    return float((a.float() - b.float()).norm() / b.float().norm())


def make_batch(n: int = 4, seq: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[0, -2:] = 0  # one padded row, so the attention mask matters
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (n,), generator=g)}


def svd_bert(layers: int = 2, r: int = 4, alpha: float = 4.0, seed: int = 0, **kw):
    """(model, report) of a tiny BERT with SVD adapters on BERT_TARGETS and a trainable classifier."""
    model = tiny_bert(layers=layers, seed=seed)
    torch.manual_seed(seed + 100)  # adapter init
    kw.setdefault("train_modules", ["classifier"])
    rep = adarank.inject(model, "svd", r=r, alpha=alpha, targets=BERT_TARGETS, **kw)
    return model, rep


@torch.no_grad()
def randomize_lams(model: nn.Module, seed: int = 3, std: float = 0.5) -> None:
    """Give every λ a nonzero value (fresh SVD adapters have λ = 0 and would compute nothing)."""
    g = torch.Generator().manual_seed(seed)
    for _, m in adarank.svd_adapters(model):
        m.lam.copy_(torch.randn(m.lam.shape, generator=g) * std)


@torch.no_grad()
def drive(layers, t: int, scale: float = 0.05, skip: tuple[str, ...] = ()) -> None:
    """Mimic one training step on SVD adapters without a forward pass: a seeded random update of every
    P, λ, Q (as an optimizer would make, so λ leaves 0) and seeded random gradients. Layers named in
    `skip` get neither (their gradients stay None)."""
    g = torch.Generator().manual_seed(1000 + t)
    for name, m in layers:
        for role in ("P", "lam", "Q"):
            p = getattr(m, role)
            delta = (torch.randn(p.shape, generator=g) * scale).to(p.dtype)
            grad = torch.randn(p.shape, generator=g).to(p.dtype)
            if name in skip:
                p.grad = None
                continue
            p.add_(delta)
            p.grad = grad


@pytest.fixture
def bert() -> BertForSequenceClassification:
    return tiny_bert()


@pytest.fixture
def gpt2() -> GPT2LMHeadModel:
    return tiny_gpt2()


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    return make_batch()
