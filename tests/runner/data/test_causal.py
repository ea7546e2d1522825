import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adarank.runner.data.causal import IGNORE, EncodedLM, LMBatches, encode_lm, perplexity
from adarank.runner.data.loader import Batches

WORDS = ["<pad>", "<unk>", "</s>"] + [f"w{i}" for i in range(13)]
PAD, EOS = 0, 2


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def decoder():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=PAD, eos_token_id=EOS)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _text(ids):
    return " ".join(WORDS[i] for i in ids)


DOCS = [[3, 4, 5], [6], [7, 8, 9, 10, 11], [12, 13], [14, 15, 3, 4]]


def test_pretrain_packs_full_blocks_in_order(tok):
    enc = encode_lm([_text(d) for d in DOCS], tok, block_size=4, mode="pretrain")
    stream = [t for d in DOCS for t in d + [EOS]]  # 20 tokens
    assert enc.input_ids.shape == (5, 4) and enc.input_ids.dtype == torch.int32
    assert enc.input_ids.flatten().tolist() == stream[:20]
    assert enc.lengths.tolist() == [4] * 5
    assert enc.labels.dtype == torch.int64 and torch.equal(enc.labels, enc.input_ids.long())
    assert enc.token_type_ids is None

    enc = encode_lm([_text(d) for d in DOCS], tok, block_size=6, mode="pretrain")
    assert enc.input_ids.shape == (3, 6)  # 20 tokens: 3 full blocks, the last 2 dropped
    assert enc.input_ids.flatten().tolist() == stream[:18]


def test_pretrain_too_short(tok):
    with pytest.raises(ValueError, match="one block"):
        encode_lm(["w0 w1"], tok, block_size=8, mode="pretrain")


def test_instruct_masks_prompt_and_padding(tok):
    prompts = ["w0 w1", "w2", "w3 w4 w5 w6"]
    targets = ["w7", "w8 w9 w10", "w11 w12"]
    enc = encode_lm(targets, tok, block_size=6, mode="instruct", prompts=prompts)
    # Rows longest first; the third example (4 + 2 + EOS = 7) is truncated to 6.
    assert enc.lengths.tolist() == [6, 5, 4]
    rows = {tuple(r[:n]) for r, n in zip(enc.input_ids.tolist(), enc.lengths.tolist())}
    assert rows == {(3, 4, 10, EOS), (5, 11, 12, 13, EOS), (6, 7, 8, 9, 14, 15)}
    by_first = {enc.input_ids[i, 0].item(): i for i in range(3)}
    assert enc.labels[by_first[3]].tolist() == [IGNORE, IGNORE, 10, EOS, IGNORE, IGNORE]
    assert enc.labels[by_first[5]].tolist() == [IGNORE, 11, 12, 13, EOS, IGNORE]
    assert enc.labels[by_first[6]].tolist() == [IGNORE] * 4 + [14, 15]
    assert enc.input_ids[by_first[3], 4:].tolist() == [PAD, PAD]
    assert enc.num_target_tokens() == 2 + 4 + 2


def test_instruct_drops_examples_without_target(tok):
    with pytest.warns(UserWarning, match="dropped 1 of 2"):
        enc = encode_lm(["w0", "w1"], tok, block_size=3, mode="instruct", prompts=["w2 w3 w4", "w5"])
    assert enc.input_ids.tolist() == [[8, 4, EOS]]


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="mode"):
        encode_lm(["w0"], tok, 4, mode="chat")
    with pytest.raises(ValueError, match="one prompt per text"):
        encode_lm(["w0"], tok, 4, mode="instruct")


def _ragged(n=11, width=9):
    lengths = torch.tensor([(3 * i) % 7 + 1 for i in range(n)], dtype=torch.int32)
    ids = torch.zeros(n, width, dtype=torch.int32)
    labels = torch.full((n, width), IGNORE, dtype=torch.int64)
    for i, m in enumerate(lengths.tolist()):
        ids[i, :m] = 100 + i
        labels[i, 1:m] = 100 + i
    return EncodedLM(input_ids=ids, lengths=lengths, labels=labels)


def test_lm_batches_trim_labels_with_inputs():
    split = _ragged()
    # The plain loader cannot take per-token labels: they keep the full width.
    plain = next(iter(Batches(split, 4, shuffle=False)))
    assert plain["labels"].shape[1] == 9 and plain["input_ids"].shape[1] == 7
    for b in LMBatches(split, 4, shuffle=False):
        assert b["labels"].shape == b["input_ids"].shape
        assert torch.equal(b["attention_mask"].sum(1), (b["input_ids"] > 0).sum(1))


@pytest.mark.parametrize("world_size", [1, 2])
def test_lm_batches_shuffle_buckets_by_length(world_size):
    n = 400
    lengths = torch.randint(1, 65, (n,), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    ids = (torch.arange(64) < lengths[:, None]).int() * (torch.arange(n)[:, None] + 1).int()
    split = EncodedLM(input_ids=ids, lengths=lengths, labels=ids.long())
    seen, padded, plain_padded = [], 0, 0
    for rank in range(world_size):
        loader = LMBatches(split, 8, shuffle=True, seed=3, rank=rank, world_size=world_size, window=10)
        plain = Batches(split, 8, shuffle=True, seed=3, rank=rank, world_size=world_size)
        for b in loader:
            seen += (b["input_ids"][:, 0] - 1).tolist()
            padded += (1 - b["attention_mask"]).sum().item()
        for b in plain:
            plain_padded += (1 - b["attention_mask"]).sum().item()
    assert sorted(seen) == list(range(n))  # every row once per epoch
    assert padded < plain_padded / 5
    a = LMBatches(split, 8, shuffle=True, seed=3)
    first = a.indices()
    a.set_epoch(1)
    assert not torch.equal(first, a.indices())
    a.set_epoch(0)
    assert torch.equal(first, a.indices())  # a pure function of (seed, epoch)


def _hand_nll(model, enc):
    """Sum of -log p(label_t | tokens < t) over every row, one unpadded row at a time."""
    total, count = 0.0, 0
    for ids, n, labels in zip(enc.input_ids, enc.lengths, enc.labels):
        with torch.no_grad():
            logits = model(input_ids=ids[None, :n].long()).logits[0]
        logp = torch.log_softmax(logits.double(), -1)
        for t in range(1, n):
            if labels[t] != IGNORE:
                total -= logp[t - 1, labels[t]].item()
                count += 1
    return total, count


def test_perplexity_is_token_weighted(tok, decoder):
    prompts = ["w0 w1 w2 w3 w4", "w5", "w6 w7", "w8", "w9 w10 w11"]
    targets = ["w12", "w0 w1 w2 w3 w4 w5", "w7", "w9 w9", "w1"]
    enc = encode_lm(targets, tok, block_size=12, mode="instruct", prompts=prompts)
    total, count = _hand_nll(decoder, enc)
    res = perplexity(decoder, LMBatches(enc, batch_size=2, shuffle=False), "cpu")
    assert res["tokens"] == count == 2 + 7 + 2 + 3 + 2
    assert res["nll"] == pytest.approx(total / count, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    # The batches have different token counts, so a mean of batch means would differ.
    batch_means = []
    for b in LMBatches(enc, batch_size=2, shuffle=False):
        logits = decoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        batch_means.append(F.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten()).item())
    assert abs(sum(batch_means) / len(batch_means) - res["nll"]) > 1e-3


def test_perplexity_packed_matches_hand(tok, decoder):
    enc = encode_lm([_text(d) for d in DOCS], tok, block_size=5, mode="pretrain")
    total, count = _hand_nll(decoder, enc)
    res = perplexity(decoder, LMBatches(enc, batch_size=3, shuffle=False), "cpu")
    assert res["tokens"] == count == 4 * 4
    assert res["nll"] == pytest.approx(total / count, rel=1e-5)


class Uniform(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, attention_mask=None):
        return torch.zeros(*input_ids.shape, self.vocab)


def test_uniform_model_has_ppl_vocab_size(tok):
    enc = encode_lm([_text(d) for d in DOCS], tok, block_size=4, mode="pretrain")
    model = Uniform(len(WORDS)).train()
    res = perplexity(model, LMBatches(enc, batch_size=2, shuffle=False), "cpu")
    assert res["ppl"] == pytest.approx(len(WORDS), rel=1e-6)
    assert model.training  # mode restored


def test_perplexity_bounds_the_logits_of_one_forward_pass(tok, decoder, monkeypatch):
    import adarank.runner.data.causal as causal

    enc = encode_lm([_text(d) for d in DOCS], tok, block_size=5, mode="pretrain")
    whole = perplexity(decoder, LMBatches(enc, batch_size=4, shuffle=False), "cpu")
    rows_seen = []
    forward = decoder.forward

    def spy(*args, **kwargs):
        rows_seen.append(kwargs["input_ids"].shape[0])
        return forward(*args, **kwargs)

    monkeypatch.setattr(decoder, "forward", spy)
    # room for exactly one row of logits per forward pass: the batches of 4 go through row by row
    monkeypatch.setattr(causal, "MAX_LOGITS", 5 * decoder.config.vocab_size)
    chunked = perplexity(decoder, LMBatches(enc, batch_size=4, shuffle=False), "cpu")
    assert set(rows_seen) == {1} and len(rows_seen) == len(enc.input_ids)
    assert chunked["tokens"] == whole["tokens"] and chunked["nll"] == pytest.approx(whole["nll"], rel=1e-6)
