"""Tokenizers for corpora on disk: a built-in byte-level one (``bytes``) and any Hugging Face
tokenizer available offline, behind one small interface (:class:`Tokenizer`)."""

from __future__ import annotations

import os
from typing import Any, Protocol

import numpy as np

from bilevel.errors import ConfigError

__all__ = ["ByteTokenizer", "HFTokenizer", "Tokenizer", "load_tokenizer"]


class Tokenizer(Protocol):
    """What a corpus needs of a tokenizer: ``encode`` a batch of documents to token ids,
    the id that ends a document (``eod_id``), and the vocabulary size."""

    name: str
    vocab_size: int
    eod_id: int

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """One int64 array of token ids per text (no special tokens added)."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, then two specials: 256 ends a document, 257 pads.

    For tests and demos: no download, no vocabulary file, and any text round-trips
    (:meth:`decode`)."""

    name = "bytes"
    vocab_size = 258
    eod_id = 256
    pad_id = 257

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        return [
            np.frombuffer(t.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int64)
            for t in texts
        ]

    def decode(self, ids: Any) -> str:
        data = bytes(int(i) for i in np.asarray(ids).reshape(-1) if int(i) < 256)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local path or the local cache (nothing is
    fetched); documents end with its end-of-sequence token."""

    def __init__(self, name: str) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ConfigError(
                "data.tokenizer",
                f"{name!r} is a Hugging Face tokenizer, which needs transformers: pip install "
                "-e '.[hf]', or use data.tokenizer=bytes",
            ) from None
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except Exception as err:  # noqa: BLE001 - any failure to load is the same input error
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(
                "data.tokenizer",
                f"cannot load tokenizer {name!r} offline ({first[:200]}): give a local folder "
                "holding tokenizer.json / tokenizer_config.json, a name in the local Hugging "
                "Face cache, or data.tokenizer=bytes",
            ) from None
        eod = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        if eod is None:
            raise ConfigError(
                "data.tokenizer",
                f"tokenizer {name!r} has no end-of-sequence (or separator) token to end each "
                "document with",
            )
        self.name = name
        self.tok = tok
        self.eod_id = int(eod)
        self.vocab_size = len(tok)

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        if not texts:
            return []
        ids = self.tok(texts, add_special_tokens=False)["input_ids"]
        return [np.asarray(i, dtype=np.int64) for i in ids]


def load_tokenizer(name: str | None) -> Tokenizer:
    """``bytes`` (the built-in byte-level tokenizer) or a Hugging Face tokenizer, offline."""
    if name is None or str(name).strip() == "":
        raise ConfigError("data.tokenizer", "is empty: give bytes or a local tokenizer")
    name = os.path.expanduser(str(name))
    if name == "bytes":
        return ByteTokenizer()
    return HFTokenizer(name)
