"""One domain's training sequences, read lazily: :class:`BlockStream` (documents in blocks,
tokenized and packed when reached) and :class:`WindowStream` (token shards, windows at random
offsets).

Both answer :meth:`take`: the sampler composes each *global* batch (all ranks together), and
asks each domain for the sequences of its slots that fall on this rank. Their state (where the
stream stands, and the random state it draws with) is a few integers, saved with every
checkpoint so that a resumed run reads exactly the sequences it would have read.

Across ranks (``rank_reads``):

* ``own_blocks`` (large domains, the default): the blocks of an epoch, in a seeded random order
  that every rank computes alike, are dealt to the ranks in turn; each rank reads, tokenizes and
  packs only its own, so reads are disjoint. Each block packs alike on any rank, so an epoch
  holds the same sequences at any world size, but which batch takes them depends on it.
* ``all``: every rank reads every block and takes its own slots of the one global order of
  sequences: the same rows at any world size, at world-size times the reading. Domains with
  fewer blocks than twice the ranks always read this way.
* ``lanes`` (:class:`LaneStream`): a domain is read as ``lanes`` streams, lane ``l`` taking
  every ``lanes``-th block of each epoch's order; slot ``s`` of a global batch takes the next
  sequence of lane ``s % lanes``, and a rank reads only the lanes of its own slots. For any
  world size that divides ``lanes``: disjoint reads *and* the same rows at any world size.
* token windows are drawn from one random stream per domain that every rank draws alike; a
  rank reads only the windows of its own slots: disjoint reads and the same rows at any world
  size.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from bilevel.data.corpus.packing import pack
from bilevel.errors import ConfigError, is_integer

__all__ = [
    "BlockStream",
    "LaneStream",
    "WindowStream",
    "block_stream",
    "check_lanes",
]


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in keys])


class BlockStream:
    """The sequences of one domain read block by block (see the module doc).

    Args:
        name, index: the domain's name and index (the index keys its random orders).
        blocks: the domain's blocks (what ``read`` takes).
        read: ``block -> iterator of (token arrays of documents, bad rows skipped)``, one
            item per chunk of the block (one for a block read in one go).
        eod_id: the end-of-document token.
        length: tokens per sequence (``seq_len + 1``).
        seed: the run's seed.
        rank, world_size: this process and how many read.
        rank_reads: ``own_blocks`` or ``all``.
        ahead: sequences read ahead of the consumer (by the sampler's reading thread).
    """

    kind = "blocks"

    def __init__(
        self,
        name: str,
        index: int,
        blocks: list[Any],
        read: Callable[[Any], Iterator[tuple[list[np.ndarray], int]]],
        eod_id: int,
        length: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        rank_reads: str = "own_blocks",
        ahead: int = 256,
    ) -> None:
        self.name, self.index = name, index
        self.blocks, self.read = blocks, read
        self.eod_id, self.length, self.seed = eod_id, length, seed
        self.rank, self.world = rank, world_size
        self.shared = rank_reads == "all" or len(blocks) < 2 * world_size
        self.ahead = ahead
        # consumed position: epoch, index into this rank's blocks of the epoch, sequence in block
        self.epoch, self.pos, self.chunk, self.seq = 0, 0, 0, 0
        self.tokens = self.documents = self.sequences = self.bad_rows = self.dropped = 0
        self._queue: deque = deque()
        self._cursor: Iterator | None = None
        self._lock = threading.Lock()
        self.error: BaseException | None = None

    # -- the order ---------------------------------------------------------------------------------

    def _epoch_blocks(self, epoch: int) -> list[int]:
        order = _rng(self.seed, self.index, epoch, 1).permutation(len(self.blocks)).tolist()
        if self.shared or self.world == 1:
            return order
        return order[self.rank :: self.world]

    def _chunks(self, epoch: int, block: int, chunk: int) -> Iterator[tuple]:
        """``(chunk index, its packed sequences, their order, bad rows)`` of a block from chunk
        ``chunk`` on (a block read in one go is one chunk; a streamed shard is several)."""
        for c, (documents, bad) in enumerate(self.read(self.blocks[block])):
            if c < chunk:
                continue
            packed = pack(documents, self.eod_id, self.length)
            order = _rng(self.seed, self.index, epoch, 2, block, c).permutation(len(packed))
            yield c, packed, order, bad

    def _produce(self, epoch: int, pos: int, chunk: int, seq: int) -> Iterator[tuple]:
        """Sequences from a consumed position on: ``(sequence, documents starting in it,
        position after it, (bad rows, dropped tokens) of the chunk it is the first of)``; a
        chunk without sequences yields a marker (``None``) that carries its position and
        counts."""
        empty_epochs = 0
        while True:
            blocks = self._epoch_blocks(epoch)
            produced = False
            while pos < len(blocks):
                for c, packed, order, bad in self._chunks(epoch, blocks[pos], chunk):
                    first = seq
                    for j in range(seq, len(packed)):
                        counted = j == first == 0 and epoch == 0  # each block's once
                        extra = (bad, packed.dropped) if counted else (0, 0)
                        produced = True
                        at, after = order[j], (epoch, pos, c, j + 1)
                        yield packed.sequences[at], int(packed.document_starts[at]), after, extra
                    if len(packed) == 0 and seq == 0:
                        counts = (bad, packed.dropped) if epoch == 0 else (0, 0)
                        yield None, 0, (epoch, pos, c, 1), counts
                    seq = 0
                    chunk = c + 1
                pos, chunk, seq = pos + 1, 0, 0
                yield None, 0, (epoch, pos, 0, 0), (0, 0)  # the block is done
            empty_epochs = 0 if produced else empty_epochs + 1
            if empty_epochs >= 2:
                raise ConfigError(
                    f"data.domains.{self.name}",
                    f"yields no sequence of {self.length} tokens (data.seq_len + 1): its "
                    "documents are too short or too few; lower data.seq_len",
                )
            epoch, pos = epoch + 1, 0

    # -- reading ahead (called by the sampler's thread) ------------------------------------------

    def fill(self) -> bool:
        """Read until ``ahead`` sequences wait (or one more for an order of all); returns
        whether it read anything. An error is kept and raised to the consumer."""
        with self._lock:
            if self.error is not None or len(self._queue) >= self.ahead:
                return False
            if self._cursor is None:
                self._cursor = self._produce(self.epoch, self.pos, self.chunk, self.seq)
            cursor = self._cursor
        try:
            item = next(cursor)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            with self._lock:
                self.error = err
            return False
        with self._lock:
            if self._cursor is cursor:  # not reset meanwhile (a checkpoint being loaded)
                self._queue.append(item)
        return True

    def _pop(self, wait: Callable[[], None]) -> tuple:
        """The next sequence's item; the markers of blocks without sequences on the way are
        consumed (their position and counts)."""
        while True:
            with self._lock:
                item = self._queue.popleft() if self._queue else None
                if item is None and self.error is not None:
                    raise self.error
            if item is None:
                wait()
            elif item[0] is None:
                self._consume(item, count=False)
            else:
                return item

    # -- consuming ------------------------------------------------------------------------------

    def take(
        self,
        total: int,
        mine: list[int],
        wait: Callable[[], None],
        count: bool = True,
        slots: list[int] | None = None,
    ) -> list[np.ndarray]:
        """This rank's sequences of a global batch that holds ``total`` of this domain; ``mine``
        are the indices (among those ``total``) of this rank's slots (``slots``: their indices
        in the global batch, which only lanes read). ``count``: the batch is trained on (a
        hypergradient's batch is read, not counted as seen)."""
        if self.shared and self.world > 1:
            wanted = set(mine)
            out = []
            for j in range(total):
                item = self._pop(wait)
                self._consume(item, count=count and j in wanted)
                if j in wanted:
                    out.append(item[0])
            return out
        out = []
        for _ in mine:
            item = self._pop(wait)
            self._consume(item, count=count)
            out.append(item[0])
        return out

    def _consume(self, item: tuple, count: bool) -> None:
        _, documents, after, (bad, dropped) = item
        self.epoch, self.pos, self.chunk, self.seq = after
        if not (self.shared and self.world > 1) or self.rank == 0:  # each block counted once
            self.bad_rows += bad
            self.dropped += dropped
        if count:
            self.tokens += self.length - 1
            self.documents += documents
            self.sequences += 1

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "pos": self.pos,
            "chunk": self.chunk,
            "seq": self.seq,
            "tokens": self.tokens,
            "documents": self.documents,
            "sequences": self.sequences,
            "bad_rows": self.bad_rows,
            "dropped": self.dropped,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        with self._lock:
            for key, value in state.items():
                setattr(self, key, int(value))
            self._queue.clear()
            self._cursor = None
            self.error = None


class LaneStream:
    """One domain read as ``lanes`` block streams (see the module doc): this rank holds the
    lanes ``l`` with ``l % world_size == rank``, which are exactly the lanes of its slots
    (slot ``s`` is this rank's when ``s % world_size == rank``, and ``s % lanes % world_size``
    is ``s % world_size`` when ``world_size`` divides ``lanes``).

    Args:
        make_lane: ``l -> BlockStream`` of lane ``l`` (its blocks: every ``lanes``-th of an
            epoch's order, i.e. a block stream with ``rank=l, world_size=lanes``).
        lanes: how many lanes; a multiple of ``world_size``.
    """

    kind = "blocks"
    shared = False

    def __init__(
        self, make_lane: Callable[[int], BlockStream], lanes: int, rank: int, world_size: int
    ) -> None:
        check_lanes(lanes, world_size)
        self.lanes = lanes
        self.streams = {lane: make_lane(lane) for lane in range(rank, lanes, world_size)}
        first = next(iter(self.streams.values()))
        self.name, self.index = first.name, first.index

    def __getattr__(self, key: str) -> Any:
        if key in ("tokens", "documents", "sequences", "bad_rows", "dropped"):
            return sum(getattr(s, key) for s in self.__dict__["streams"].values())
        raise AttributeError(key)

    @property
    def error(self) -> BaseException | None:
        return next((s.error for s in self.streams.values() if s.error is not None), None)

    def fill(self) -> bool:
        progressed = False
        for stream in self.streams.values():
            progressed = stream.fill() or progressed
        return progressed

    def take(
        self,
        total: int,
        mine: list[int],
        wait: Callable[[], None],
        count: bool = True,
        slots: list[int] | None = None,
    ) -> list[np.ndarray]:
        """The sequences of this rank's ``slots`` (indices in the global batch), each the next
        of its lane."""
        if slots is None or len(slots) != len(mine):
            raise ValueError("lanes read by the slots' indices in the global batch")
        return [self.streams[s % self.lanes].take(1, [0], wait, count)[0] for s in slots]

    def state_dict(self) -> dict[str, Any]:
        return {"lanes": {str(lane): s.state_dict() for lane, s in self.streams.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for lane, stream in self.streams.items():
            stream.load_state_dict(state["lanes"][str(lane)])


class WindowStream:
    """Windows of ``length`` tokens at random offsets of a domain's token shards.

    Args:
        name, index: the domain's name and index.
        shards: the domain's :class:`~bilevel.data.corpus.shards.TokenShards`.
        length: tokens per window (``seq_len + 1``).
        seed: the run's seed.
    """

    kind = "windows"

    def __init__(self, name: str, index: int, shards: Any, length: int, seed: int) -> None:
        self.name, self.index = name, index
        self.shards, self.length = shards, length
        self.rng = _rng(seed, index, 3)
        self.tokens = self.documents = self.sequences = self.bad_rows = self.dropped = 0
        usable = np.array([max(0, n - length + 1) for n in shards.lengths], dtype=np.float64)
        if usable.sum() == 0:
            raise ConfigError(
                f"data.domains.{name}",
                f"no shard holds a window of {length} tokens (data.seq_len + 1): lower "
                "data.seq_len",
            )
        self.cumulative = np.cumsum(usable) / usable.sum()
        self.usable = usable.astype(np.int64)
        self.error = None

    def fill(self) -> bool:
        return False  # windows are read when taken: a memory-mapped slice each

    def take(
        self,
        total: int,
        mine: list[int],
        wait: Callable[[], None],
        count: bool = True,
        slots: list[int] | None = None,
    ) -> list[np.ndarray]:
        """Draw the batch's ``total`` windows of this domain (as every rank does) and read the
        ones at ``mine`` (counted as seen when ``count``)."""
        shard = np.searchsorted(self.cumulative, self.rng.random(total), side="right")
        shard = np.minimum(shard, len(self.usable) - 1)
        offsets = (self.rng.random(total) * self.usable[shard]).astype(np.int64)
        offsets = np.minimum(offsets, self.usable[shard] - 1)
        out = [self.shards.window(int(shard[j]), int(offsets[j]), self.length) for j in mine]
        if count:
            self.tokens += (self.length - 1) * len(out)
            self.sequences += len(out)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": self.rng.bit_generator.state,
            "tokens": self.tokens,
            "sequences": self.sequences,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.tokens = int(state["tokens"])
        self.sequences = int(state["sequences"])


def check_lanes(lanes: Any, world_size: int = 1) -> None:
    """``data.lanes`` must be a count that ``world_size`` ranks can share out evenly."""
    if not (is_integer(lanes) and lanes >= 1):
        raise ConfigError("data.lanes", f"must be an integer >= 1, got {lanes!r}")
    if lanes % world_size:
        raise ConfigError(
            "data.lanes",
            f"{lanes} lanes cannot be dealt to {world_size} ranks: set data.lanes to a "
            "multiple of every world size the run will have (e.g. 8 for 1, 2, 4 or 8)",
        )


def block_stream(
    name: str,
    index: int,
    blocks: list[Any],
    read: Callable[[Any], Iterator[tuple[list[np.ndarray], int]]],
    eod_id: int,
    length: int,
    seed: int,
    rank: int,
    world_size: int,
    reads: str,
    ahead: int,
) -> BlockStream | LaneStream:
    """A domain's stream for ``reads`` (``own_blocks``, ``all`` or ``lanes:<count>``): a
    :class:`BlockStream`, or a :class:`LaneStream` of them; a domain with fewer than two
    blocks a lane reads as ``all`` (every lane needs blocks of its own)."""
    if reads.startswith("lanes:"):
        lanes = int(reads.split(":")[1])
        if len(blocks) >= 2 * lanes:

            def lane(at: int) -> BlockStream:
                return BlockStream(
                    name, index, blocks, read, eod_id, length, seed, at, lanes, "own_blocks", ahead
                )

            return LaneStream(lane, lanes, rank, world_size)
        reads = "all"
    return BlockStream(
        name, index, blocks, read, eod_id, length, seed, rank, world_size, reads, ahead
    )
