"""adarank.runner.data.buckets: the bucket forms, their one-line errors, and padding up to a bucket changing no
loss (the tiny BERT's classification loss, the tiny Llama's token loss with -100 labels)."""

from __future__ import annotations

import pytest
import torch

import adarank.runner.config as C
from adarank.runner.data import Batches, EncodedSplit
from adarank.runner.data.buckets import padded_width, resolve_buckets, shapes_of_epoch
from adarank.runner.data.causal import IGNORE, EncodedLM, LMBatches

from conftest import VOCAB, tiny_bert, tiny_llama

#: fp32 on a CPU: padding changes the reduction lengths of the matmuls and softmaxes (masked entries add
#: exact zeros), so the losses agree to rounding, not bit for bit
RTOL, ATOL = 1e-5, 1e-6


@pytest.mark.parametrize("spec,max_length,expected", [
    ("none", 64, None),
    ("pow2", 64, [8, 16, 32, 64]),
    ("pow2", 100, [8, 16, 32, 64, 100]),  # the largest bucket is always max_length
    ("pow2", 8, [8]),
    ("multiple:32", 64, [32, 64]),
    ("multiple:30", 64, [30, 60, 64]),
    ("multiple:100", 64, [64]),
    ([64, 16, 16], 64, [16, 64]),  # sorted, deduplicated
    ([16], 64, [16, 64]),  # max_length added, so every row has a bucket
])
def test_each_form_resolves_to_sorted_widths_ending_at_max_length(spec, max_length, expected):
    assert resolve_buckets(spec, max_length) == expected


@pytest.mark.parametrize("spec,match", [
    ("pow3", "must be none, pow2, multiple:N"), ("multiple:0", "multiple:0"), ("multiple:x", "multiple:x"),
    (None, "got None"), (1.5, "got 1.5"), (32, r"a list: \[N\]"), ([], "empty"), ([True], "got True"),
    ([0, 8], "got 0"), ([8, "a"], "'a'"),
])
def test_a_bad_form_is_one_line_naming_the_field(spec, match):
    with pytest.raises(ValueError, match=match) as info:
        C.DataConfig(length_buckets=spec)
    assert str(info.value).startswith("data.length_buckets: ") and "\n" not in str(info.value)


def test_a_bucket_past_max_length_or_more_buckets_than_captured_graphs_is_refused():
    with pytest.raises(ValueError, match=r"^data.length_buckets: 128 exceeds task.max_length=64"):
        C.Config(data=C.DataConfig(length_buckets=[32, 128]))
    with pytest.raises(ValueError, match=r"^train.cuda_graph_shapes: 3 is fewer than the 4 data.length_buckets"):
        C.Config(data=C.DataConfig(length_buckets="pow2"), train=C.TrainConfig(cuda_graph=True, cuda_graph_shapes=3))
    C.Config(data=C.DataConfig(length_buckets="pow2"), train=C.TrainConfig(cuda_graph=True, cuda_graph_shapes=4))


def test_the_width_is_the_smallest_bucket_holding_the_row_but_never_past_the_stored_width():
    assert [padded_width(n, [8, 16, 32], 30) for n in (1, 8, 9, 16, 17, 30)] == [8, 8, 16, 16, 30, 30]
    assert padded_width(13, None, 30) == 13  # dynamic padding
    assert padded_width(0, [8], 30) == 0  # an empty batch


def _split(n: int = 24, seed: int = 0) -> EncodedSplit:
    """Random rows of 3..22 tokens, right-padded with id 0 to the longest (22); types 1 on the second half."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 23, (n,), generator=g, dtype=torch.int32)
    lengths[0] = 22
    width = int(lengths.max())
    real = torch.arange(width) < lengths[:, None].long()
    ids = torch.where(real, torch.randint(1, VOCAB, (n, width), generator=g, dtype=torch.int32), 0)
    types = (real & (torch.arange(width) >= (lengths[:, None] // 2))).int()
    return EncodedSplit(input_ids=ids, lengths=lengths, labels=torch.randint(0, 2, (n,), generator=g),
                        token_type_ids=types)


def test_bucketed_batches_hold_the_same_rows_padded_with_the_stored_padding():
    split = _split()
    plain, bucketed = Batches(split, 5, shuffle=True, seed=3), Batches(split, 5, shuffle=True, seed=3, buckets=[8, 16])
    widths = set()
    for a, b in zip(plain, bucketed, strict=True):
        w, wb = a["input_ids"].shape[1], b["input_ids"].shape[1]
        assert wb == (8 if w <= 8 else 16 if w <= 16 else 22)  # 22: the stored width, not the bucket max_length
        widths.add(wb)
        for k in ("input_ids", "attention_mask", "token_type_ids"):
            assert torch.equal(b[k][:, :w], a[k]) and not b[k][:, w:].any(), k  # pad id 0, mask 0, type 0
        assert torch.equal(b["labels"], a["labels"])
    assert widths <= {8, 16, 22}
    assert {w for _, w in shapes_of_epoch(split.lengths.numpy(), bucketed.indices().numpy(), 5, [8, 16], 22)} == widths


def test_padding_a_bert_batch_up_to_a_bucket_changes_no_loss_and_no_logit():
    model, split = tiny_bert(), _split()
    with torch.no_grad():  # BERT's 0.02 init attends almost uniformly: an unmasked pad would move the loss by 4e-6
        g = torch.Generator().manual_seed(5)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)  # here by 6e-4 to 4e-3, far above RTOL
    for a, b in zip(Batches(split, 6, shuffle=False), Batches(split, 6, shuffle=False, buckets=[16, 32]), strict=True):
        assert b["input_ids"].shape[1] > a["input_ids"].shape[1] or a["input_ids"].shape[1] == 22
        out_a, out_b = model(**a), model(**b)
        torch.testing.assert_close(out_b.loss, out_a.loss, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(out_b.logits, out_a.logits, rtol=RTOL, atol=ATOL)


def _lm_split(n: int = 12, seed: int = 0) -> EncodedLM:
    """Instruct-style rows: a prompt without loss, a target with it, -100 past each row's end (as encode_lm)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 13, (n,), generator=g, dtype=torch.int32)
    lengths[0] = 20  # the stored width; the other batches are padded up to 8 or 16
    real = torch.arange(20) < lengths[:, None].long()
    ids = torch.where(real, torch.randint(1, VOCAB, (n, 20), generator=g, dtype=torch.int32), 0)
    target = real & (torch.arange(20) >= 2)  # two prompt tokens
    return EncodedLM(input_ids=ids, lengths=lengths, labels=torch.where(target, ids.long(), IGNORE))


def test_padding_a_llama_batch_up_to_a_bucket_changes_no_token_loss():
    model, split = tiny_llama(), _lm_split()
    plain, bucketed = LMBatches(split, 4, shuffle=False), LMBatches(split, 4, shuffle=False, buckets=[8, 16])
    padded = 0
    for a, b in zip(plain, bucketed, strict=True):
        w = a["input_ids"].shape[1]
        assert (b["labels"][:, w:] == IGNORE).all() and not b["attention_mask"][:, w:].any()
        padded += b["input_ids"].shape[1] > w
        torch.testing.assert_close(model(**b).loss, model(**a).loss, rtol=RTOL, atol=ATOL)
    assert padded  # some batch was padded past its longest row
