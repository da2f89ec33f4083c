"""Topic classification on the English dialogs that ``chatterbot-corpus`` bundles in its wheel.

The task: tell which of ``topics`` an utterance comes from (both sides of every dialog count as
utterances; texts that occur under two categories are dropped). Each topic's utterances are
split into a test part, a few meta examples per topic, and a pool that feeds two domains:

============== =======================================================================
``clean``       half of the pool, labelled with its topic
``noisy``       the other half, a fraction ``label_noise`` relabelled to another topic
``off_topic``   utterances of the other corpus categories (tech support, sports, ...)
                with a random topic label: irrelevant to the meta set's topics
============== =======================================================================

Texts are tokenized once with the model's tokenizer (``tokenizer``: a local checkpoint
directory, default the bundled MiniLM-L6) to ``max_len`` tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from bilevel.data.checks import check_counts, check_fractions, check_names, check_seed
from bilevel.data.columns import domain_columns
from bilevel.data.domain_data import DomainData
from bilevel.data.evaluate import classification_metrics
from bilevel.data.noisy_domains import flip_labels
from bilevel.errors import ConfigError

__all__ = ["TOPICS", "corpus_texts", "text_domains"]

TOPICS = ("ai", "coding", "psychology", "trivia", "emotion", "literature")


def corpus_texts() -> dict[str, list[str]]:
    """``{category: [utterance, ...]}`` for every English category of chatterbot-corpus."""
    try:
        import chatterbot_corpus
        import yaml
    except ImportError as err:
        raise ConfigError(
            "data", 'text_domains needs the [hf] extra: pip install -e ".[hf]"'
        ) from err
    folder = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    texts: dict[str, list[str]] = {}
    for file in sorted(folder.glob("*.yml")):
        doc = yaml.safe_load(file.read_text(encoding="utf-8"))
        seen: list[str] = []
        for dialog in doc.get("conversations", []):
            for line in dialog:
                line = str(line).strip()
                if line and line not in seen:
                    seen.append(line)
        texts[file.stem] = seen
    counts: dict[str, int] = {}
    for lines in texts.values():
        for line in lines:
            counts[line] = counts.get(line, 0) + 1
    return {cat: [t for t in lines if counts[t] == 1] for cat, lines in texts.items()}


def text_domains(
    topics: Sequence[str] = TOPICS,
    meta_per_topic: int = 6,
    test_fraction: float = 0.3,
    label_noise: float = 0.6,
    max_len: int = 32,
    tokenizer: str | None = None,
    seed: int = 0,
) -> DomainData:
    """Build the three domains (see the module doc)."""
    from bilevel.models.hf import load_tokenizer

    check_counts(meta_per_topic=(meta_per_topic, 1), max_len=(max_len, 8))
    texts = corpus_texts()
    topics = check_names("topics", topics, "[ai,coding,trivia]")
    unknown = [t for t in topics if t not in texts]
    if unknown or len(topics) < 2:
        raise ConfigError(
            "data.topics",
            f"need >= 2 corpus categories, unknown: {unknown}; available: {sorted(texts)}",
        )
    check_fractions(label_noise=(label_noise, "[0, 1)"), test_fraction=(test_fraction, "(0, 1)"))
    gen = torch.Generator().manual_seed(check_seed(seed))

    def shuffled(items: list[str]) -> list[str]:
        return [items[i] for i in torch.randperm(len(items), generator=gen).tolist()]

    test, meta, pool = [], [], []
    for label, topic in enumerate(topics):
        lines = shuffled(texts[topic])
        n_test = int(round(test_fraction * len(lines)))
        if len(lines) - n_test - meta_per_topic < 2:
            raise ConfigError(
                "data.meta_per_topic", f"topic {topic!r} has only {len(lines)} utterances"
            )
        test += [(t, label) for t in lines[:n_test]]
        meta += [(t, label) for t in lines[n_test : n_test + meta_per_topic]]
        pool += [(t, label) for t in lines[n_test + meta_per_topic :]]
    pool = shuffled(pool)
    clean, noisy = pool[: len(pool) // 2], pool[len(pool) // 2 :]
    others = shuffled([t for cat, lines in texts.items() if cat not in topics for t in lines])
    off_topic = [
        (t, int(torch.randint(0, len(topics), (1,), generator=gen))) for t in others[: len(clean)]
    ]

    tok = load_tokenizer(tokenizer)

    def encode(rows):
        enc = tok(
            [t for t, _ in rows],
            padding="max_length",
            truncation=True,
            max_length=max_len,
            return_tensors="pt",
        )
        x = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        return x, torch.tensor([label for _, label in rows], dtype=torch.int64)

    parts = []
    for k, rows in enumerate((clean, noisy, off_topic)):
        x, y = encode(rows)
        if k == 1:
            y = flip_labels(y, label_noise, len(topics), gen)
        parts.append({"x": x, "y": y})
    xm, ym = encode(meta)
    xt, yt = encode(test)
    return DomainData(
        names=["clean", "noisy", "off_topic"],
        train=domain_columns(parts),
        meta={"x": xm, "y": ym},
        test={"x": xt, "y": yt},
        evaluate=classification_metrics,
        model_kwargs={"num_labels": len(topics)},
        info={"topics": list(topics)},
    )
