"""Corpora on disk: every format reads its documents, packing is exact, streams cover each
epoch once, a resumed sampler reads exactly the rows it would have read, ranks read disjoint
blocks, the same rows come at any world size where the source allows it, and fixed weights give
token shares that a chi-square test accepts."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from bilevel.data.corpus import ByteTokenizer, files, hf, tokens
from bilevel.data.corpus.files import FileSource
from bilevel.data.corpus.packing import pack
from bilevel.errors import ConfigError
from tests.data.corpus_files import (
    corpus,
    documents,
    files_args,
    write_jsonl,
    write_parquet,
    write_text,
    write_tokens,
)

TOK = ByteTokenizer()


def decode_documents(sequences: list[np.ndarray]) -> list[str]:
    """Documents back from packed byte-token sequences (split at the end-of-document id)."""
    stream = np.concatenate([np.asarray(s).reshape(-1) for s in sequences])
    docs, current = [], []
    for i in stream.tolist():
        if i == TOK.eod_id:
            docs.append(bytes(current).decode())
            current = []
        else:
            current.append(i)
    return docs


def test_packing_ends_each_document_and_cuts_sequences_of_the_length():
    docs = [np.array([1, 2, 3]), np.array([4, 5]), np.array([6, 7, 8, 9]), np.array([10])]
    packed = pack(docs, eod_id=0, length=4)
    assert packed.sequences.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert packed.document_starts.tolist() == [1, 2, 0]  # docs 2 and 3 start in sequence 1
    assert packed.dropped == 2  # the last document and its end-of-document token


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "text-lines", "text-file"])
def test_each_format_reads_its_documents_in_order(tmp_path, fmt):
    docs = documents(0, 120)
    if fmt == "jsonl":
        path, kw = write_jsonl(tmp_path / "d.jsonl", docs), {}
    elif fmt == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps([{"text": d} for d in docs]))
        kw = {}
    elif fmt == "parquet":
        path, kw = write_parquet(tmp_path / "d.parquet", docs, row_group_size=25), {}
    elif fmt == "text-lines":
        path, kw = write_text(tmp_path / "d.txt", docs), {}
    else:
        for i, d in enumerate(docs):
            write_text(tmp_path / f"doc{i:03d}.txt", [d])
        path, kw = tmp_path / "doc*.txt", {"text_document": "file"}
    source = FileSource("data.domains.x", str(path), block_bytes=2048, **kw)
    read = []
    for block in source.blocks:
        got, bad = source.read(block)
        assert bad == 0
        read += [d.strip() for d in got]
    assert read == docs
    if fmt in ("jsonl", "text-lines"):
        assert len(source.blocks) > 3  # cut into blocks at line ends
    if fmt == "parquet":
        assert len(source.blocks) == 120 // 25 + 1  # a block per row group


def test_a_domain_packs_into_the_documents_it_holds(tmp_path):
    docs = corpus(tmp_path)
    data = files(**files_args(tmp_path), max_documents=50)
    sampler = data.train_sampler(3, 6, "uniform", 0, 0, 1, 1.0, torch.device("cpu"))
    code = sampler.streams[1]
    packed = pack(TOK.encode(docs["code"][:50]), TOK.eod_id, 17).sequences
    taken = code.take(len(packed), list(range(len(packed))), sampler._wait)
    sampler.close()
    # one epoch of the (one-block) domain: its first 50 documents, packed, in some order
    assert Counter(tuple(s.tolist()) for s in taken) == Counter(map(tuple, packed.tolist()))
    decoded = decode_documents(packed)  # the complete documents (the tail is dropped)
    assert len(decoded) >= 45 and decoded == docs["code"][: len(decoded)]
    assert data.info["tokens"]["code"] == sum(len(d) + 1 for d in docs["code"][:50])
    assert not data.info["sizes_estimated"]  # capped domains are counted exactly


def _sampler(data, batch=8, sampling="uniform", rank=0, world=1, seed=0):
    return data.train_sampler(
        len(data.names), batch, sampling, seed, rank, world, 1.0, torch.device("cpu")
    )


def _rows(batch):
    x, y = batch["x"], batch["y"]
    return [
        (int(d), tuple(torch.cat([a[:1], b]).tolist()))
        for d, a, b in zip(batch["domain"], x, y, strict=True)
    ]


def test_an_epoch_reads_every_sequence_once_then_reshuffles(tmp_path):
    write_jsonl(tmp_path / "a" / "a.jsonl", documents(5, 300))
    write_jsonl(tmp_path / "m.jsonl", documents(6, 30))
    data = files(
        {"a": str(tmp_path / "a" / "*.jsonl")},
        str(tmp_path / "m.jsonl"),
        seq_len=16,
        meta_size=4,
        block_bytes=2048,
    )
    sampler = _sampler(data, batch=7)
    stream = sampler.streams[0]
    blocks = len(stream.blocks)
    expected = Counter(
        tuple(s.tolist())
        for docs in _block_docs(stream)
        for s in pack(TOK.encode(docs), TOK.eod_id, 17).sequences
    )
    per_epoch = sum(expected.values())
    everything = list(range(per_epoch))
    first = [tuple(s.tolist()) for s in stream.take(per_epoch, everything, sampler._wait)]
    second = [tuple(s.tolist()) for s in stream.take(per_epoch, everything, sampler._wait)]
    sampler.close()
    assert blocks > 3 and Counter(first) == expected  # every sequence of the epoch, once
    assert Counter(second) == expected  # the next epoch: the same sequences,
    assert first != second  # in another order
    assert stream.epoch == 1


def _block_docs(stream):
    for block in stream.blocks:
        for docs, _ in stream.read(block):
            yield [bytes(d.astype(np.uint8)).decode() for d in docs]


@pytest.mark.parametrize("source", ["files", "files-lanes", "tokens", "hf", "hf-streaming"])
def test_a_resumed_sampler_reads_exactly_the_rows_it_would_have_read(tmp_path, source):
    data = (
        _data(tmp_path, "files", rank_reads="lanes", lanes=2)
        if source == "files-lanes"
        else _data(tmp_path, source)
    )
    left_alone = _sampler(data, batch=8, sampling="temperature")
    straight = [_rows(left_alone.next()) for _ in range(30)]
    left_alone.close()
    first = _sampler(data, batch=8, sampling="temperature")
    for _ in range(13):
        first.next()
    state = json.loads(json.dumps(first.state_dict()))  # nothing but plain values
    first.close()
    resumed = _sampler(data, batch=8, sampling="temperature")
    resumed.load_state_dict(state)
    again = [_rows(resumed.next()) for _ in range(17)]
    resumed.close()
    assert again == straight[13:]


def _data(tmp_path, source, **kw):
    if source == "files":
        corpus(tmp_path)
        args = files_args(tmp_path)
        return files(**{**args, "block_bytes": 2048, **kw})
    if source == "tokens":
        rng = np.random.default_rng(0)
        for name, (lo, hi, n) in {"a": (0, 50, 3000), "b": (50, 100, 5000)}.items():
            write_tokens(tmp_path / name / "0.bin", rng.integers(lo, hi, n))
            write_tokens(tmp_path / name / "1.bin", rng.integers(lo, hi, n // 2))
        write_tokens(tmp_path / "meta.bin", rng.integers(0, 100, 2000))
        return tokens(
            {"a": str(tmp_path / "a" / "*.bin"), "b": str(tmp_path / "b" / "*.bin")},
            str(tmp_path / "meta.bin"),
            vocab_size=100,
            seq_len=16,
            meta_size=8,
            **kw,
        )
    from datasets import Dataset

    for name, seed in (("x", 1), ("y", 2), ("meta", 3)):
        Dataset.from_dict({"text": documents(seed, 150)}).save_to_disk(str(tmp_path / name))
    return hf(
        {"x": str(tmp_path / "x"), "y": str(tmp_path / "y")},
        str(tmp_path / "meta"),
        seq_len=16,
        meta_size=8,
        block_rows=20,
        streaming=source == "hf-streaming",
        **kw,
    )


def test_ranks_read_disjoint_blocks_and_keep_their_share_of_each_global_batch(tmp_path):
    data = _data(tmp_path, "files")
    opened = {0: set(), 1: set()}
    samplers = []
    for rank in (0, 1):
        sampler = _sampler(data, batch=8, rank=rank, world=2)
        for stream in sampler.streams:
            if not stream.shared:
                read = stream.read

                def spy(block, read=read, rank=rank, name=stream.name):
                    opened[rank].add((name, block.path, block.start))
                    return read(block)

                stream.read = spy
        samplers.append(sampler)
    for _ in range(40):
        for sampler in samplers:
            assert len(sampler.next()["domain"]) == 4  # half of the global batch each
    for sampler in samplers:
        sampler.close()
    assert opened[0] and opened[1]
    assert not opened[0] & opened[1]


@pytest.mark.parametrize("source", ["tokens", "files-all"])
def test_the_same_rows_at_any_world_size(tmp_path, source):
    """One process's global batches are what two ranks take together (token windows, and text
    with data.rank_reads=all)."""
    data = (
        _data(tmp_path, "tokens")
        if source == "tokens"
        else _data(tmp_path, "files", rank_reads="all")
    )
    one = _sampler(data, batch=8, sampling="temperature")
    two = [_sampler(data, batch=8, sampling="temperature", rank=r, world=2) for r in (0, 1)]
    for _ in range(25):
        alone = _rows(one.next())
        together = [_rows(s.next()) for s in two]
        assert alone[0::2] == together[0] and alone[1::2] == together[1]
    for s in [one, *two]:
        s.close()


def test_lanes_read_disjoint_blocks_and_give_the_same_rows_at_any_world_size(tmp_path):
    """data.rank_reads=lanes: each domain is read as 2 lanes of blocks; two ranks read
    disjoint blocks and together take exactly the rows one process takes."""
    from bilevel.data.corpus.streams import LaneStream

    data = _data(tmp_path, "files", rank_reads="lanes", lanes=2)
    one = _sampler(data, batch=8, sampling="temperature")
    two = [_sampler(data, batch=8, sampling="temperature", rank=r, world=2) for r in (0, 1)]
    opened = {0: set(), 1: set()}
    laned = 0
    for rank, sampler in enumerate(two):
        for stream in sampler.streams:
            if isinstance(stream, LaneStream):
                laned += 1
                assert list(stream.streams) == [rank]  # the lane of this rank's slots only
                lane = stream.streams[rank]
                read = lane.read

                def spy(block, read=read, rank=rank, name=stream.name):
                    opened[rank].add((name, block.path, block.start))
                    return read(block)

                lane.read = spy
    assert laned >= 2  # news and noise have the blocks for two lanes
    for _ in range(30):
        alone = _rows(one.next())
        together = [_rows(s.next()) for s in two]
        assert alone[0::2] == together[0] and alone[1::2] == together[1]
    seen_one = one.seen()["tokens"]
    seen_two = [sum(c) for c in zip(*(s.seen()["tokens"] for s in two), strict=True)]
    for s in [one, *two]:
        s.close()
    assert seen_one == seen_two
    assert opened[0] and opened[1] and not opened[0] & opened[1]
    with pytest.raises(ConfigError, match=r"data.lanes: 2 lanes cannot be dealt to 3 ranks"):
        _sampler(data, batch=9, rank=0, world=3)
    with pytest.raises(ConfigError, match=r"data.lanes: must be an integer >= 1"):
        _data(tmp_path, "files", rank_reads="lanes", lanes=0)


def test_fixed_weights_give_token_shares_that_a_chi_square_test_accepts(tmp_path):
    data = _data(tmp_path, "tokens")
    sampler = _sampler(data, batch=16, sampling="weights")
    weights = torch.tensor([0.2, 0.8])
    counts = np.zeros(2)
    for _ in range(200):
        counts += np.bincount(sampler.next(weights)["domain"].numpy(), minlength=2)
    tokens_seen = np.array(sampler.seen()["tokens"])
    sampler.close()
    assert (tokens_seen == counts * 16).all()  # seq_len tokens per row
    expected = weights.numpy() * counts.sum()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 6.63  # the 99% quantile of chi-square with 1 degree of freedom
    # systematic sampling keeps every batch within one row of its share
    assert abs(counts[1] / counts.sum() - 0.8) < 0.01


def test_caps_keep_each_domains_first_tokens_or_documents(tmp_path):
    docs = corpus(tmp_path)
    data = files(**files_args(tmp_path), max_documents=7)
    assert data.info["tokens"]["news"] == sum(len(d) + 1 for d in docs["news"][:7])
    data = files(**files_args(tmp_path), max_tokens=500)
    assert all(500 <= t < 500 + 200 for t in data.info["tokens"].values())
    shards = _data(tmp_path / "t", "tokens", max_tokens=1000)
    assert shards.info["tokens"] == {"a": 1000, "b": 1000}


def test_the_corpus_sizes_are_estimated_without_reading_a_domain_whole(tmp_path):
    write_jsonl(tmp_path / "big" / "a.jsonl", documents(1, 4000))
    write_jsonl(tmp_path / "m.jsonl", documents(2, 20))
    data = files(
        {"big": str(tmp_path / "big" / "*.jsonl")},
        str(tmp_path / "m.jsonl"),
        seq_len=16,
        meta_size=4,
        block_bytes=4096,
    )
    exact = sum(len(d) + 1 for d in documents(1, 4000))
    assert data.info["sizes_estimated"]
    assert abs(data.info["tokens"]["big"] / exact - 1) < 0.2


def test_hf_streaming_reads_shard_by_shard(tmp_path):
    data = _data(tmp_path, "hf-streaming")
    assert data.info["streaming"]
    sampler = _sampler(data, batch=8)
    rows = [_rows(sampler.next()) for _ in range(20)]
    sampler.close()
    assert len({r for batch in rows for r in batch}) > 100


def test_a_bad_row_names_its_file_and_line_or_is_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "a" / "a.jsonl", documents(1, 30))
    lines = path.read_text().splitlines()
    lines[11] = "{not json"
    lines[20] = json.dumps({"body": "no text field"})
    path.write_text("\n".join(lines) + "\n")
    write_jsonl(tmp_path / "m.jsonl", documents(2, 20))
    args = ({"a": str(tmp_path / "a" / "*.jsonl")}, str(tmp_path / "m.jsonl"))
    with pytest.raises(ConfigError, match=r"a\.jsonl, line 12: is not JSON"):
        files(*args, seq_len=8, meta_size=4)
    data = files(*args, seq_len=8, meta_size=4, skip_bad_rows=True)
    sampler = _sampler(data, batch=4)
    for _ in range(30):
        sampler.next()
    assert sampler.seen()["bad_rows"] == [2]
    sampler.close()


def test_token_ids_past_the_vocabulary_are_one_line(tmp_path):
    data = _data(tmp_path, "tokens")
    with pytest.raises(ConfigError, match="holds token id 9[0-9] .* vocabulary has 60 ids"):
        data.set_vocabulary(60)


def test_token_windows_of_bin_and_npy_shards(tmp_path):
    ids = np.arange(1000) % 250
    write_tokens(tmp_path / "a.bin", ids, np.uint32)
    np.save(tmp_path / "b.npy", (ids + 1).astype(np.uint16))
    write_tokens(tmp_path / "m.bin", ids, np.uint32)
    data = tokens(
        {"a": str(tmp_path / "a.bin"), "b": str(tmp_path / "b.npy")},
        str(tmp_path / "m.bin"),
        dtype="uint32",
        vocab_size=256,
        seq_len=8,
        meta_size=4,
    )
    sampler = _sampler(data, batch=6)
    batch = sampler.next()
    sampler.close()
    for d, x, y in zip(batch["domain"], batch["x"], batch["y"], strict=True):
        assert (y[:-1] == x[1:]).all()
        assert ((x[1:] - x[:-1]) % 250 == 1).all()  # a contiguous window of the shard
        assert int(d) != 1 or int(x[0]) >= 1


def test_loaded_checkpoint_states_of_numpy_generators_load_weights_only(tmp_path):
    data = _data(tmp_path, "tokens")
    sampler = _sampler(data)
    sampler.next()
    path = tmp_path / "state.pt"
    torch.save(sampler.state_dict(), path)
    state = torch.load(path, weights_only=True)
    other = _sampler(data)
    other.load_state_dict(state)
    assert _rows(other.next()) == _rows(sampler.next())
    for s in (sampler, other):
        s.close()
