"""Synthetic text domains with distinct structure, and a target mixture to learn weights for.

Token ids: 0-15 symbols, 16-25 digits, 26 '+', 27 '=', 28 ';', 29 '|'. Every sequence holds
``seq_len + 1`` tokens (inputs ``x`` = the first ``seq_len``, targets ``y`` = the next tokens).

============== ==============================================================================
``markov_a``    an order-1 Markov chain over the 16 symbols (3 likely successors per symbol)
``markov_b``    another such chain, with different successors
``arithmetic``  a stream of sums ``a+b=c;`` with a, b < 50, in digit tokens
``copy``        random symbol segments, each written twice: ``abc|abc|defg|defg|``
``noise``       uniformly random tokens
============== ==============================================================================

The meta and test sets are held-out text of the target mixture ``target`` (default: half
``markov_a``, half ``arithmetic``), so the useful domains are exactly the target's.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from bilevel import module_state
from bilevel.data.checks import check_counts, check_seed
from bilevel.data.columns import Columns, chunks, domain_columns
from bilevel.data.domain_data import DomainData
from bilevel.data.evaluate import output_logits
from bilevel.errors import ConfigError, is_finite_number
from bilevel.functional import forward_batch

__all__ = ["LM_DOMAINS", "VOCAB", "lm_mixture", "lm_metrics"]

VOCAB = 32
SYMBOLS, DIGIT0, PLUS, EQUALS, SEMI, BAR = 16, 16, 26, 27, 28, 29
LM_DOMAINS = ("markov_a", "markov_b", "arithmetic", "copy", "noise")


def _chain(gen: torch.Generator) -> torch.Tensor:
    """A 16x16 transition matrix with 3 likely successors per symbol."""
    trans = torch.full((SYMBOLS, SYMBOLS), 0.02 / SYMBOLS)
    for s in range(SYMBOLS):
        succ = torch.randperm(SYMBOLS, generator=gen)[:3]
        trans[s, succ] += torch.tensor([0.6, 0.25, 0.13])
    return trans / trans.sum(1, keepdim=True)


def _markov(trans: torch.Tensor, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    out = torch.empty(n, length, dtype=torch.int64)
    out[:, 0] = torch.randint(0, SYMBOLS, (n,), generator=gen)
    for t in range(1, length):
        out[:, t] = torch.multinomial(trans[out[:, t - 1]], 1, generator=gen).squeeze(1)
    return out


def _stream(n: int, length: int, piece) -> torch.Tensor:
    tokens: list[int] = []
    while len(tokens) < n * length:
        tokens += piece()
    return torch.tensor(tokens[: n * length], dtype=torch.int64).view(n, length)


def _digits(v: int) -> list[int]:
    return [DIGIT0 + int(c) for c in str(v)]


def _arithmetic(n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    def piece():
        a, b = torch.randint(0, 50, (2,), generator=gen).tolist()
        return [*_digits(a), PLUS, *_digits(b), EQUALS, *_digits(a + b), SEMI]

    return _stream(n, length, piece)


def _copy(n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    def piece():
        k = int(torch.randint(3, 7, (1,), generator=gen))
        seg = torch.randint(0, SYMBOLS, (k,), generator=gen).tolist()
        return [*seg, BAR, *seg, BAR]

    return _stream(n, length, piece)


def _sample(domain: str, n: int, length: int, chains, gen: torch.Generator) -> torch.Tensor:
    if domain == "markov_a":
        return _markov(chains[0], n, length, gen)
    if domain == "markov_b":
        return _markov(chains[1], n, length, gen)
    if domain == "arithmetic":
        return _arithmetic(n, length, gen)
    if domain == "copy":
        return _copy(n, length, gen)
    return torch.randint(0, VOCAB, (n, length), generator=gen)


def _split(seqs: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"x": seqs[:, :-1].contiguous(), "y": seqs[:, 1:].contiguous()}


@torch.no_grad()
def lm_metrics(model: nn.Module, columns: Columns, device: torch.device) -> dict[str, float]:
    """Next-token ``loss``, ``perplexity`` and ``accuracy`` on ``columns``."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), device=device)
    count = 0
    with module_state.evaluation(model):
        for batch in chunks(columns, 256):
            logits = output_logits(forward_batch(model, batch)).float()
            y = batch["y"]
            total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").double()
            correct += (logits.argmax(-1) == y).sum()
            count += y.numel()
    loss = total.item() / count
    return {
        "loss": loss,
        "perplexity": float(torch.tensor(loss).exp()),
        "accuracy": correct.item() / count,
    }


def lm_mixture(
    per_domain: int = 1500,
    seq_len: int = 32,
    target: Mapping[str, float] | str | None = None,
    meta_size: int = 128,
    test_size: int = 512,
    seed: int = 0,
) -> DomainData:
    """Build the five text domains and target-mixture meta/test sets (see the module doc).

    ``target``: ``{domain: proportion}``, one domain's name (all of it), or ``None`` (half
    ``markov_a``, half ``arithmetic``)."""
    if target is None:  # an empty mapping is a mixture of nothing (refused below)
        target = {"markov_a": 0.5, "arithmetic": 0.5}
    elif isinstance(target, str):
        target = {target: 1.0}
    elif not isinstance(target, Mapping):
        raise ConfigError(
            "data.target",
            f"must map domains to proportions, e.g. {{copy:1}}, or name one; got {target!r}",
        )
    target = dict(target)
    unknown = sorted(set(target) - set(LM_DOMAINS))
    if unknown:
        raise ConfigError("data.target", f"unknown domain(s) {unknown}; choose from {LM_DOMAINS}")
    if not all(is_finite_number(v) for v in target.values()):
        raise ConfigError("data.target", f"proportions must be numbers, got {target}")
    if any(v < 0 for v in target.values()) or sum(target.values()) <= 0:
        raise ConfigError("data.target", "mixture proportions must be >= 0 with a positive sum")
    check_counts(
        per_domain=(per_domain, 2),
        seq_len=(seq_len, 2),
        meta_size=(meta_size, 2),
        test_size=(test_size, 2),
    )
    gen = torch.Generator().manual_seed(check_seed(seed))
    # The two chains are fixed by seed 0 so that "markov_a" means the same process in every run;
    # the text sampled from them follows the run's seed.
    chain_gen = torch.Generator().manual_seed(0)
    chains = (_chain(chain_gen), _chain(chain_gen))
    length = seq_len + 1
    parts = [_split(_sample(name, per_domain, length, chains, gen)) for name in LM_DOMAINS]
    total = sum(target.values())

    def mixture(n: int) -> torch.Tensor:
        counts = {d: int(round(n * p / total)) for d, p in target.items()}
        seqs = torch.cat([_sample(d, c, length, chains, gen) for d, c in counts.items() if c])
        return seqs[torch.randperm(len(seqs), generator=gen)]

    return DomainData(
        names=list(LM_DOMAINS),
        train=domain_columns(parts),
        meta=_split(mixture(meta_size)),
        test=_split(mixture(test_size)),
        evaluate=lm_metrics,
        model_kwargs={"vocab_size": VOCAB, "max_len": seq_len},
        info={"target": {d: target.get(d, 0.0) / total for d in LM_DOMAINS}},
    )
