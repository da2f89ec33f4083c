"""The ``domain`` column through a Hugging Face trainer's data: names turned into indices and
checked once, and a collator wrapper that carries the column past any collator (TRL's and the
language-modelling ones build their batches from the token columns alone)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["DomainCollator", "domain_indices", "keep_domains"]


def _index_of(value: Any, names: Sequence[str]) -> int:
    if isinstance(value, str):
        if value not in names:
            raise ValueError(
                f"domain {value!r} in the train dataset is not one of the weights' domains "
                f"{list(names)}"
            )
        return names.index(value)
    index = int(value)
    if not 0 <= index < len(names):
        raise ValueError(
            f"domain index {index} in the train dataset is outside [0, {len(names)}) for the "
            f"domains {list(names)}"
        )
    return index


def _hf_dataset(dataset: Any) -> bool:
    return hasattr(dataset, "column_names") and hasattr(dataset, "map")


def keep_domains(dataset: Any, names: Sequence[str]) -> Any:
    """``dataset`` with its ``domain`` column as indices into ``names`` (a Hugging Face
    dataset: mapped once; another dataset: its first example checked, names mapped by the
    collator); a ValueError where the column is missing or holds another domain."""
    if dataset is None:
        raise ValueError("the trainer needs a train_dataset with a 'domain' column")
    if _hf_dataset(dataset):
        columns = dataset.column_names
        if columns is not None and "domain" not in columns:
            raise ValueError(
                f"the train dataset has no 'domain' column (its columns: {', '.join(columns)}): "
                "give each example the index or the name of its domain"
            )
        if hasattr(dataset, "__len__"):
            values = dataset["domain"]
            for value in values:  # every value, once: a misspelt name is found now
                _index_of(value, names)
            if values and isinstance(values[0], str):
                return dataset.map(
                    lambda batch: {"domain": [_index_of(v, names) for v in batch["domain"]]},
                    batched=True,
                    desc="domain names to indices",
                )
        return dataset
    first = dataset[0] if hasattr(dataset, "__getitem__") else None
    if isinstance(first, Mapping):
        if "domain" not in first:
            raise ValueError(
                "the train dataset's examples have no 'domain' key: give each the index or the "
                "name of its domain"
            )
        _index_of(first["domain"], names)
    return dataset


def domain_indices(dataset: Any, names: Sequence[str]) -> list[int]:
    """Every example's domain index (for the weights sampler: one read of the column)."""
    if _hf_dataset(dataset):
        return [_index_of(v, names) for v in dataset["domain"]]
    return [_index_of(dataset[i]["domain"], names) for i in range(len(dataset))]


class DomainCollator:
    """Calls ``collator`` on the examples without their ``domain`` and adds the column back
    as an int64 tensor ``[B]``."""

    def __init__(self, collator: Callable[[list[Any]], Any], names: Sequence[str]) -> None:
        self.collator = collator
        self.names = list(names)

    def __call__(self, examples: list[Any]) -> Any:
        if not examples or not isinstance(examples[0], Mapping):
            return self.collator(examples)
        held = ["domain" in e for e in examples]
        if not any(held):  # an evaluation set: batched as it is
            return self.collator(examples)
        if not all(held):
            raise ValueError(
                "some examples of the train dataset have no 'domain': give every example the "
                "index or the name of its domain"
            )
        domains = [_index_of(e["domain"], self.names) for e in examples]
        batch = self.collator([{k: v for k, v in e.items() if k != "domain"} for e in examples])
        batch["domain"] = torch.tensor(domains, dtype=torch.int64)
        return batch
