"""Streaming loader over the shard stage's tars: interleaved batches, a data order that does not
depend on the world size, and exact resume.

The data order is a function of (seed, step) only. A fixed number V of *virtual streams* (data
``virtual_streams``; by default the largest power of two up to 64 that every stream's samples
cover) own the records: in each epoch a modality's shards in a seeded order, stream v taking the
v-th, (v+V)-th, ... shard (or every V-th sample when there are fewer shards than streams), through a
seeded shuffle buffer of its own. The samples of the whole run form one sequence, position n drawn
from stream n mod V with a modality drawn by the mixture weights from (seed, n); optimizer step s
takes positions s*G ... s*G + G - 1 (G = the global batch). Rank r of W reads the positions
j = r, r+W, ... of each step, whose streams are v = r, r+W, ... (W divides V), and splits them into
its micro-batches; DataLoader workers share a rank's streams and hand back one part of each step.
So the samples of a step are the same on 1, 2, 16 or 32 ranks, with any micro-batch size and any
number of workers. Resuming replays the record streams up to that point on the records' places
alone, reading no shard and decoding nothing (``record_stream.py``); samples that failed to decode
before are remembered by key and by place in the state, so the replay skips exactly what the
original run skipped. Workers decode on CPU only. The manifest and the tars, local or remote,
are read through ``shard_files``.
"""

from __future__ import annotations

import json
import logging
import random
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.collate import Batch, SampleProcessor, SampleTooLong
from pipeline.data.media import MediaError
from pipeline.data.records import Sample
from pipeline.data.record_stream import RecordStream
from pipeline.data.shard_files import (STREAMS, LoaderError, ReadSettings, ShardSource, load_manifest,
                                       repeated_shards, stream_sizes)

logger = logging.getLogger(__name__)

@dataclass
class LoaderSettings:
    micro_batch_size: int = 1
    accumulation: int = 1            # micro-batches per optimizer step on each rank
    virtual_streams: int | None = None  # None: the largest power of two <= 64 the data covers
    weights: dict = field(default_factory=lambda: {"video": 1.0, "image": 1.0, "multi_image": 1.0})
    interleave: bool = True          # modalities mixed inside a micro-batch (paper §3.3)
    every_modality_first: bool = False  # the first batches cycle through the modalities, then draw by weight
    shuffle_buffer: int = 64
    seed: int = 0
    num_workers: int = 0
    max_bad_fraction: float = 0.01   # undecodable samples tolerated before the run stops...
    bad_fraction_grace: int = 100    # ...checked once this many samples were seen (one early bad
                                     # sample is not yet a fraction worth stopping for)
    read: ReadSettings = field(default_factory=ReadSettings)  # where the shards are read from, how


def media_members(record: dict[str, bytes], sample: Sample) -> list[bytes]:
    """Media members in order: images of a multi-image set, or a video's pre-extracted frames."""
    if sample.modality == "multi_image":
        return [record[s] for s in sorted((s for s in record if s.split(".")[0].isdigit()), key=lambda s: int(s.split(".")[0]))]
    frames = sorted((s for s in record if s.startswith("f") and s.endswith(".jpg")), key=lambda s: int(s[1:-4]))
    if sample.modality == "video" and frames:
        return [record[s] for s in frames]
    return [data for suffix, data in record.items() if suffix != "json"][:1]


@dataclass
class StepPart:
    """One worker's share of one optimizer step on one rank: (position in the step, sample) pairs."""

    step: int
    samples: list = field(default_factory=list)
    skipped: list = field(default_factory=list)      # keys
    skipped_at: list = field(default_factory=list)   # their places: (shard path, ordinal)
    reasons: dict = field(default_factory=dict)

    def skip(self, key: str, where: tuple[str, int], reason: str | None = None) -> None:
        self.skipped.append(key)
        self.skipped_at.append(where)
        if reason is not None:
            self.reasons[key] = reason


def virtual_stream_count(manifest_path: str | Path, weights: dict[str, float], requested: int | None) -> int:
    """The number of virtual streams: ``requested`` (at most the smallest stream's sample count: each
    virtual stream draws from each), or the largest power of two <= 64 that every stream with a
    positive weight has whole shards for (so that no stream reads another's samples)."""
    sizes = stream_sizes(manifest_path)
    smallest = min((sizes.get(m, 0) for m, w in weights.items() if w > 0), default=0)
    manifest = load_manifest(manifest_path)
    fewest_shards = min((len(repeated_shards(manifest, m)) for m, w in weights.items() if w > 0), default=0)
    if requested is not None:
        if requested < 1:
            raise LoaderError(f"data.virtual_streams={requested}: expected a positive number")
        if smallest and requested > smallest:
            raise LoaderError(f"data.virtual_streams={requested} exceeds the {smallest} samples of the smallest "
                              f"stream in {manifest_path}: each virtual stream needs samples of every modality")
        return requested
    count = 1
    while count * 2 <= min(64, max(fewest_shards, 1)):
        count *= 2
    return count


class InterleavedStream(IterableDataset):
    """One rank's share of every optimizer step, as :class:`StepPart` s; split across DataLoader
    workers by virtual stream (each worker yields one part per step, possibly empty)."""

    def __init__(self, manifest_path: str | Path, processor: SampleProcessor, settings: LoaderSettings,
                 rank: int = 0, world_size: int = 1, start_step: int = 0, known_bad: frozenset[str] = frozenset(),
                 skip_places: frozenset | None = frozenset()):
        self.source = ShardSource.of(manifest_path, settings.read)
        manifest = load_manifest(manifest_path)
        self.processor, self.settings = processor, settings
        self.rank, self.world_size, self.start_step, self.known_bad = rank, world_size, start_step, known_bad
        self.skip_places = skip_places  # None: not known (an older state), the replay reads records
        self.shards = {m: repeated_shards(manifest, m) for m in STREAMS}
        self.weights = {m: float(w) for m, w in settings.weights.items() if w > 0 and self.shards.get(m)}
        unknown = set(settings.weights) - set(STREAMS)
        if unknown:
            raise LoaderError(f"mixture weights name unknown modalities {sorted(unknown)}; expected {STREAMS}")
        if not self.weights:
            raise LoaderError(f"{manifest_path}: no shards for any modality with a positive weight {settings.weights}")
        self.streams = virtual_stream_count(manifest_path, self.weights, settings.virtual_streams)
        if self.streams % world_size:
            raise LoaderError(f"{self.streams} virtual streams cannot be shared by {world_size} ranks: set "
                              f"data.virtual_streams to a multiple of the world size (e.g. 64 for 16 or 32 ranks)")
        self.global_batch = settings.micro_batch_size * settings.accumulation * world_size

    def __iter__(self) -> Iterator[StepPart]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = {v for v in range(self.rank, self.streams, self.world_size)
                if (v // self.world_size) % workers == worker}
        streams = {(v, m): RecordStream(self.source, self.shards[m], m, v, self.streams, self.settings.seed,
                                        self.settings.shuffle_buffer, self.skip_places)
                   for v in sorted(mine) for m in self.weights}
        step = 0
        while True:
            replay = step < self.start_step
            part = StepPart(step)
            for j in range(self.rank, self.global_batch, self.world_size):
                position = step * self.global_batch + j
                stream = position % self.streams
                if stream in mine:
                    processed = self._next(streams[(stream, self._modality(position, step))], part, replay)
                    if not replay:
                        part.samples.append((j, processed))
            if not replay:
                yield part
            step += 1

    def _modality(self, position: int, step: int) -> str:
        """The modality of sample ``position`` of the run (the same on every rank layout and resume)."""
        modalities, weights = list(self.weights), list(self.weights.values())
        if self.settings.every_modality_first:
            first = position if self.settings.interleave else step
            if first < len(modalities):
                return modalities[first]
        if self.settings.interleave:
            return random.Random(f"{self.settings.seed}/sample/{position}").choices(modalities, weights)[0]
        return random.Random(f"{self.settings.seed}/step/{step}").choices(modalities, weights)[0]

    def _next(self, stream: RecordStream, part: StepPart, replay: bool):
        """The stream's next sample that decodes (None in a replay: no media decoded, and where the
        skipped samples' places are known, no record read)."""
        skipped_at = self.skip_places or frozenset()
        while True:
            epoch, record, where = stream.next(replay)
            if record is None:  # a replay on places
                if where not in skipped_at:
                    return None
                continue
            sample = self.processor.parse(json.loads(record["json"]))
            if sample.key in self.known_bad or where in skipped_at:
                part.skip(sample.key, where)
                continue
            if replay:
                return None
            try:
                return self.processor(sample, media_members(record, sample), epoch)
            except (MediaError, SampleTooLong) as error:
                logger.warning("skipping %s: %s", sample.key, error)
                part.skip(sample.key, where, str(error))


def _identity(batch):
    return batch


def _leave_stop_signals_to_the_rank(_worker_id: int) -> None:
    """Loader workers ignore SIGTERM and SIGUSR1: those are the rank's, to checkpoint on. SLURM (a
    scancel, pre-emption, the time limit) signals every process of a job step; a worker killed by
    it made its rank fail ("DataLoader worker ... is killed by signal: Terminated") instead of
    checkpointing, and a worker keeping the handler it inherited from the rank logged the signal a
    second time. The rank shuts its workers down when it stops, and a worker whose rank died
    exits on its own (torch's watchdog)."""
    for stop in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(stop, signal.SIG_IGN)


def merge_loader_states(states: list[dict]) -> dict:
    """Every rank's loader state (taken at the same step) as one: the refused keys of all ranks,
    the samples all ranks used. Any layout loads it (``StreamingLoader.load_state_dict``)."""
    steps = {state["step"] for state in states}
    if len(steps) != 1:
        raise LoaderError(f"loader states of different steps {sorted(steps)}: the ranks are out of step")
    merged = {key: value for key, value in states[0].items() if key != "carried_used"}
    merged["bad"] = list(dict.fromkeys(key for state in states for key in state["bad"]))
    merged.pop("skipped_at", None)
    if all("skipped_at" in state for state in states):  # else where some skips were is not known
        merged["skipped_at"] = sorted({tuple(place) for state in states for place in state["skipped_at"]})
    merged["used"] = states[0]["carried_used"] + sum(state["used"] for state in states)
    return merged


class StreamingLoader:
    """Iterate micro-batches for this rank; ``state_dict()`` / ``load_state_dict()`` resume exactly."""

    def __init__(self, manifest_path: str | Path, processor: SampleProcessor, settings: LoaderSettings,
                 rank: int = 0, world_size: int = 1) -> None:
        self.manifest_path, self.processor, self.settings = manifest_path, processor, settings
        self.rank, self.world_size = rank, world_size
        # the streams' checks now (weights, virtual streams the world size divides), not at the first
        # batch: a run moved onto a layout that cannot read the data stops before loading a checkpoint
        InterleavedStream(manifest_path, processor, settings, rank, world_size)
        self.batches, self.used, self.bad = 0, 0, []  # used: samples this process handed out
        # What a resumed run carries over from the checkpoint (every rank's, merged): the refused
        # keys (the first ``carried_bad`` of ``bad``) and the samples used before.
        self.carried_bad = self.carried_used = 0
        # Where every skip happened, (shard path, ordinal): a resumed run replays on these without
        # reading records. None after resuming a state that did not keep them (it replays by reading).
        self.skipped_at: set | None = set()
        self.reasons: dict[str, str] = {}  # why each refused sample was refused (this process's; for summaries)

    def _order(self) -> dict:
        """What the data order depends on besides the data (not the world size, micro-batch size
        or workers: any layout resumes any other's position)."""
        return {"seed": self.settings.seed, "virtual_streams": self.settings.virtual_streams}

    @property
    def refused_here(self) -> int:
        """Samples this process refused (not those a resumed run carried over)."""
        return len(self.bad) - self.carried_bad

    def state_dict(self) -> dict:
        """This rank's position; taken at a step boundary, ``step`` is the same on every rank.
        ``merge_loader_states`` makes one state of every rank's, which any layout loads."""
        if self.batches % self.settings.accumulation:
            raise LoaderError(f"loader state asked for mid-step ({self.batches} micro-batches with accumulation "
                              f"{self.settings.accumulation}): checkpoints are taken between optimizer steps")
        return {"step": self.batches // self.settings.accumulation, "used": self.used,
                "carried_used": self.carried_used, "bad": list(self.bad), **self._order(),
                **({"skipped_at": sorted(self.skipped_at)} if self.skipped_at is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        mine = self._order()
        theirs = {key: state.get(key) for key in mine}
        if theirs != mine:
            raise LoaderError(f"loader state was saved with {theirs} but this loader has {mine}: the data order "
                              f"depends on them, so an exact resume needs the same values")
        self.batches = state["step"] * self.settings.accumulation
        self.bad, self.used = list(state["bad"]), 0
        self.carried_bad, self.carried_used = len(self.bad), state["used"]
        if "skipped_at" in state:
            self.skipped_at = {tuple(place) for place in state["skipped_at"]}
        else:  # saved before places were kept: with refusals, where they were is not known
            self.skipped_at = None if self.bad else set()

    def __iter__(self) -> Iterator[Batch]:
        accumulation, micro = self.settings.accumulation, self.settings.micro_batch_size
        dataset = InterleavedStream(self.manifest_path, self.processor, self.settings, self.rank, self.world_size,
                                    start_step=self.batches // accumulation, known_bad=frozenset(self.bad),
                                    skip_places=None if self.skipped_at is None else frozenset(self.skipped_at))
        # Our own generator: starting the iterator draws a worker seed, which must not come from the
        # global RNG (a resumed run starts its iterator at another point of the global sequence).
        loader = DataLoader(dataset, batch_size=None, num_workers=self.settings.num_workers, collate_fn=_identity,
                            persistent_workers=False, generator=torch.Generator().manual_seed(self.settings.seed),
                            worker_init_fn=_leave_stop_signals_to_the_rank)
        parts, workers = iter(loader), max(1, self.settings.num_workers)
        while True:
            step = [next(parts) for _ in range(workers)]  # the DataLoader hands out one part per worker in turn
            samples = [sample for _, sample in sorted((s for part in step for s in part.samples), key=lambda s: s[0])]
            skipped = [key for part in step for key in part.skipped]
            reasons = {key: why for part in step for key, why in part.reasons.items()}
            if self.skipped_at is not None:
                self.skipped_at.update(tuple(where) for part in step for where in part.skipped_at)
            for index in range(accumulation):
                batch = self.processor.collate(samples[index * micro:(index + 1) * micro])
                batch.skipped, batch.skip_reasons = (skipped, reasons) if index == 0 else ([], {})
                yield from self._counted(batch)

    def _counted(self, batch: Batch) -> Iterator[Batch]:
        """Bookkeeping of one micro-batch handed out: position, refused samples, the bad fraction."""
        self.batches += 1
        fresh = [key for key in batch.skipped if key not in self.bad]
        self.bad += fresh
        self.reasons.update(batch.skip_reasons)
        self.used += len(batch.keys)
        seen = len(self.bad) + self.carried_used + self.used
        fraction = len(self.bad) / max(1, seen)
        if seen >= self.settings.bad_fraction_grace and fraction > self.settings.max_bad_fraction:
            raise LoaderError(f"{len(self.bad)} undecodable (or too long) samples out of {seen} "
                              f"({fraction:.1%}) exceed max_bad_fraction={self.settings.max_bad_fraction}; "
                              f"latest: {', '.join(self.bad[-5:])}")
        yield batch
