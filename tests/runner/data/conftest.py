"""Shared fixtures: a tiny in-memory WordPiece tokenizer (no downloads)."""

from __future__ import annotations

import pytest

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c", "d", "hello", "world", "the", "cat", "sat", "."]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)})
