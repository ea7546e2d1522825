"""The causal_lm data path: pack or bucket token sequences, batch them, and measure perplexity.

Two encodings, both returned as an `EncodedLM` that the `Batches` loader family can index:

* ``pretrain`` (continued pretraining, loss on every token): each text is tokenised, EOS appended, all
  texts concatenated in order and cut into full blocks of `block_size` (the tail that does not fill a
  block is dropped). Attention runs across document boundaries inside a block, as in GPT-style packing;
  the EOS between documents tells the model where one ends. Every step is a full (B, block_size) batch.
* ``instruct``: each example is prompt + target + EOS, truncated to `block_size`; labels are -100 on
  the prompt (loss on target tokens only) and on padding. Rows are sorted by length, longest first, so
  consecutive rows have similar lengths, and `LMBatches` keeps that bucketing when it shuffles.

Texts are tokenised without special tokens (no BOS/CLS is inserted; SmolLM2 and GPT-2 add none), and
prompt and target are tokenised separately, so the boundary of the loss mask is exact.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .loader import Batches
from .tokenize import EncodedSplit

IGNORE = -100  # the label torch's cross_entropy (and transformers' LM losses) skip
MODES = ("pretrain", "instruct")


class EncodedLM(EncodedSplit):
    """Token rows for causal LM training: an `EncodedSplit` whose labels are per token.

    input_ids (N, L) int32 right-padded (L = block_size when packed, else the longest row); lengths (N,);
    labels (N, L) int64 aligned with input_ids (the model shifts them), -100 where no loss is taken;
    token_type_ids always None (decoders have no segments).
    """

    def num_target_tokens(self) -> int:
        """Tokens that carry a loss (before the model's shift, which drops each row's first label)."""
        return int((self.labels != IGNORE).sum())


def encode_lm(texts: list[str], tokenizer: Any, block_size: int, mode: str,
              prompts: list[str] | None = None) -> EncodedLM:
    """Tokenise `texts` for causal LM training in `mode` "pretrain" or "instruct" (see the module doc).

    In "instruct" mode `texts` are the targets and `prompts[i]` the prompt of `texts[i]`; examples whose
    target is truncated away entirely are dropped with a warning (they would carry no loss).
    """
    if mode not in MODES:
        raise ValueError(f"encode_lm: mode must be one of {MODES}, got {mode!r}")
    if block_size < 2:
        raise ValueError(f"encode_lm: block_size must be >= 2, got {block_size}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("encode_lm: the tokenizer has no eos_token_id; documents need a separator")
    if mode == "pretrain":
        if prompts is not None:
            raise ValueError("encode_lm: prompts are only used in instruct mode")
        return _pack(_ids(tokenizer, texts), eos, block_size)
    if prompts is None or len(prompts) != len(texts):
        raise ValueError(f"encode_lm: instruct mode needs one prompt per text, got "
                         f"{None if prompts is None else len(prompts)} prompts for {len(texts)} texts")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return _bucket(_ids(tokenizer, prompts), _ids(tokenizer, texts), eos, pad, block_size)


def _ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False)["input_ids"]


def _pack(docs: list[list[int]], eos: int, block_size: int) -> EncodedLM:
    lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
    stream = np.full(int(lengths.sum()), eos, dtype=np.int32)  # EOS already in place after each document
    ends = np.cumsum(lengths)
    for doc, end in zip(docs, ends):
        stream[end - 1 - len(doc):end - 1] = doc
    n = len(stream) // block_size
    if n == 0:
        raise ValueError(f"encode_lm: {len(stream)} tokens do not fill one block of {block_size}")
    ids = torch.from_numpy(stream[:n * block_size].reshape(n, block_size).copy())
    return EncodedLM(input_ids=ids, lengths=torch.full((n,), block_size, dtype=torch.int32), labels=ids.long())


def _bucket(prompts: list[list[int]], targets: list[list[int]], eos: int, pad: int, block_size: int) -> EncodedLM:
    rows = []  # (ids, number of prompt tokens kept)
    for p, t in zip(prompts, targets):
        ids = (p + t + [eos])[:block_size]
        if len(ids) > len(p):
            rows.append((ids, len(p)))
    if len(rows) < len(prompts):
        warnings.warn(f"encode_lm: dropped {len(prompts) - len(rows)} of {len(prompts)} examples whose prompt "
                      f"fills block_size={block_size}, leaving no target token", stacklevel=3)
    # Longest first: an out-of-memory batch shows up at the first step, not hours in.
    rows.sort(key=lambda row: -len(row[0]))
    width = len(rows[0][0]) if rows else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.int32)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.int64)
    for i, (row, n_prompt) in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.int32)
        labels[i, n_prompt:len(row)] = ids[i, n_prompt:len(row)]
    lengths = torch.tensor([len(r) for r, _ in rows], dtype=torch.int32)
    return EncodedLM(input_ids=ids, lengths=lengths, labels=labels)


class LMBatches(Batches):
    """`Batches` over an `EncodedLM`: per-token labels are trimmed with the inputs, and shuffling keeps
    rows of similar length together.

    `Batches.batch` indexes `labels[idx]` whole, which for (N, L) labels would not match the trimmed
    (B, width) inputs; this subclass trims them (padding up to a length bucket stays within the stored
    labels, which are -100 past each row's end). With `shuffle`, an epoch's order is a seeded
    permutation cut into windows of `window` global batches; each window is sorted by length and its
    batches are then shuffled, so a batch holds rows of similar length (little padding) while which rows
    meet still changes from epoch to epoch. Packed data has equal lengths and gets a plain permutation.
    """

    def __init__(self, split: EncodedLM, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1, pin_memory: bool = False, window: int = 50,
                 buckets: Sequence[int] | None = None) -> None:
        super().__init__(split, batch_size, shuffle, seed=seed, drop_last=drop_last, rank=rank,
                         world_size=world_size, pin_memory=pin_memory, buckets=buckets)
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window

    def indices(self) -> torch.Tensor:
        lengths = self.split.lengths.numpy()
        if not self.shuffle or len(lengths) == 0 or lengths.min() == lengths.max():
            return super().indices()
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(lengths))
        group = self.batch_size * self.world_size  # rows of one step over all ranks
        span = group * self.window
        for lo in range(0, len(order), span):
            part = order[lo:lo + span]
            order[lo:lo + span] = part[np.argsort(-lengths[part], kind="stable")]
        n_full = len(order) // group
        # The partial group (if any) stays last, so every other group stays aligned to a step.
        perm = np.concatenate([rng.permutation(n_full), [n_full]])
        order = np.concatenate([order[g * group:(g + 1) * group] for g in perm])
        total = self.num_rows() * self.world_size
        if total > len(order):  # as in Batches: repeat from the start so every rank gets the same rows
            order = np.resize(order, total)
        return torch.from_numpy(order[self.rank:total:self.world_size].copy())

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().batch(idx)
        labels = self.split.labels[idx, :out["input_ids"].shape[1]]
        out["labels"] = labels.pin_memory() if self.pin_memory else labels
        return out


MAX_LOGITS = 1 << 28  # logits per forward pass in `perplexity` (512 MiB in bf16)


@torch.no_grad()
def perplexity(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]],
               device: torch.device | str) -> dict[str, float]:
    """Mean next-token NLL over all non-ignored target tokens, and ppl = exp(NLL).

    The NLL is a token-weighted mean (a sum over every batch divided by the token count), not a mean of
    batch means, so it does not depend on how the rows were batched. Returns {"nll", "ppl", "tokens"}.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    try:
        for b in batches:
            ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
            # (B, L, V) logits of a 49k vocabulary are large (128 blocks of 512 tokens: 6 GiB in bf16), so
            # the rows go through the model in chunks of at most MAX_LOGITS logits
            rows = max(1, MAX_LOGITS // (ids.shape[1] * vocab)) if vocab else ids.shape[0]
            for s in range(0, ids.shape[0], rows):
                out = model(input_ids=ids[s:s + rows].to(device, non_blocking=True),
                            attention_mask=mask[s:s + rows].to(device, non_blocking=True))
                logits = out.logits if hasattr(out, "logits") else out
                target = labels[s:s + rows, 1:].to(device, non_blocking=True)
                keep = target != IGNORE
                # gather the kept positions before the fp32 copy
                nll = F.cross_entropy(logits[:, :-1][keep].float(), target[keep], reduction="sum")
                total += nll.double()
                count += int(keep.sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("perplexity: no target tokens in the batches")
    nll = total.item() / count
    return {"nll": nll, "ppl": math.exp(nll), "tokens": count}
