"""Dataset cards -> validated webdataset tars per modality + manifest.json (the shard stage's work).

    for every card, in units of `records_per_unit` annotation records:
        read record -> check its media (inside media_root, present, decodable) -> accept or reject
        write accepted samples into `<modality>/<card>-<unit>-<shard>.tar` (ShardWriter)
    merge unit manifests -> manifest.json (shards, counts, bytes, sha256, source fingerprints,
                                           every rejected sample with its reason)

Units are spread over ranks (unit i on rank i % world) and, inside a rank, over processes.
A tar is written as `*.tar.tmp`, fsynced and renamed once complete: a final name always means
a complete shard. A unit whose manifest exists with the same fingerprint is not redone, and
when the whole manifest's fingerprint is unchanged nothing is done at all.

Tar members of one sample: `<n>.json` (the record, its original key inside) and its media:
`<n>.mp4` / `<n>.jpg` / `<n>.0.jpg`, `<n>.1.jpg`... (multi-image), or a video's frames as
`<n>.f00000.jpg`...: with ``media: frames`` its eval-sampled ones (for hosts without a fast
decoder; training frame sampling is then fixed at shard time), and for a video given as a frame
folder or GIF all of them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Literal, Mapping, Sequence

from tqdm import tqdm

from pipeline.atomic import fsync_rename, sha256_of, write_text_atomically
from pipeline.data.cards import CardError, DatasetCard, load_card
from pipeline.data.media import (FRAME_SUFFIXES, MediaError, PyAVDecoder, decoder, frame_files, read_image,
                                 read_video, sample_indices)
from pipeline.data.records import PreferencePair, RecordError, Sample
from pipeline.data.sources import READERS
from pipeline.data.synthetic import encode_jpeg
from pipeline.layout import MANIFEST

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 2  # 2: samples carry their system text (a VideoChat2 instruction) apart from the turns


@dataclass
class ShardSettings:
    """How tars are cut and what they hold: the recipe's ``shard`` section (docs/recipes.md)."""

    max_samples_per_shard: int = 1000
    max_bytes_per_shard: int = 1 << 30
    records_per_unit: int = 5000
    media: Literal["raw", "frames"] = "raw"  # raw bytes, or a video's pre-extracted JPEG frames
    num_frames: int = 32                     # frames kept per video with media: frames
    processes: int = 1                       # worker processes per rank
    limit_per_card: int | None = None        # only the first N annotation records of each card (rehearsal, subsets)

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) for every bad value; the recipe check and ``run_shard`` report them."""
        found = [(key, f"must be > 0, got {getattr(self, key)}")
                 for key in ("max_samples_per_shard", "max_bytes_per_shard", "records_per_unit", "num_frames",
                             "processes") if getattr(self, key) < 1]
        if self.limit_per_card is not None and self.limit_per_card < 1:
            found.append(("limit_per_card", f"must be > 0 or null, got {self.limit_per_card}"))
        if self.media not in ("raw", "frames"):
            found.append(("media", f"must be 'raw' or 'frames', got {self.media!r}"))
        return found


@dataclass(frozen=True)
class _Job:
    """Everything a worker process needs to shard one unit."""

    output: Path
    settings: ShardSettings
    variables: dict
    decoders: tuple[str, ...] = ("pyav",)   # every video must decode with each (media.validation_decoders)


def _limited_media(card: DatasetCard, limit: int) -> list[Path]:
    """The media files the first ``limit`` records name (a frame folder's frames included)."""
    paths: list[Path] = []
    for record in islice(READERS[card.format](card.annotation, card.name), limit):
        if isinstance(record, RecordError):
            continue
        for relative in [record.video] if isinstance(record, PreferencePair) else record.media:
            try:
                path = card.media_path(relative)
            except CardError:
                continue  # the shard stage rejects it, with its reason
            paths += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return sorted(set(p for p in paths if p.is_file()))


def source_fingerprint(card: DatasetCard, limit: int | None = None) -> dict:
    """What the output depends on: the card, the annotation bytes, every media file's size and mtime
    (with ``limit``: only the files the first ``limit`` records name, so a rehearsal over a
    million-file media tree does not stat all of it)."""
    media = hashlib.sha256()
    files = (_limited_media(card, limit) if limit is not None
             else sorted(p for p in card.media_root.rglob("*") if p.is_file()))
    for path in files:
        stat = path.stat()
        name = path.relative_to(card.media_root) if path.is_relative_to(card.media_root) else path
        media.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return {"card_sha256": sha256_of(card.source), "annotation_sha256": sha256_of(card.annotation),
            "media_fingerprint": media.hexdigest()}


def settings_fingerprint(cards: list[str], output: str, settings: ShardSettings, variables: Mapping) -> dict:
    """The settings the shards depend on (not how many processes made them)."""
    described = {"cards": list(cards), "output": output, "variables": dict(variables), **asdict(settings)}
    described.pop("processes")
    return described


def _write_json_atomically(path: Path, data: dict) -> None:
    write_text_atomically(path, json.dumps(data, indent=1, sort_keys=True))


def _checked_media(card: DatasetCard, record: Sample | PreferencePair, settings: ShardSettings,
                   decoders: tuple[str, ...] = ("pyav",)) -> dict[str, bytes]:
    """Tar members holding the record's media, after proving each one decodes (a video with every
    decoder training may read it with, to frames of the same size)."""
    paths = [record.video] if isinstance(record, PreferencePair) else record.media
    modality = "video" if isinstance(record, PreferencePair) else record.modality
    members: dict[str, bytes] = {}
    for position, relative in enumerate(paths):
        path = card.media_path(relative)
        if modality == "video" and (path.is_dir() or path.suffix.lower() == ".gif"):
            return _video_frames(record.key, path, settings)
        if not path.is_file():
            raise MediaError(record.key, f"media file {relative} not found under {card.media_root}")
        data = path.read_bytes()
        if modality == "video":
            frames = _decoded_by_all(data, record, settings, decoders)
            if settings.media == "frames":
                members.update({f"f{i:05d}.jpg": encode_jpeg(frame) for i, frame in enumerate(frames)})
            else:
                members[Path(relative).suffix.lstrip(".").lower() or "mp4"] = data
        else:
            read_image(data, record.key)
            suffix = Path(relative).suffix.lstrip(".").lower() or "jpg"
            members[f"{position}.{suffix}" if modality == "multi_image" else suffix] = data
    return members


def _decoded_by_all(data: bytes, record, settings: ShardSettings, decoders: tuple[str, ...]):
    """The eval-sampled frames of a video as the first decoder reads them, after every decoder
    read them, to frames of one size: a file one of them refuses (a JPEG saved as .mp4: PyAV
    reads one frame, decord refuses it) is refused here with that decoder's reason, not mid-training."""
    frames = None
    for name in decoders:
        # PyAV in order: every frame up to the last sampled one is decoded, so a corrupt frame that
        # training's random samples may need is refused here, not only one the eval samples need
        # (training's selective reader gives the same pixels and would skip it)
        video_decoder = PyAVDecoder(strategy="sequential") if name == "pyav" else decoder(name)
        try:
            read = read_video(data, settings.num_frames, training=False, key=record.key, video_decoder=video_decoder,
                              bounds=getattr(record, "bounds", None))
        except MediaError as error:
            raise MediaError(record.key, f"{name}: {error.reason}" if len(decoders) > 1 else error.reason) from None
        if frames is not None and read.shape[1:] != frames.shape[1:]:
            raise MediaError(record.key, f"the decoders disagree: {decoders[0]} reads {frames.shape[2]}x"
                                         f"{frames.shape[1]} frames, {name} {read.shape[2]}x{read.shape[1]}")
        frames = read if frames is None else frames
    return frames


def _video_frames(key: str, path: Path, settings: ShardSettings) -> dict[str, bytes]:
    """A video given as a folder of frames (LLaVA-Hound's, any naming that sorts in frame order, e.g.
    ``{:0>6}.jpg``) or as a GIF (TGIF): its frames become the sample's ``fNNNNN.jpg`` members, all
    of them (``media: raw``; the loader samples from them like from a decoded video) or the
    ``num_frames`` eval-sampled ones (``media: frames``). Every kept frame is decoded here once."""
    if path.is_dir():
        files = frame_files(path)
        if not files:
            raise MediaError(key, f"frame folder {path} has no {'/'.join(FRAME_SUFFIXES)} files")
        if settings.media == "frames":  # read only the frames kept
            files = [files[i] for i in sample_indices(len(files), settings.num_frames, training=False)]
        frames = [f.read_bytes() for f in files]
        for index, data in enumerate(frames):
            read_image(data, f"{key}[frame {index}]")
        return {f"f{index:05d}.jpg": data for index, data in enumerate(frames)}
    if not path.is_file():
        raise MediaError(key, f"media file {path.name} not found in {path.parent}")
    data = path.read_bytes()
    decoder = PyAVDecoder()  # decord cannot open GIFs
    total = decoder.frame_count(data, key)
    indices = (list(range(total)) if settings.media == "raw"
               else sample_indices(total, settings.num_frames, training=False))
    return {f"f{index:05d}.jpg": encode_jpeg(frame) for index, frame in enumerate(decoder.read(data, indices, key))}


def _unit_name(card: DatasetCard, unit: int) -> str:
    return f"{card.name}-{unit:04d}"


def _shard_unit(job: _Job, card_path: str, unit: int, fingerprint: str) -> dict:
    """Validate and write one unit of one card; returns (and stores) its partial manifest."""
    import webdataset

    card, output, settings = load_card(card_path, job.variables), job.output, job.settings
    unit_manifest = output / "units" / f"{_unit_name(card, unit)}.json"
    if unit_manifest.exists():
        done = json.loads(unit_manifest.read_text())
        if done.get("fingerprint") == fingerprint:
            return done
    start = unit * settings.records_per_unit
    end = start + settings.records_per_unit
    if settings.limit_per_card is not None:
        end = min(end, settings.limit_per_card)
    records = islice(READERS[card.format](card.annotation, card.name), start, end)
    writers: dict[str, webdataset.ShardWriter] = {}
    shards, rejected, written = [], [], 0

    def finished(writer_modality: str):
        def post(filename: str) -> None:
            temporary = Path(filename)
            writer = writers[writer_modality]
            if writer.count == 0:
                temporary.unlink()
                return
            final = temporary.with_suffix("")  # drop ".tmp"
            fsync_rename(temporary, final)
            shards.append({"path": str(final.relative_to(output)), "modality": writer_modality, "dataset": card.name,
                           "samples": writer.count, "bytes": final.stat().st_size, "sha256": sha256_of(final)})
        return post

    for offset, record in enumerate(records):
        if isinstance(record, RecordError):
            rejected.append({"key": f"{card.name}/record-{start + offset}", "dataset": card.name, "reason": str(record)})
            continue
        try:
            members = _checked_media(card, record, settings, job.decoders)
        except (MediaError, CardError) as error:
            rejected.append({"key": record.key, "dataset": card.name, "reason": str(error)})
            continue
        modality = "dpo" if isinstance(record, PreferencePair) else record.modality
        if modality not in writers:
            (output / modality).mkdir(parents=True, exist_ok=True)
            pattern = str(output / modality / f"{_unit_name(card, unit)}-%06d.tar.tmp")
            writers[modality] = webdataset.ShardWriter(pattern, maxcount=settings.max_samples_per_shard,
                                                       maxsize=settings.max_bytes_per_shard, verbose=0)
            writers[modality].post = finished(modality)
        writers[modality].write({"__key__": f"{start + offset:09d}", "json": json.dumps(record.to_json()).encode(), **members})
        written += 1
    for writer in writers.values():
        writer.close()
    result = {"fingerprint": fingerprint, "dataset": card.name, "unit": unit, "records": written + len(rejected),
              "shards": sorted(shards, key=lambda s: s["path"]), "rejected": rejected}
    unit_manifest.parent.mkdir(parents=True, exist_ok=True)
    _write_json_atomically(unit_manifest, result)
    return result


def run_shard(cards: list[str], output: str | Path, settings: ShardSettings | None = None,
              variables: Mapping[str, str] | None = None, rank: int = 0, world_size: int = 1,
              barrier: Callable[[], None] = lambda: None, decoders: Sequence[str] = ("pyav",)) -> dict:
    """Shard every dataset card (``variables`` fill their ``${name}``s) into ``output``; rank 0
    writes and returns manifest.json (the other ranks return {}). ``decoders``: every video must
    decode with each (the shard stage passes those the recipe's training may use)."""
    settings = settings or ShardSettings()
    problems = settings.problems()
    if problems:
        raise ValueError("; ".join(f"shard.{key}: {what}" for key, what in problems))
    if not cards:
        raise ValueError("no dataset cards to shard: name at least one")
    job = _Job(Path(output), settings, dict(variables or {}), tuple(decoders))
    output = job.output
    output.mkdir(parents=True, exist_ok=True)
    loaded = [load_card(path, job.variables) for path in cards]
    names = [card.name for card in loaded]
    if len(set(names)) != len(names):
        raise CardError(f"two cards share a name ({names}); sample keys would collide")
    for card in loaded:
        card.check_paths()
    sources = {card.name: source_fingerprint(card, settings.limit_per_card) for card in loaded}
    described = settings_fingerprint(cards, str(output), settings, job.variables)
    # what proved the videos decodable (PyAV alone, the default, leaves earlier fingerprints as they were)
    checked = {} if job.decoders == ("pyav",) else {"decoders": list(job.decoders)}
    fingerprint = hashlib.sha256(json.dumps({"sources": sources, "version": MANIFEST_VERSION, **checked,
                                             "settings": {k: v for k, v in described.items() if k != "variables"}},
                                            sort_keys=True).encode()).hexdigest()
    manifest_path = output / MANIFEST
    if manifest_path.exists() and json.loads(manifest_path.read_text()).get("fingerprint") == fingerprint:
        logger.info("shard: inputs unchanged since %s was written; nothing to do", manifest_path)
        return json.loads(manifest_path.read_text()) if rank == 0 else {}

    units, records_per_unit = [], {}
    for card_path, card in zip(cards, loaded):
        records = sum(1 for _ in islice(READERS[card.format](card.annotation, card.name), settings.limit_per_card))
        count = max(1, -(-records // settings.records_per_unit))
        for unit in range(count):
            units.append((str(card_path), unit))
            records_per_unit[(str(card_path), unit)] = min(settings.records_per_unit, records - unit * settings.records_per_unit)
    mine = units[rank::world_size]
    start, results = time.perf_counter(), []
    # Counts records (accepted or rejected) as units finish: the rate shown is records/s.
    progress = tqdm(total=sum(records_per_unit[u] for u in mine), desc=f"shard (rank {rank})", unit="sample",
                    disable=rank != 0)
    if settings.processes > 1 and len(mine) > 1:
        # spawn, not fork: a process with threads (a rank's DeepSpeed and gloo threads, fsspec's IO
        # loop) forked mid-lock leaves the worker deadlocked on that lock forever
        with ProcessPoolExecutor(settings.processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_shard_unit, job, path, unit, fingerprint) for path, unit in mine]
            for future in futures:
                results.append(future.result())
                progress.update(results[-1]["records"])
    else:
        for path, unit in mine:
            results.append(_shard_unit(job, path, unit, fingerprint))
            progress.update(results[-1]["records"])
    progress.close()
    samples = sum(sum(s["samples"] for s in r["shards"]) for r in results)
    logger.info("shard rank %d: %d samples in %.1fs (%.1f samples/s)", rank, samples,
                time.perf_counter() - start, samples / max(time.perf_counter() - start, 1e-9))
    barrier()
    if rank != 0:
        return {}
    parts = [json.loads((output / "units" / f"{load_card(path, job.variables).name}-{unit:04d}.json").read_text())
             for path, unit in units]
    shards = [shard for part in parts for shard in part["shards"]]
    counts: dict[str, int] = {}
    for shard in shards:
        counts[shard["modality"]] = counts.get(shard["modality"], 0) + shard["samples"]
    manifest = {
        "version": MANIFEST_VERSION, "fingerprint": fingerprint, "sources": sources,
        "settings": {**{k: v for k, v in described.items() if k != "variables"}, "processes": settings.processes},
        "shards": shards, "counts": counts, "records": sum(p["records"] for p in parts),
        "repeats": {card.name: card.repeat for card in loaded},
        "rejected": [item for part in parts for item in part["rejected"]],
    }
    _write_json_atomically(manifest_path, manifest)
    logger.info("shard: %s written: %s, %d rejected", manifest_path, counts, len(manifest["rejected"]))
    return manifest
