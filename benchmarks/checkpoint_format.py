"""Checkpoint size and save/load time: the portable training state (backends.portable_state: whole
tensors, any layout loads them) against DeepSpeed's own sharded checkpoint it replaced
(engine.save_checkpoint / load_checkpoint: one layout only), in the same processes.

Workload: PPLLaVA with a ~100M-parameter LLM (hidden 768, 6 layers, 32k vocabulary; the tiny
vision and CLIP text towers), bf16 with fp32 master weights and AdamW as in training, one optimizer
step taken so the state is full. Each case (world size x ZeRO stage) runs under torchrun on CPU
(gloo); each format is saved and loaded 3 times into the same engine, the median reported, the
page cache dropped nowhere (both formats equally warm).

    python benchmarks/checkpoint_format.py [--hidden 768 --layers 6]

Prints one line per case and format, then the ratios portable / DeepSpeed; the last line is the
headline (the largest case).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CASES = [(1, 2), (2, 2), (2, 3)]  # (world size, ZeRO stage)
REPEATS = 3


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def worker(args) -> None:
    import torch

    import backends
    from backends.deepspeed_engine import EngineSettings, build_engine, model_init_context
    from backends.distributed import barrier
    from backends.portable_state import load_portable, save_portable
    from ppllava import VIDEO, PPLLaVAConfig, PPLLaVAForConditionalGeneration
    from tests.conftest import build_batch

    backend = backends.select("cpu")
    context = backends.init_distributed(backend, timeout_minutes=20)
    settings = EngineSettings(zero_stage=args.zero_stage, precision="bf16", lr=1e-4, total_steps=10)
    config = PPLLaVAConfig.tiny(text_config={"hidden_size": args.hidden, "intermediate_size": 4 * args.hidden,
                                             "num_hidden_layers": args.layers, "vocab_size": 32000,
                                             "num_attention_heads": args.hidden // 64,
                                             "num_key_value_heads": args.hidden // 64})
    backend.manual_seed(0)
    with model_init_context(settings, torch.bfloat16):
        model = PPLLaVAForConditionalGeneration._from_config(config)
    model.set_trainable_parts(vision=False, projector=True, clip_text=True, llm=True)
    engine, _, scheduler = build_engine(model, backend, settings, context.local_rank)
    engine.backward(engine(**build_batch(config, [(VIDEO, 4)], seed=context.rank)).loss)
    engine.step()
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)

    root = Path(args.root)
    results = {"world": context.world_size, "zero_stage": args.zero_stage, "trainable_parameters": trainable}

    def timed(action) -> float:
        barrier()
        start = time.perf_counter()
        action()
        barrier()
        return time.perf_counter() - start

    for name in ("deepspeed", "portable"):
        saves, loads, size = [], [], 0
        for repeat in range(REPEATS):
            target = root / f"{name}_{repeat}"
            if context.rank == 0:
                target.mkdir(parents=True)
            barrier()
            if name == "deepspeed":
                saves.append(timed(lambda: engine.save_checkpoint(str(target), tag="t", save_latest=False)))
                loads.append(timed(lambda: engine.load_checkpoint(str(target), tag="t")))
            else:
                saves.append(timed(lambda: save_portable(engine, scheduler, target)))
                loads.append(timed(lambda: load_portable(engine, scheduler, target)))
            size = directory_bytes(target)
            barrier()
            if context.rank == 0:
                shutil.rmtree(target)
        results[name] = {"bytes": size, "save_s": statistics.median(saves), "load_s": statistics.median(loads)}
    if context.rank == 0:
        Path(args.out).write_text(json.dumps(results))
    backends.exit_process(0)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--zero-stage", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("DS_ACCELERATOR", None)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for world, stage in CASES:
            out = Path(scratch) / f"{world}_{stage}.json"
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-port",
                       str(free_port()), __file__, "--worker", "--zero-stage", str(stage), "--root",
                       str(Path(scratch) / f"ckpt_{world}_{stage}"), "--out", str(out), "--hidden", str(args.hidden),
                       "--layers", str(args.layers)]
            result = subprocess.run(command, env=env, capture_output=True, text=True)
            if result.returncode:
                sys.exit(f"case world {world} ZeRO-{stage} failed:\n{result.stderr[-4000:]}")
            rows.append(json.loads(out.read_text()))
    for row in rows:
        for name in ("deepspeed", "portable"):
            entry = row[name]
            print(f"world {row['world']} ZeRO-{row['zero_stage']} {name:9s}: {entry['bytes'] / 2**20:8.1f} MiB, "
                  f"save {entry['save_s']:6.2f} s, load {entry['load_s']:6.2f} s "
                  f"({row['trainable_parameters'] / 1e6:.1f}M trainable parameters)")
    for row in rows:
        new, old = row["portable"], row["deepspeed"]
        print(f"world {row['world']} ZeRO-{row['zero_stage']}: portable / DeepSpeed size {new['bytes'] / old['bytes']:.2f}x, "
              f"save time {new['save_s'] / old['save_s']:.2f}x, load time {new['load_s'] / old['load_s']:.2f}x")


if __name__ == "__main__":
    main()
