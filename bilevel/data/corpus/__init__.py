"""Domains as corpora on disk, streamed and sampled by the learned weights: text files (jsonl,
json, parquet, plain text), pre-tokenized token shards and Hugging Face datasets, each domain
read lazily in blocks, tokenized and packed into sequences, with exact resume mid-corpus and
disjoint reads across ranks. It imports only the in-memory data parts and the core.

==================  =========================================================================
``data=files``      :func:`files`: per-domain globs of jsonl / json / parquet / text files
``data=tokens``     :func:`tokens`: per-domain globs of ``.bin`` (or ``.npy``) token shards
``data=hf``         :func:`hf`: per-domain Hugging Face datasets, map-style or streamed
==================  =========================================================================
"""

from bilevel.data.corpus.builders import files, hf, tokens
from bilevel.data.corpus.corpus_data import CorpusData, sequence_columns
from bilevel.data.corpus.sampler import StreamSampler
from bilevel.data.corpus.tokenizers import ByteTokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer",
    "CorpusData",
    "StreamSampler",
    "files",
    "hf",
    "load_tokenizer",
    "sequence_columns",
    "tokens",
]
