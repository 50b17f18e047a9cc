"""Tokenisers: byte-level (default, no training, no files) or a Hugging Face ``tokenizers`` BPE."""
from __future__ import annotations

import json
import os

import numpy as np

from ultramem_jax.errors import UsageError


class ByteTokenizer:
    """UTF-8 bytes 0..255, plus an end-of-document token 256."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def save(self, path: str):
        with open(path, "w") as f:
            json.dump({"type": "byte"}, f)


class BPETokenizer:
    """A byte-level BPE from Hugging Face ``tokenizers`` (trained on the corpus, or loaded from a file)."""

    name = "bpe"
    EOS = "<|endoftext|>"

    def __init__(self, tok):
        self._tok = tok
        self.eos_id = tok.token_to_id(self.EOS)
        if self.eos_id is None:
            raise UsageError(f"tokenizer has no {self.EOS} token")
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def train(cls, texts, vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[cls.EOS],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str) -> "BPETokenizer":
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_file(path))
        except UsageError:
            raise
        except Exception as e:  # the library raises bare Exceptions on malformed files
            raise UsageError(f"tokenizer {path} is unreadable: {str(e).splitlines()[0][:200]}") from None

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, np.int32)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def save(self, path: str):
        self._tok.save(path)


def load_tokenizer(spec: str):
    """``byte`` or a tokenizer file (``tokenizer.json`` written by ``save`` or by HF tokenizers)."""
    if spec == "byte":
        return ByteTokenizer()
    if not os.path.isfile(spec):
        raise UsageError(f"data.tokenizer: {spec!r} is neither 'byte', 'bpe' nor an existing tokenizer file")
    try:
        with open(spec) as f:
            head = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"tokenizer {spec} is unreadable: {type(e).__name__}: {str(e)[:120]}") from None
    if isinstance(head, dict) and head.get("type") == "byte":
        return ByteTokenizer()
    return BPETokenizer.load(spec)
