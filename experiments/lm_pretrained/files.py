"""The lm_pretrained domains as corpora on disk: each domain's text written once as a jsonl file
of documents (cached), and read back through ``data=files`` (streamed, tokenized on the fly by
SmolLM2's tokenizer, packed into sequences with an end-of-document token between documents).

The in-memory builder (:mod:`.builders`) tokenizes each domain as one stream and keeps
``per_domain`` random sequences of it; here each domain keeps its first ``per_domain`` sequences'
worth of tokens (``data.max_tokens``), its documents are shuffled by the stream every epoch, and
the meta and test sets are the last news documents, held out of the news file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from bilevel_experiments.lm_pretrained.builders import DOMAINS, domain_texts

from bilevel.data.checks import check_counts, check_seed
from bilevel.data.corpus import CorpusData, files
from bilevel.errors import ConfigError
from bilevel.files import write_text_atomic

log = logging.getLogger("bilevel.experiments")

__all__ = ["lm_pretrained_files", "write_corpora"]

#: news documents held out for the meta and the test sets
HELD_OUT = (40, 80)


def _documents(name: str, text: str) -> list[str]:
    if name == "docs":
        parts = text.split("\n\n")
    else:
        parts = text.splitlines()
    return [p.strip() for p in parts if len(p.strip()) > 20]


def write_corpora(root: Path) -> Path:
    """Write the domains' documents under ``root`` (once: an existing, complete folder is
    reused); returns ``root``."""
    done = root / "complete.json"
    if done.is_file():
        return root
    from bilevel_experiments.lm_pretrained.model import load_tokenizer

    tok = load_tokenizer()
    texts = domain_texts()
    gen = torch.Generator().manual_seed(0)
    for name in DOMAINS:
        if name == "noise":  # random tokens, as the in-memory domain, written out as text
            ids = torch.randint(0, len(tok), (400, 40), generator=gen)
            docs = [tok.decode(row.tolist()) for row in ids]
        else:
            docs = _documents(name, texts[name])
        if name == "news":
            meta_n, test_n = HELD_OUT
            held, docs = docs[-(meta_n + test_n) :], docs[: -(meta_n + test_n)]
            _write(root / "meta.jsonl", held[:meta_n])
            _write(root / "test.jsonl", held[meta_n:])
        _write(root / f"{name}.jsonl", docs)
    tok.save_pretrained(str(root / "tokenizer"))
    write_text_atomic(done, json.dumps({"domains": list(DOMAINS)}))
    return root


def _write(path: Path, docs: list[str]) -> None:
    write_text_atomic(path, "".join(json.dumps({"text": d}) + "\n" for d in docs))


def lm_pretrained_files(
    seq_len: int = 32,
    per_domain: int = 600,
    target: str = "news",
    meta_size: int = 32,
    test_size: int = 64,
    seed: int = 0,
    root: str | None = None,
) -> CorpusData:
    """The six domains read from jsonl files (written under ``root``, default
    ``$BILEVEL_CACHE/lm_pretrained_corpus`` or ``~/.cache/bilevel/...``, on first use)."""
    check_counts(seq_len=(seq_len, 2), per_domain=(per_domain, 1))
    if target != "news":
        raise ConfigError("data.target", "the files study holds out news only")
    seed = check_seed(seed)
    base = Path(os.path.expanduser(os.environ.get("BILEVEL_CACHE", "~/.cache/bilevel")))
    folder = write_corpora(Path(root) if root else base / "lm_pretrained_corpus")
    return files(
        domains={name: str(folder / f"{name}.jsonl") for name in DOMAINS},
        meta=str(folder / "meta.jsonl"),
        test=str(folder / "test.jsonl"),
        tokenizer=str(folder / "tokenizer"),
        seq_len=seq_len,
        meta_size=meta_size,
        test_size=test_size,
        max_tokens=per_domain * (seq_len + 1),
        hf_inputs=True,
        seed=seed,
    )
