"""Benchmark one data-loader worker's video work at a realistic bitrate, today's path (old) against
the current one (new) in one run: raw H.264 (PyAV; decord where installed) and `media: frames`
shards (pre-extracted JPEG frames), plus the levers that change pixels, measured only.

Workload (DESIGN.md §8): 10 s clips at 30 fps (300 frames) at 336x336 and 854x480: a camera pan
over a smooth random texture, a red square crossing it, and fresh luma grain in every frame
(uniform, +-14 grey levels, all drawn from the seed), encoded like the pipeline's synthetic videos
(libx264 crf 20, veryfast). Without the grain such a scene compresses to ~0.1 Mbit/s and decodes
several times faster than real footage, since H.264 decoding cost grows with the bitrate; with it
the clips land near 2-3 Mbit/s at 336x336 and 8-9 Mbit/s at 480p. The script prints each clip
set's measured bitrate.

Per sample, one process (= one worker; torch held to one thread as in a DataLoader worker):

    raw H.264               32 training-sampled frames of the MP4 (one random point per segment),
                            resized to 336x336 and CLIP-normalised.
      old                   today's path as of commit c0a00c5 (kept below: every frame decoded
                            in order with FFmpeg's frame threads, per-frame PIL round trips and
                            five float passes to normalise)
      new                   SampleProcessor.pixels with the default PyAVDecoder: only the packets
                            the sampled frames need (media.py, video_seek.py), one decode thread,
                            normalised through a lookup table; pixel-identical (checked here)
      levers                the decoder's parts alone: sequential + 1 thread, selective + FFmpeg
                            threads, decord
    media: frames           the 32 JPEG frames that `media: frames` shards store per video (the
                            shard stage's eval-sampled frames at the source resolution, JPEG
                            quality 92): 32 JPEG decodes, resize, normalise; old and new
    pixel-changing levers   (measured, not defaults) a shard-time transcode to 336x336 with short
                            GOPs (x264 keyint 16, with and without B-pyramid), the resize done by
                            swscale on the decoder's frames instead of PIL after RGB conversion,
                            and Pillow's JPEG draft mode

Each is reported as samples/s of wall time and samples per CPU-second of the process (all its
threads): the per-core figure of the goals (>= 4 raw, >= 15 `media: frames`, at 336x336), and the
one other jobs on the machine disturb least. At 336x336 the full loader (shard stage ->
StreamingLoader, 0 workers: tar reading, templating, tokenisation, collation) runs on raw and on
`media: frames` shards as well, old and new.

    python benchmarks/loader.py [--clips 3] [--repeats 2] [--quick]

Last two lines: samples per CPU-second at 336x336 with `media: frames`, then raw H.264 with PyAV
(the default decoder), new and old, each against its goal.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

from pipeline.data.collate import ProcessorSettings, SampleProcessor
from pipeline.data.loader import LoaderSettings, StreamingLoader
from pipeline.data.media import DecordDecoder, PyAVDecoder, read_video, sample_indices, sample_seed
from pipeline.data.records import Sample
from pipeline.data.sharding import ShardSettings, run_shard
from pipeline.data.synthetic import encode_jpeg, encode_mp4
from pipeline.model.tiny import tiny_tokenizer
from ppllava import PPLLaVAConfig
from ppllava.processing import _normalize_reference

FRAMES, FPS, SAMPLED, SIDE = 300, 30, 32, 336
GRAIN = 14                 # grey levels of per-frame grain: sets the bitrate (see the docstring)
A100_SAMPLES_PER_S = 1.0   # what one A100 consumes at the paper's training speed
GOAL_RAW = 4.0             # raw H.264 video samples/s per core at 336x336 (the issue)
GOAL_FRAMES = 15.0         # `media: frames` video samples/s per core at 336x336 (the issue)
TRANSCODES = {"keyint 16": "keyint=16:min-keyint=16", "keyint 16, no B-pyramid": "keyint=16:min-keyint=16:b-pyramid=none"}


def clip(width: int, height: int, seed: int) -> bytes:
    """A 10 s H.264 clip at a real-footage bitrate: the per-frame grain (like sensor noise or film
    grain) is what costs bits; the texture and the square alone would cost ~0.1 Mbit/s."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 255, (height // 8, (width + FRAMES) // 8 + 1, 3), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(coarse).resize((coarse.shape[1] * 8, coarse.shape[0] * 8), Image.BILINEAR))
    side = height // 5
    frames = np.empty((FRAMES, height, width, 3), dtype=np.uint8)
    for step in range(FRAMES):
        frame = texture[:height, step : step + width] + rng.integers(-GRAIN, GRAIN + 1, (height, width, 1), dtype=np.int16)
        x = int((width - side) * step / (FRAMES - 1))
        frame[height // 2 - side // 2 : height // 2 + side // 2, x : x + side] = (220, 40, 40)
        frames[step] = np.clip(frame, 0, 255)
    return encode_mp4(frames, FPS)


def transcode(data: bytes, params: str) -> bytes:
    """What a shard-time transcode would store: every frame scaled to SIDE x SIDE (swscale
    bicubic), re-encoded like encode_mp4 with ``params`` (short GOPs). Changes pixels."""
    with av.open(io.BytesIO(data)) as container:
        frames = np.stack([frame.to_ndarray(format="rgb24", width=SIDE, height=SIDE, interpolation="BICUBIC")
                           for frame in container.decode(video=0)])
    return encode_mp4(frames, FPS, params)


def jpeg_frames(data: bytes, key: str) -> list[bytes]:
    """The members a `media: frames` shard stores for this video (as pipeline/data/sharding.py makes them)."""
    return [encode_jpeg(frame) for frame in read_video(data, SAMPLED, training=False, key=key, video_decoder=PyAVDecoder())]


# Today's path (commit c0a00c5), frozen here as the baseline: the sequential reader with FFmpeg's
# threads (still media.py's fallback), and the PIL/float steps processing.py replaced.
TODAY_DECODER = PyAVDecoder(strategy="sequential", threads=0)


def today_read_image(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def today_frames_to_pixels(frames, size: int) -> torch.Tensor:
    return _normalize_reference([Image.fromarray(np.asarray(f)).resize((size, size), Image.BICUBIC) for f in frames])


def today_pixels(processor: SampleProcessor, sample: Sample, media: list[bytes], epoch: int) -> torch.Tensor:
    """SampleProcessor.pixels of a video sample as of c0a00c5 (segment sampling, no bounds)."""
    size, count = processor.config.vision_config.image_size, processor.settings.num_frames or processor.config.num_frames
    training = processor.settings.training
    if len(media) > 1:
        chosen = sample_indices(len(media), count, training, sample_seed(sample.key, epoch))
        return today_frames_to_pixels([today_read_image(media[i]) for i in chosen], size)
    return today_frames_to_pixels(list(read_video(media[0], count, training, sample.key, epoch, video_decoder=TODAY_DECODER)), size)


class TodayProcessor(SampleProcessor):
    """The loader's processor with today's pixels, for the full-loader baseline."""

    def pixels(self, sample, media, epoch, frames=None, scheme=None):
        return today_pixels(self, sample, media, epoch), (0, 0)


@dataclass
class Rate:
    wall: float   # samples per second of wall time
    cpu: float    # samples per CPU-second of this process

    def __str__(self) -> str:
        return f"{self.wall:6.2f} samples/s wall  {self.cpu:6.2f} per CPU-s  {1e3 / self.cpu:5.0f} CPU-ms/sample"


def timed(work: Callable[[int, int], object], items: int, repeats: int) -> Rate:
    """Rate of work(index, epoch) over items x repeats calls, after one untimed warm-up call."""
    work(0, repeats)
    wall, cpu = time.perf_counter(), time.process_time()
    for epoch in range(repeats):
        for index in range(items):
            work(index, epoch)
    count = items * repeats
    return Rate(count / (time.perf_counter() - wall), count / (time.process_time() - cpu))


def make_processor() -> SampleProcessor:
    """The loader's per-sample processor with the paper's geometry (32 frames, 336x336) and the
    default decoder (PyAV); the tiny tokenizer's trainer prints a few blank lines."""
    tokenizer = tiny_tokenizer()
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = PPLLaVAConfig(text_config={"model_type": "llama", **ids}, clip_text_config={**ids, "max_position_embeddings": 248},
                           image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    return SampleProcessor(config, tokenizer, tokenizer, ProcessorSettings(max_length=4096))


def sample(index: int) -> Sample:
    return Sample(f"bench/{index}", "video", ["clip.mp4"], [])


def pixels_rate(media: list[list[bytes]], pixels: Callable, repeats: int) -> Rate:
    return timed(lambda index, epoch: pixels(sample(index), media[index], epoch), len(media), repeats)


def new_pixels(processor: SampleProcessor) -> Callable:
    return lambda one, media, epoch: processor.pixels(one, media, epoch)[0]


def check_identical(media: list[list[bytes]], processor: SampleProcessor, repeats: int) -> None:
    """The new path's pixels are today's, bit for bit, on every timed sample."""
    for epoch in range(repeats):
        for index, members in enumerate(media):
            old, new = today_pixels(processor, sample(index), members, epoch), processor.pixels(sample(index), members, epoch)[0]
            if not torch.equal(old, new) or old.stride() != new.stride():
                raise SystemExit(f"new pixels differ from today's on bench/{index} epoch {epoch}")


def resize_lever(data: bytes) -> tuple[float, float, float]:
    """CPU-ms per 32 frames: RGB at full size then PIL bicubic to SIDE (what the loader does) vs
    swscale scaling to SIDE in the same conversion; and the mean |difference| in grey levels."""
    with av.open(io.BytesIO(data)) as container:
        frames = [frame for position, frame in enumerate(container.decode(video=0)) if position % 9 == 0][:SAMPLED]
    reformatter = av.video.reformatter.VideoReformatter()
    ways = {"pil": lambda f: np.asarray(Image.fromarray(reformatter.reformat(f, format="rgb24").to_ndarray())
                                        .resize((SIDE, SIDE), Image.BICUBIC)),
            "sws": lambda f: reformatter.reformat(f, width=SIDE, height=SIDE, format="rgb24", interpolation="BICUBIC").to_ndarray()}
    costs, outputs = {}, {}
    for name, way in ways.items():
        outputs[name] = np.stack([way(f) for f in frames])
        started = time.process_time()
        for _ in range(3):
            np.stack([way(f) for f in frames])
        costs[name] = (time.process_time() - started) / 3 * 1e3
    return costs["pil"], costs["sws"], float(np.abs(outputs["pil"].astype(int) - outputs["sws"]).mean())


def shard(clips: list[bytes], workdir: Path, media: str) -> Path:
    """The clips through the shard stage (`media` raw or frames); returns the manifest."""
    if not (workdir / "card.yaml").exists():
        (workdir / "media").mkdir(parents=True)
        records = []
        for index, data in enumerate(clips):
            (workdir / "media" / f"clip{index}.mp4").write_bytes(data)
            records.append({"video": f"clip{index}.mp4", "QA": [{"q": "Which way does it move?", "a": "Left."}]})
        (workdir / "qa.json").write_text(json.dumps(records))
        (workdir / "card.yaml").write_text("name: bench\nformat: videochat2\nannotation: qa.json\n"
                                           "media_root: media\nmodality: video\n")
    output = workdir / f"shards_{media}"
    run_shard([str(workdir / "card.yaml")], output, ShardSettings(media=media, num_frames=SAMPLED))
    return output / "manifest.json"


def loader_rate(manifest: Path, processor: SampleProcessor, items: int, repeats: int) -> Rate:
    """End to end: StreamingLoader (0 workers) over the shards."""
    batches = iter(StreamingLoader(manifest, processor, LoaderSettings(micro_batch_size=1, weights={"video": 1.0},
                                                                       shuffle_buffer=2)))
    return timed(lambda index, epoch: next(batches), items, repeats)


def ratio_line(results: dict, width: int, new: str, old: str, label: str) -> str:
    a, b = results[(width, new)], results[(width, old)]
    return f"  {label}: {a.cpu / b.cpu:.2f}x per CPU-s, {a.wall / b.wall:.2f}x wall"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=3, help="clips per resolution (default 3)")
    parser.add_argument("--repeats", type=int, default=2, help="epochs over the clips (default 2)")
    parser.add_argument("--quick", action="store_true", help="2 clips, 1 epoch, no full-loader runs")
    args = parser.parse_args()
    if args.quick:
        args.clips, args.repeats = 2, 1
    torch.set_num_threads(1)  # as in a DataLoader worker; FFmpeg keeps its own decode threads
    processor = make_processor()
    new, old = new_pixels(processor), lambda one, media, epoch: today_pixels(processor, one, media, epoch)
    levers = {"sequential, 1 thread": PyAVDecoder("sequential", threads=1),
              "selective, FFmpeg threads": PyAVDecoder("selective", threads=0)}
    if importlib.util.find_spec("decord"):
        levers["decord"] = DecordDecoder()
    print(f"workload: {FRAMES / FPS:.0f} s H.264 clips ({FRAMES} frames at {FPS} fps, grain +-{GRAIN}, x264 crf 20), "
          f"{SAMPLED} frames per sample -> {SIDE}x{SIDE} CLIP pixels; one process, torch 1 thread; "
          f"load average {os.getloadavg()[0]:.2f} at start")
    results: dict[tuple[int, str], Rate] = {}
    bitrates: dict[int, float] = {}
    for width, height in ((336, 336), (854, 480)):
        started = time.perf_counter()
        clips = [clip(width, height, seed) for seed in range(args.clips)]
        frame_sets = [jpeg_frames(data, f"bench/{index}") for index, data in enumerate(clips)]
        mbit = bitrates[width] = sum(map(len, clips)) * 8 / len(clips) / (FRAMES / FPS) / 1e6
        jpeg_kb = sum(len(f) for frames in frame_sets for f in frames) / len(frame_sets) / 1e3
        print(f"{width}x{height}: {len(clips)} clips at {mbit:.2f} Mbit/s ({sum(map(len, clips)) / len(clips) / 1e3:.0f} kB "
              f"per clip); media: frames {jpeg_kb:.0f} kB per sample (made in {time.perf_counter() - started:.1f} s)")
        raw = [[data] for data in clips]
        check_identical(raw, processor, args.repeats)
        check_identical(frame_sets, processor, args.repeats)
        print(f"  pixels: new == old bit for bit on all {len(clips) * args.repeats} raw and {len(clips) * args.repeats} "
              f"frames-mode samples")
        rows = [("pyav old", "raw H.264, PyAV, old (today)", raw, old),
                ("pyav", "raw H.264, PyAV, new (default)", raw, new)]
        rows += [(f"lever {name}", f"  lever: PyAV {name}" if name != "decord" else "  lever: decord", raw,
                  new_pixels(replace(processor, video_decoder=decoder))) for name, decoder in levers.items()]
        rows += [("frames old", "media: frames (32 JPEG), old", frame_sets, old),
                 ("frames", "media: frames (32 JPEG), new", frame_sets, new)]
        for name, label, media, pixels in rows:
            results[(width, name)] = pixels_rate(media, pixels, args.repeats)
            print(f"  {label:42s} {results[(width, name)]}")
        print(ratio_line(results, width, "pyav", "pyav old", "raw PyAV new / old"))
        print(ratio_line(results, width, "frames", "frames old", "media: frames new / old"))
        print("  pixel-changing levers, measured only:")
        for name, params in TRANSCODES.items():
            started = time.process_time()
            transcoded = [transcode(data, params) for data in clips]
            cost = (time.process_time() - started) / len(clips)
            rate = results[(width, name)] = pixels_rate([[data] for data in transcoded], new, args.repeats)
            tmbit = sum(map(len, transcoded)) * 8 / len(transcoded) / (FRAMES / FPS) / 1e6
            print(f"  transcoded to {SIDE}x{SIDE}, {name:23s} {rate}  ({tmbit:.2f} Mbit/s, {cost:.1f} CPU-s per clip to make)")
        if (width, height) != (SIDE, SIDE):
            pil_ms, sws_ms, difference = resize_lever(clips[0])
            print(f"  resize in the decoder's conversion (swscale bicubic) instead of PIL after RGB: {sws_ms:.0f} vs "
                  f"{pil_ms:.0f} CPU-ms per 32 frames; pixels differ by {difference:.1f} grey levels on average")
            with Image.open(io.BytesIO(frame_sets[0][0])) as image:
                image.draft("RGB", (SIDE, SIDE))
                print(f"  Image.draft('RGB', ({SIDE}, {SIDE})) on a {width}x{height} JPEG decodes at {image.size[0]}x"
                      f"{image.size[1]} ({'no DCT scaling: a side is below 2x' + str(SIDE) if image.size == (width, height) else 'DCT-scaled'})")
        if width == SIDE and not args.quick:
            with tempfile.TemporaryDirectory() as workdir:
                for media in ("raw", "frames"):
                    manifest = shard(clips, Path(workdir), media)
                    for label, loader_processor in (("old", TodayProcessor(processor.config, processor.tokenizer, processor.clip_tokenizer, processor.settings)), ("new", processor)):
                        rate = loader_rate(manifest, loader_processor, len(clips), args.repeats)
                        print(f"  full loader (shards -> batches, 0 workers), media: {media:6s} {label} {rate}")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    for name, label, goal in (("frames", "media: frames, 32 JPEG frames", GOAL_FRAMES),
                              ("pyav", f"raw H.264 at {bitrates[SIDE]:.1f} Mbit/s, PyAV", GOAL_RAW)):
        rate, before = results[(SIDE, name)].cpu, results[(SIDE, f"{name} old")].cpu
        print(f"video samples/s per worker core ({SIDE}x{SIDE}, {label}; samples per CPU-second): new {rate:.2f}, "
              f"old {before:.2f} ({rate / before:.2f}x) = {rate / A100_SAMPLES_PER_S:.1f}x the ~1 sample/s one A100 consumes; "
              f"goal >= {goal:.0f} per core {'met' if rate >= goal else 'NOT met'}")


if __name__ == "__main__":
    main()
