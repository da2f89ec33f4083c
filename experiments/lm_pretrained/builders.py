"""Natural-text domains for a pretrained causal LM, offline, from what installed packages ship.

=============== ====================================================================
``news``         the Lee corpus of Australian news (gensim's test data)
``encyclopedia`` the first 500 articles of an English Wikipedia dump (gensim's test data)
``reviews``      movie-review sentences of Pang & Lee's polarity data (gensim's test data)
``dialogs``      the English dialogs of chatterbot-corpus
``docs``         docstrings of Python standard-library modules and their functions/classes
``noise``        uniformly random tokens
=============== ====================================================================

Each domain's text is tokenized with SmolLM2's tokenizer as one stream and cut into sequences of
``seq_len + 1`` tokens (inputs and next-token targets); a domain keeps at most ``per_domain`` of
them, so their natural sizes differ (temperature sampling has something to act on). The meta
and test sets are held-out sequences of the ``target`` domain, never in the training data.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bilevel import module_state
from bilevel.data.checks import check_counts, check_seed
from bilevel.data.columns import Columns, chunks, domain_columns
from bilevel.data.domain_data import DomainData
from bilevel.data.evaluate import output_logits
from bilevel.errors import ConfigError
from bilevel.functional import forward_batch

log = logging.getLogger("bilevel.experiments")  # the run's terminal and cli.log

__all__ = ["DOMAINS", "domain_texts", "lm_metrics", "lm_pretrained"]

DOMAINS = ("news", "encyclopedia", "reviews", "dialogs", "docs", "noise")
STDLIB = (
    "argparse",
    "bisect",
    "collections",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "functools",
    "heapq",
    "itertools",
    "json",
    "logging",
    "math",
    "os",
    "pathlib",
    "random",
    "re",
    "shutil",
    "statistics",
    "string",
    "subprocess",
    "textwrap",
    "typing",
    "unittest",
    "zipfile",
)


def _gensim_data(name: str) -> str:
    try:
        import gensim
    except ImportError as err:
        raise ConfigError(
            "data", 'lm_pretrained needs the [lm] extra: pip install -e ".[lm]"'
        ) from err
    return (Path(gensim.__file__).parent / "test" / "test_data" / name).read_text(
        encoding="utf-8", errors="replace"
    )


def _docstrings() -> str:
    import importlib

    parts = []
    for name in STDLIB:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr in sorted(dir(module)):
            obj = getattr(module, attr, None)
            if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            doc = inspect.getdoc(obj)
            if doc and getattr(obj, "__module__", "") == name:
                parts.append(doc)
    return "\n\n".join(p for p in parts if p)


def _dialogs() -> str:
    from bilevel_experiments.text_domains.builders import corpus_texts

    return "\n".join(line for lines in corpus_texts().values() for line in lines)


def domain_texts() -> dict[str, str]:
    """The raw text of every domain but ``noise``."""
    return {
        "news": _gensim_data("lee_background.cor"),
        "encyclopedia": _gensim_data("head500.noblanks.cor"),
        "reviews": _gensim_data("pang_lee_polarity.cor"),
        "dialogs": _dialogs(),
        "docs": _docstrings(),
    }


@torch.no_grad()
def lm_metrics(model: nn.Module, columns: Columns, device: torch.device) -> dict[str, float]:
    """Next-token ``loss`` and ``perplexity`` on ``columns`` (small chunks: the vocabulary is
    49K, so a batch's logits are large)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    with module_state.evaluation(model):
        for batch in chunks(columns, 16):
            logits = output_logits(forward_batch(model, batch)).float()
            y = batch["y"]
            total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").double()
            count += y.numel()
    loss = total.item() / count
    return {"loss": loss, "perplexity": float(torch.tensor(loss).exp())}


def _sequences(ids: list[int], length: int) -> torch.Tensor:
    n = len(ids) // length
    return torch.tensor(ids[: n * length], dtype=torch.int64).view(n, length)


def lm_pretrained(
    seq_len: int = 32,
    per_domain: int = 600,
    target: str = "news",
    meta_size: int = 32,
    test_size: int = 64,
    seed: int = 0,
    extra_meta: int = 0,
) -> DomainData:
    """Build the six domains (see the module doc) and the target's meta and test sets.

    ``extra_meta`` adds that many held-out target sequences to the meta set, taken from those
    the training part leaves unused (news holds ~2,300 sequences, training takes 600), so
    that the meta set grows while the test set and the training data stay the same: the
    study's measure of what the meta set's size does.
    """
    check_counts(
        seq_len=(seq_len, 2),
        per_domain=(per_domain, 1),
        meta_size=(meta_size, 1),
        test_size=(test_size, 1),
        extra_meta=(extra_meta, 0),
    )
    if target not in DOMAINS or target == "noise":
        raise ConfigError("data.target", f"must be one of {', '.join(DOMAINS[:-1])}")
    seed = check_seed(seed)  # before the tokenizer loads (seconds)
    from bilevel_experiments.lm_pretrained.model import load_tokenizer

    tok = load_tokenizer()
    gen = torch.Generator().manual_seed(seed)
    texts = domain_texts()
    parts, sizes, meta, test = [], {}, None, None
    for name in DOMAINS:
        if name == "noise":
            seqs = torch.randint(0, len(tok), (per_domain // 2, seq_len + 1), generator=gen)
        else:
            ids = tok(texts[name], add_special_tokens=False)["input_ids"]
            seqs = _sequences(ids, seq_len + 1)
            seqs = seqs[torch.randperm(len(seqs), generator=gen)]
            if name == target:
                if meta_size + test_size >= len(seqs):
                    raise ConfigError(
                        "data.meta_size",
                        f"the target {target!r} holds {len(seqs)} sequences of {seq_len + 1} "
                        f"tokens: meta_size + test_size = {meta_size + test_size} leave none "
                        "for training; lower them",
                    )
                meta, test = seqs[:meta_size], seqs[meta_size : meta_size + test_size]
                seqs = seqs[meta_size + test_size :]
                if extra_meta:
                    if per_domain + extra_meta > len(seqs):
                        raise ConfigError(
                            "data.extra_meta",
                            f"the target {target!r} has {len(seqs) - per_domain} sequences "
                            f"beyond its training part, fewer than extra_meta={extra_meta}",
                        )
                    meta = torch.cat([meta, seqs[per_domain : per_domain + extra_meta]])
            seqs = seqs[:per_domain]
        sizes[name] = len(seqs)
        parts.append(_columns(seqs))
    short = {n: k for n, k in sizes.items() if n != "noise" and k < per_domain}
    if short:
        log.warning(
            f"note: data.per_domain={per_domain} is more than "
            + ", ".join(f"{n} holds ({k})" for n, k in short.items())
            + f" in sequences of {seq_len + 1} tokens: those domains train on all they hold "
            "(the summary's info.sequences has each domain's count)"
        )
    return DomainData(
        names=list(DOMAINS),
        train=domain_columns(parts),
        meta=_columns(meta),
        test=_columns(test),
        evaluate=lm_metrics,
        info={"sequences": sizes, "target": target},
    )


def _columns(seqs: torch.Tensor) -> Columns:
    return {
        "x": {"input_ids": seqs[:, :-1], "attention_mask": torch.ones_like(seqs[:, :-1])},
        "y": seqs[:, 1:],
    }
