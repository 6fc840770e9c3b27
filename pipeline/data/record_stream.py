"""One virtual stream's records of one modality: the seeded shard order of each epoch, a seeded
shuffle buffer, and the bytes read from the shards (local or remote, ``shard_files.ShardSource``).

A record is known by its place before its bytes are read: (epoch, position of its shard in that
epoch's order, ordinal in the shard), all of which the manifest's sample counts give. The buffer
holds places; a record's bytes are read as it enters the buffer, from the one shard the stream is
reading, forward only. A resumed run replays the order up to its step on places alone (no byte
of a shard read: a 2 TB set on object storage is not downloaded again to get back to step 40,000),
then reads the records still in the buffer, shard by shard in order, and goes on reading where
the stream stands. The samples a run skipped (undecodable, too long) are remembered by place as
well as by key, so the replay skips exactly what the original run skipped without reading them.
A loader state from before places were kept (keys only) replays by reading the records.
"""

from __future__ import annotations

import random
from typing import Callable, Iterator, NamedTuple

from pipeline.data.shard_files import LoaderError, ShardSource


class Place(NamedTuple):
    epoch: int
    position: int   # of the shard in this stream's plan for the epoch
    ordinal: int    # of the sample in the shard


class _Entry:
    """A buffered record: its place, and its bytes once read (None while only its place is known)."""

    __slots__ = ("place", "record")

    def __init__(self, place: Place, record: dict | None) -> None:
        self.place, self.record = place, record


class RecordStream:
    """Endless, seeded record stream of one modality for one virtual stream (``slot`` of ``slots``).

    ``skip_places``: where the run skipped samples, as (shard path, ordinal); None when not known
    (a state saved before places were kept), which makes a replay read the records it replays."""

    def __init__(self, source: ShardSource, shards: list[dict], modality: str, slot: int, slots: int,
                 seed: int, shuffle_buffer: int, skip_places: frozenset | None) -> None:
        self.source, self.shards, self.modality = source, sorted(shards, key=lambda s: s["path"]), modality
        self.slot, self.slots, self.seed, self.shuffle_buffer = slot, slots, seed, shuffle_buffer
        self.replay_reads = skip_places is None
        self.skip_places = skip_places or frozenset()
        self.reading = True            # whether records entering the buffer are read now
        self.buffer: list[_Entry] = []
        self.plans: dict[int, list[tuple[dict, Callable | None]]] = {}
        self.cursor: tuple[tuple[int, int], Iterator, int] | None = None  # ((epoch, position), samples, last ordinal)
        self.entries = self._entries()

    # -- the order ------------------------------------------------------------------------------
    def plan(self, epoch: int) -> list[tuple[dict, Callable | None]]:
        """The shards this stream reads in ``epoch``, in order, each with which of its samples are
        this stream's: every slots-th shard of the seeded order, or (fewer shards than streams)
        every shard with every slots-th sample (``wanted(i)``; the others' bytes left unread)."""
        if epoch not in self.plans:
            order = list(self.shards)
            random.Random(f"{self.seed}/{self.modality}/{epoch}").shuffle(order)
            if len(order) >= self.slots:
                plan = [(shard, None) for shard in order[self.slot :: self.slots]]
            else:
                plan, start = [], 0
                for shard in order:
                    plan.append((shard, lambda i, first=start: (first + i) % self.slots == self.slot))
                    start += shard["samples"]
            if len(self.plans) >= 8:  # recomputed when asked again (a buffer longer than an epoch)
                self.plans.pop(next(iter(self.plans)))
            self.plans[epoch] = plan
        return self.plans[epoch]

    def _places(self, epoch: int) -> Iterator[Place]:
        for position, (shard, wanted) in enumerate(self.plan(epoch)):
            for ordinal in range(shard["samples"]):
                if wanted is None or wanted(ordinal):
                    yield Place(epoch, position, ordinal)

    def _entries(self) -> Iterator[_Entry]:
        rng = random.Random(f"{self.seed}/{self.modality}/{self.slot}/buffer")
        epoch = 0
        while True:  # endless: the buffer carries over from one epoch into the next
            produced = False
            for place in self._places(epoch):
                produced = True
                self.buffer.append(_Entry(place, self._read(place) if self.reading else None))
                if len(self.buffer) >= self.shuffle_buffer:
                    yield self.buffer.pop(rng.randrange(len(self.buffer)))
            if not produced:
                raise LoaderError(f"slot {self.slot} received no {self.modality} samples: fewer samples than "
                                  f"ranks x workers ({self.slots})")
            epoch += 1

    # -- what the loader asks -------------------------------------------------------------------
    def next(self, replay: bool) -> tuple[int, dict | None, tuple[str, int]]:
        """(epoch, record, where) of the next record: ``where`` its (shard path, ordinal); the record
        is None in a replay that reads no bytes."""
        self.reading = not replay or self.replay_reads
        entry = next(self.entries)
        if entry.record is None and self.reading:  # the first read after a replay on places
            self._read_buffered(entry)
        return entry.place.epoch, entry.record, self.where(entry.place)

    def _last_ordinal(self, place: Place) -> int:
        shard, wanted = self.plan(place.epoch)[place.position]
        return next(i for i in reversed(range(shard["samples"])) if wanted is None or wanted(i))

    def where(self, place: Place) -> tuple[str, int]:
        return self.plan(place.epoch)[place.position][0]["path"], place.ordinal

    # -- reading --------------------------------------------------------------------------------
    def _read_buffered(self, popped: _Entry) -> None:
        """The bytes of every record a replay left unread (the one popped and those still buffered),
        in stream order: each shard they come from is read once, forward."""
        for entry in sorted([popped] + [e for e in self.buffer if e.record is None], key=lambda e: e.place):
            entry.record = self._read(entry.place)

    def _read(self, place: Place) -> dict:
        """The record at ``place``; places are asked for in stream order, so one shard is open at a
        time, read forward (a place behind the open shard's last, or of another shard, re-opens)."""
        shard_at = (place.epoch, place.position)
        if self.cursor is None or self.cursor[0] != shard_at or self.cursor[2] >= place.ordinal:
            if self.cursor is not None:
                self.cursor[1].close()
            shard, wanted = self.plan(place.epoch)[place.position]
            self.cursor = (shard_at, self.source.samples(shard, wanted), -1)
        _, samples, _ = self.cursor
        for ordinal, record in samples:
            self.cursor = (shard_at, samples, ordinal)
            if ordinal == place.ordinal:
                if ordinal == self._last_ordinal(place):
                    for _ in samples:  # to the shard's end: a remote shard's size and hash are checked there
                        pass
                return record
        shard = self.plan(place.epoch)[place.position][0]
        raise LoaderError(f"{self.source.location(shard)} ended before sample {place.ordinal} of the "
                          f"{shard['samples']} the manifest records")
