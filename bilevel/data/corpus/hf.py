"""Documents from Hugging Face datasets, offline: a dataset saved with ``save_to_disk``
(``load_from_disk``) or one ``load_dataset`` finds without the network (a builder name with its
``data_files``, a script or a cached dataset), read map-style in row ranges or streamed
(``streaming=true``: an ``IterableDataset`` read shard by shard, in chunks, never whole).

Arrow data are memory-mapped: a map-style dataset of any size opens in milliseconds and a
block reads only its rows.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from bilevel.data.corpus.files import Block
from bilevel.errors import ConfigError

__all__ = ["HFSource"]


def _load(field: str, spec: Any, split: str, streaming: bool) -> Any:
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            field, "data=hf needs Hugging Face datasets: pip install -e '.[corpora]'"
        ) from None
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    datasets.disable_progress_bars()
    try:
        if isinstance(spec, str | os.PathLike) and Path(os.path.expanduser(str(spec))).is_dir():
            path = Path(os.path.expanduser(str(spec)))
            if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
                ds = datasets.load_from_disk(str(path))
            else:
                ds = datasets.load_dataset(str(path), split=split, streaming=streaming)
        elif isinstance(spec, Mapping):
            kwargs = {"split": split, "streaming": streaming, **dict(spec)}
            ds = datasets.load_dataset(**kwargs)
        else:
            ds = datasets.load_dataset(str(spec), split=split, streaming=streaming)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure to load is the same input error
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(
            field,
            f"cannot load {spec!r} offline ({first[:200]}): give a folder written by "
            "save_to_disk, or a load_dataset spec whose files are on this machine",
        ) from None
    if isinstance(ds, datasets.DatasetDict | datasets.IterableDatasetDict):
        if split not in ds:
            raise ConfigError(field, f"has no split {split!r} (data.split); its splits: {list(ds)}")
        ds = ds[split]
    if streaming and isinstance(ds, datasets.Dataset):
        ds = ds.to_iterable_dataset(num_shards=max(1, min(64, len(ds) // 1024)))
    return ds


class HFSource:
    """The documents of one domain held in a Hugging Face dataset.

    Args:
        field: the config key that named it (for messages).
        spec: a ``save_to_disk`` folder, a dataset name or folder for ``load_dataset``, or a
            mapping of ``load_dataset`` arguments (``{path: json, data_files: ...}``).
        split: the split to read.
        text_field: the column that holds a document's text.
        streaming: read it as an ``IterableDataset`` (shard by shard).
        block_rows: rows per block (map-style) or per chunk (streamed).
        skip_bad_rows: count rows whose text is missing or not a string instead of stopping.
    """

    def __init__(
        self,
        field: str,
        spec: Any,
        split: str = "train",
        text_field: str = "text",
        streaming: bool = False,
        block_rows: int = 2048,
        skip_bad_rows: bool = False,
    ) -> None:
        import datasets

        self.field, self.text_field = field, text_field
        self.skip_bad_rows, self.block_rows = skip_bad_rows, block_rows
        self.dataset = _load(field, spec, split, streaming)
        self.streaming = isinstance(self.dataset, datasets.IterableDataset)
        columns = self.dataset.column_names
        if columns is not None and text_field not in columns:
            raise ConfigError(
                field,
                f"has no column {text_field!r} (data.text_field); its columns: "
                f"{', '.join(columns)}",
            )
        if not self.streaming:
            feature = self.dataset.features.get(text_field)
            if getattr(feature, "dtype", "string") not in ("string", "large_string"):
                raise ConfigError(
                    field, f"column {text_field!r} holds {feature}, not text (string)"
                )
            n = len(self.dataset)
            if n == 0:
                raise ConfigError(field, "holds no rows")
            self.blocks = [
                Block(str(spec), "rows", a, min(a + block_rows, n), min(a + block_rows, n) - a)
                for a in range(0, n, block_rows)
            ]
            self.rows: int | None = n
        else:
            shards = self.dataset.num_shards
            self.blocks = [Block(str(spec), "shard", i, shards, 1) for i in range(shards)]
            self.rows = None

    def documents(self, values: list[Any]) -> tuple[list[str], int]:
        docs = [v for v in values if isinstance(v, str)]
        bad = len(values) - len(docs)
        if bad and not self.skip_bad_rows:
            raise ConfigError(
                self.field,
                f"{bad} row(s) hold no text in {self.text_field!r}; set data.skip_bad_rows=true "
                "to skip and count them",
            )
        return docs, bad

    def read(self, block: Block) -> Iterator[tuple[list[str], int]]:
        """The block's documents: one chunk (a row range), or a streamed shard chunk by chunk."""
        if block.kind == "rows":
            yield self.documents(self.dataset[block.start : block.stop][self.text_field])
            return
        shard = self.dataset.shard(num_shards=block.stop, index=block.start)
        chunk: list[Any] = []
        for row in shard:
            chunk.append(row.get(self.text_field))
            if len(chunk) >= self.block_rows:
                yield self.documents(chunk)
                chunk = []
        if chunk:
            yield self.documents(chunk)
