"""What the world-size-invariant data order costs one rank in data reading, against the per-rank
order it replaced (git 1988eb3's pipeline/data/loader.py, loaded from git in the same process).

Workload: synthetic image samples (48x48 JPEGs, so decoding is cheap and reading dominates)
sharded into S shards, read by rank 0 of W simulated ranks (the other ranks' loaders are not
built: each rank reads only what it owns) for the same number of global steps, global batch 256,
micro 4, one loader worker (0 = in process). Per rank it counts the tar members' bytes read and the
tars opened, and times the reading, for W = 16 and 32 and S = 128 (>= the 64 virtual streams) and
S = 32 (< 64, so V is 32 by default, or every stream reads every shard's headers with V = 64).

    python benchmarks/data_order.py [--samples 4096] [--steps 8]

Prints one line per case: bytes and tars per rank, new / old ratios, and seconds per step.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from conftest import tiny_config_for, tiny_tokenizer  # noqa: E402
from pipeline.data import loader as new_loader  # noqa: E402
from pipeline.data.collate import ProcessorSettings, SampleProcessor  # noqa: E402
from pipeline.data.sharding import ShardSettings, run_shard  # noqa: E402
from pipeline.data.synthetic import SynthSettings, generate  # noqa: E402

OLD_REVISION = "1988eb3"


def old_loader_module():
    source = subprocess.run(["git", "show", f"{OLD_REVISION}:pipeline/data/loader.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_loader.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_loader", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_loader"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class ReadCounter:
    """Counts member bytes read and tars opened through tarfile, in this process."""

    def __init__(self):
        self.bytes = self.tars = 0
        self._open, self._extract = tarfile.open, tarfile.TarFile.extractfile

    def __enter__(self):
        counter = self

        def counting_open(*args, **kwargs):
            counter.tars += 1
            return counter._open(*args, **kwargs)

        def counting_extract(archive, member):
            counter.bytes += member.size
            return counter._extract(archive, member)

        tarfile.open, tarfile.TarFile.extractfile = counting_open, counting_extract
        return self

    def __exit__(self, *exc):
        tarfile.open, tarfile.TarFile.extractfile = self._open, self._extract


def measure(module, manifest, processor, world: int, steps: int, micro: int, global_batch: int, **extra):
    accumulation = global_batch // (micro * world)
    fields = {"micro_batch_size": micro, "weights": {"image": 1.0}, "shuffle_buffer": 16, "num_workers": 0, "seed": 1}
    if module is new_loader:
        fields.update(accumulation=accumulation, **extra)
    settings = module.LoaderSettings(**fields)
    loader = module.StreamingLoader(manifest, processor, settings, rank=0, world_size=world)
    with ReadCounter() as counter:
        start = time.perf_counter()
        for index, _ in enumerate(loader):
            if index + 1 == steps * accumulation:
                break
        seconds = time.perf_counter() - start
    return counter.bytes, counter.tars, seconds / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    old = old_loader_module()
    tokenizer = tiny_tokenizer()
    processor = SampleProcessor(tiny_config_for(tokenizer), tokenizer, tokenizer, ProcessorSettings(max_length=256))
    root = Path(tempfile.mkdtemp())
    generate(root / "synth", SynthSettings(seed=1, videos=0, images=args.samples, multi_images=0, eval_questions=0,
                                           dpo_pairs=0, size=48, frames=8))
    card = root / "synth" / "cards" / "synthetic_image.yaml"
    print(f"{args.samples} images, global batch 256, micro 4, {args.steps} steps, rank 0 of W; old = {OLD_REVISION}")
    for shards in (128, 32):
        out = root / f"shards_{shards}"
        run_shard([str(card)], out, ShardSettings(max_samples_per_shard=args.samples // shards, num_frames=8))
        manifest = out / "manifest.json"
        for world in (16, 32):
            cases = [("default V", {})] + ([("V = 64", {"virtual_streams": 64})] if shards < 64 else [])
            old_bytes, old_tars, old_time = measure(old, manifest, processor, world, args.steps, 4, 256)
            for name, extra in cases:
                new_bytes, new_tars, new_time = measure(new_loader, manifest, processor, world, args.steps, 4, 256,
                                                        **extra)
                print(f"S={shards:4d} W={world:2d} {name:9s}: bytes/rank {new_bytes / 1e6:7.2f} MB vs {old_bytes / 1e6:7.2f} "
                      f"({new_bytes / old_bytes:.2f}x), tars opened {new_tars:4d} vs {old_tars:4d}, "
                      f"s/step {new_time:.3f} vs {old_time:.3f} ({new_time / old_time:.2f}x)")


if __name__ == "__main__":
    main()
