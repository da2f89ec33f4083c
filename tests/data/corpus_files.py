"""Small corpora written to disk for the corpus tests: each domain's documents are known, so
what the readers and the packing give can be checked against them."""

import json
import random
from pathlib import Path

import numpy as np

WORDS = "the cat sat on a mat and the dog ran in the park while birds sang all day".split()


def documents(seed: int, n: int, low: int = 10, high: int = 60) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))) for _ in range(n)]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({field: doc, "id": i}) + "\n")
    return path


def write_text(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(docs) + "\n")
    return path


def write_parquet(path: Path, docs: list[str], row_group_size: int = 50) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": docs}), path, row_group_size=row_group_size)
    return path


def write_tokens(path: Path, ids: np.ndarray, dtype=np.uint16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.asarray(ids, dtype=dtype).tofile(path)
    return path


def corpus(root: Path, per_domain: int = 200) -> dict[str, list[str]]:
    """Three jsonl domains (two files for ``news``), a text-file domain and a meta set;
    returns each domain's documents in file order."""
    docs = {
        "news": documents(1, per_domain),
        "code": [f"def f{i}(x): return x * {i} + {i % 7}" for i in range(per_domain)],
        "noise": documents(3, per_domain, 5, 15),
    }
    half = per_domain // 2
    write_jsonl(root / "news" / "a.jsonl", docs["news"][:half])
    write_jsonl(root / "news" / "b.jsonl", docs["news"][half:])
    write_text(root / "code" / "code.txt", docs["code"])
    write_jsonl(root / "noise" / "n.jsonl", docs["noise"])
    write_jsonl(root / "target" / "meta.jsonl", documents(9, 60))
    return docs


def files_args(root: Path) -> dict:
    return {
        "domains": {
            "news": str(root / "news" / "*.jsonl"),
            "code": str(root / "code" / "*.txt"),
            "noise": str(root / "noise" / "*.jsonl"),
        },
        "meta": str(root / "target" / "*.jsonl"),
        "test": str(root / "target" / "*.jsonl"),
        "seq_len": 16,
        "meta_size": 16,
        "test_size": 16,
    }


def cli_args(root: Path) -> list[str]:
    args = files_args(root)
    out = ["data=files"]
    out += [f"data.domains.{k}={v}" for k, v in args["domains"].items()]
    out += [f"data.meta={args['meta']}", f"data.test={args['test']}"]
    out += ["data.seq_len=16", "data.meta_size=16", "data.test_size=16"]
    return out
