"""The shard stage's output as the training stages read it: the manifest (which tars hold which
stream, how often each dataset repeats, how many samples an epoch holds), the tars themselves
(samples as bytes, members grouped by key), a one-pass reader, and the check that shards made
elsewhere are all there at their recorded sizes or hashes. The streaming loader (``loader.py``)
builds its data order on these.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from pipeline.atomic import file_problems
from pipeline.data.shard_io import (LoaderError, ReadSettings, is_url, read_local_tar, read_remote_tar,
                                    remote_problems, shard_location)
from pipeline.data.records import MODALITIES, VISUAL_MODALITIES

# Shard streams a loader can draw from: the SFT modalities, and DPO's preference pairs.
STREAMS = VISUAL_MODALITIES + ("text", "dpo")


SHARD_KEYS = {"path": str, "modality": str, "samples": int}


def load_manifest(manifest_path: str | Path) -> dict:
    """A shard manifest, checked to be one: a JSON object whose "shards" list holds, for each tar,
    its path, stream and sample count. LoaderError names the file and what is wrong."""
    manifest_path = Path(manifest_path)
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LoaderError(f"{manifest_path}: cannot read it as a shard manifest ({error})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise LoaderError(f"{manifest_path}: no \"shards\" list: expected the manifest.json a shard stage writes")
    for index, shard in enumerate(manifest["shards"]):
        wrong = [key for key, kind in SHARD_KEYS.items() if not isinstance(shard, dict) or
                 not isinstance(shard.get(key), kind)]
        if wrong:
            raise LoaderError(f"{manifest_path}: shards[{index}]: expected {', '.join(wrong)} "
                              f"({', '.join(SHARD_KEYS[k].__name__ for k in wrong)})")
        if shard["modality"] not in STREAMS:
            raise LoaderError(f"{manifest_path}: shards[{index}].modality {shard['modality']!r}: expected one of "
                              f"{', '.join(STREAMS)}")
    return manifest


def read_tar(path: Path, wanted=None) -> Iterator[dict[str, bytes]]:
    """Samples of one local tar: members grouped by key (the name up to the first dot), as bytes.
    ``wanted(i)``: whether to read the i-th sample of the tar; the others' bytes are never read
    (the archive seeks past them) and they are not yielded."""
    return (sample for _, sample in read_local_tar(path, wanted))


@dataclass
class ShardSource:
    """Where a manifest's shards are read from (a folder, a URL prefix; ``shard_io``) and how."""

    root: str
    settings: ReadSettings = field(default_factory=ReadSettings)

    @classmethod
    def of(cls, manifest_path: str | Path, settings: ReadSettings | None = None) -> "ShardSource":
        settings = settings or ReadSettings()
        return cls(settings.root or str(Path(manifest_path).parent), settings)

    def location(self, shard: dict) -> str:
        return shard_location(self.root, shard["path"])

    def samples(self, shard: dict, wanted=None) -> Iterator[tuple[int, dict[str, bytes]]]:
        """(i, sample) of one shard the manifest lists, local or remote; LoaderError when it holds
        fewer samples than the manifest records (they would silently go missing from the order)."""
        location = self.location(shard)
        if is_url(location):
            found = read_remote_tar(location, shard.get("bytes"), shard.get("sha256"), self.settings, wanted)
        else:
            found = read_local_tar(Path(location), wanted)
        last = -1
        for index, sample in found:
            last = index
            yield index, sample
        if last + 1 < shard["samples"] and (wanted is None or any(wanted(i) for i in range(last + 1, shard["samples"]))):
            raise LoaderError(f"{location} holds {last + 1} samples, the manifest says {shard['samples']}: copy the "
                              f"shards again, or run the shard stage")

    def records(self, shard: dict, wanted=None) -> Iterator[dict[str, bytes]]:
        return (sample for _, sample in self.samples(shard, wanted))


@dataclass
class OnePass:
    """Every record of one stream exactly once, for one rank: whole shards, rank r reading the
    r-th, (r + world)-th, ... in path order; no shuffle, no repetition (a pass over the data, e.g.
    DPO's reference log-probs). A rank may have no shard when there are fewer shards than ranks."""

    source: ShardSource
    shards: list[dict]   # this rank's

    @classmethod
    def of(cls, manifest_path: str | Path, stream: str, rank: int = 0, world_size: int = 1,
           read: ReadSettings | None = None) -> "OnePass":
        manifest = load_manifest(manifest_path)
        shards = sorted((s for s in manifest["shards"] if s["modality"] == stream), key=lambda s: s["path"])
        return cls(ShardSource.of(manifest_path, read), shards[rank::world_size])

    @property
    def samples(self) -> int:
        return sum(shard["samples"] for shard in self.shards)

    def __iter__(self) -> Iterator[dict[str, bytes]]:
        for shard in self.shards:
            yield from self.source.records(shard)


def repeated_shards(manifest: dict, stream: str) -> list[dict]:
    """A stream's shards, each as many times as its dataset card's ``repeat`` says (one epoch's list)."""
    repeats = manifest.get("repeats", {})
    return [shard for shard in manifest["shards"] if shard["modality"] == stream
            for _ in range(repeats.get(shard.get("dataset"), 1))]


def stream_sizes(manifest_path: str | Path) -> dict[str, int]:
    """Samples per stream in one epoch, repeats counted."""
    manifest = load_manifest(manifest_path)
    return {stream: sum(s["samples"] for s in repeated_shards(manifest, stream)) for stream in STREAMS}


def check_shards(manifest_path: str | Path, hashes: bool = False, read: ReadSettings | None = None) -> None:
    """Every tar a shard manifest lists is there at the size it records (and, with ``hashes``, its
    sha256): shards made elsewhere are checked before training reads them. LoaderError names
    each missing, truncated or corrupted tar. A remote shard's size is asked of its server (its
    hash is checked on the bytes training reads: hashing it here would download the whole set);
    a ``pipe:`` shard is checked only as it is read."""
    manifest_path = Path(manifest_path)
    source = ShardSource.of(manifest_path, read)
    shards = load_manifest(manifest_path)["shards"]
    located = [(shard, source.location(shard)) for shard in shards]
    local = [(where, s.get("bytes"), s.get("sha256")) for s, where in located if not is_url(where)]
    remote = [(s["path"], where, s.get("bytes")) for s, where in located
              if is_url(where) and not where.startswith("pipe:")]
    problems = file_problems(Path("."), local, hashes, "the manifest") if local else []
    problems += remote_problems(remote, source.settings) if remote else []
    if problems:
        raise LoaderError(f"{manifest_path}: {'; '.join(problems[:10])}" + (f" (and {len(problems) - 10} more)"
                          if len(problems) > 10 else "") + ": copy the shards again, or run the shard stage")


def manifest_samples(manifest_path: str | Path, weights: dict[str, float]) -> int:
    """Samples the streams with a positive mixture weight hold in a shard manifest (an epoch's worth)."""
    sizes = stream_sizes(manifest_path)
    return sum(sizes.get(stream, 0) for stream, weight in weights.items() if weight > 0)


def never_drawn(manifest_path: str | Path, weights: dict[str, float]) -> dict[str, int]:
    """The SFT streams a manifest holds samples of that the mixture ``weights`` never draw (no
    weight, or 0), with their sample counts: sharded and counted, but no training step reads them
    (LLaVA-665k's text-only records under weights without ``text``)."""
    sizes = stream_sizes(manifest_path)
    return {stream: count for stream, count in sizes.items()
            if stream != "dpo" and count > 0 and weights.get(stream, 0) <= 0}


def never_drawn_warning(undrawn: dict[str, int]) -> str:
    counts = ", ".join(f"{count} {stream}" for stream, count in undrawn.items())
    keys = ", ".join(f"data.weights.{stream}" for stream in undrawn)
    return (f"sharded, never drawn: {counts} sample(s) that no training step reads (data.weights gives them no "
            f"weight); give them one ({keys}) or draw every sample alike (data.mixture: natural, the authors')")


def mixture_weights(manifest_path: str | Path, mixture: str, weights: dict[str, float]) -> dict[str, float]:
    """The weights SFT draws modalities by: the recipe's (``data.weights``, SFT modalities only), or
    with ``mixture`` "natural" each stream's size (``natural_weights``)."""
    if mixture == "natural":
        return natural_weights(manifest_path)
    return {modality: weight for modality, weight in weights.items() if modality in MODALITIES}


def natural_weights(manifest_path: str | Path) -> dict[str, float]:
    """Mixture weights proportional to each SFT stream's size (repeats counted): every sample as
    likely as any other, as one list of all datasets concatenated (the authors' mixture)."""
    sizes = stream_sizes(manifest_path)
    return {stream: float(sizes[stream]) for stream in STREAMS if stream != "dpo" and sizes[stream] > 0}
