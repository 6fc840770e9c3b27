"""Benchmark video decoding + preprocessing per data-loader worker, PyAV against decord.

Workload (DESIGN.md §8): 10 s clips at 30 fps (300 frames) of moving shapes, H.264, at 336x336
and at 854x480; each sample takes 32 training-sampled frames (one random point in each of 32
segments), resizes them to 336x336 and CLIP-normalises them, exactly as SampleProcessor does in
a worker. One process = one worker; the figure is video samples/s per worker (= per core).
Also runs the full loader (shards -> batches) on the 336 clips with 0 workers.

    python benchmarks/loader.py [--clips 4] [--repeats 2]

Last line: video samples/s per worker at 336x336 with the default decoder (PyAV).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.media import DecordDecoder, PyAVDecoder, read_video
from pipeline.data.synthetic import encode_mp4
from ppllava.processing import frames_to_pixels

FRAMES, FPS, SAMPLED = 300, 30, 32


def clip(width: int, height: int, seed: int) -> bytes:
    """A camera pan over a smooth random texture with a red square crossing it: real-video-like
    bitrate (a flat synthetic scene would decode unrealistically fast)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 255, (height // 8, (width + FRAMES) // 8 + 1, 3), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(coarse).resize((coarse.shape[1] * 8, coarse.shape[0] * 8), Image.BILINEAR))
    side = height // 5
    frames = []
    for step in range(FRAMES):
        frame = texture[:height, step : step + width].copy()
        x = int((width - side) * step / (FRAMES - 1))
        frame[height // 2 - side // 2 : height // 2 + side // 2, x : x + side] = (220, 40, 40)
        frames.append(frame)
    return encode_mp4(np.stack(frames), FPS)


def samples_per_second(clips: list[bytes], decoder, repeats: int) -> float:
    start, count = time.perf_counter(), 0
    for epoch in range(repeats):
        for index, data in enumerate(clips):
            frames = read_video(data, SAMPLED, training=True, key=f"bench/{index}", epoch=epoch, video_decoder=decoder)
            frames_to_pixels(list(frames), 336)
            count += 1
    return count / (time.perf_counter() - start)


def loader_throughput(clips: list[bytes], workdir: Path, batches: int) -> float:
    """End to end: shard the clips, then time the streaming loader (0 workers) over them."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import tiny_tokenizer

    from pipeline.data.collate import ProcessorSettings, SampleProcessor
    from pipeline.data.loader import LoaderSettings, StreamingLoader
    from ppllava import PPLLaVAConfig
    from stages.shard import ShardSettings, run_shard

    media = workdir / "media"
    media.mkdir(parents=True)
    records = []
    for index, data in enumerate(clips):
        (media / f"clip{index}.mp4").write_bytes(data)
        records.append({"video": f"clip{index}.mp4", "QA": [{"q": "Which way does it move?", "a": "Left."}]})
    (workdir / "qa.json").write_text(json.dumps(records))
    (workdir / "card.yaml").write_text("name: bench\nformat: videochat2\nannotation: qa.json\nmedia_root: media\nmodality: video\n")
    run_shard(ShardSettings(cards=[str(workdir / "card.yaml")], output=str(workdir / "shards")))
    tokenizer = tiny_tokenizer()
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = PPLLaVAConfig(text_config={"model_type": "llama", **ids}, clip_text_config={**ids, "max_position_embeddings": 248},
                           image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    processor = SampleProcessor(config, tokenizer, tokenizer, ProcessorSettings(max_length=4096))
    loader = StreamingLoader(workdir / "shards" / "manifest.json", processor,
                             LoaderSettings(micro_batch_size=1, weights={"video": 1.0}, shuffle_buffer=2))
    start = time.perf_counter()
    for index, _ in enumerate(loader):
        if index + 1 == batches:
            break
    return batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    decoders = [PyAVDecoder()] + ([DecordDecoder()] if importlib.util.find_spec("decord") else [])
    print(f"workload: {FRAMES}-frame H.264 clips at {FPS} fps, {SAMPLED} frames sampled per clip, resized to 336x336")
    results = {}
    for width, height in ((336, 336), (854, 480)):
        started = time.perf_counter()
        clips = [clip(width, height, seed) for seed in range(args.clips)]
        print(f"{width}x{height}: {args.clips} clips, {sum(map(len, clips)) / args.clips / 1e3:.0f} kB each "
              f"(encoded in {time.perf_counter() - started:.1f}s)")
        for decoder in decoders:
            rate = samples_per_second(clips, decoder, args.repeats)
            results[(width, decoder.name)] = rate
            print(f"  {decoder.name:6s}: {rate:.2f} video samples/s per worker")
        if "decord" in [d.name for d in decoders]:
            print(f"  ratio decord / pyav: {results[(width, 'decord')] / results[(width, 'pyav')]:.2f}")
        if width == 336:
            with tempfile.TemporaryDirectory() as workdir:
                rate = loader_throughput(clips, Path(workdir), batches=args.clips * args.repeats)
            print(f"  full loader (shards -> batches, 0 workers, PyAV): {rate:.2f} video samples/s")
    print(f"video samples/s per worker (336x336, 32 of 300 frames, PyAV): {results[(336, 'pyav')]:.2f}")


if __name__ == "__main__":
    main()
