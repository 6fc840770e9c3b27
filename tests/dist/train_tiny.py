"""Train the tiny PPLLaVA with DeepSpeed for a few steps; run under torchrun or alone.

Each optimizer step consumes a fixed global batch of ``world_size * accumulation`` samples;
sample ``step * global + micro * world + rank`` goes to (rank, micro step), so a 2-rank run
and a 1-rank run with accumulation 2 see the same samples in every step. Writes, per rank,
a JSON file with the loss averaged over ranks and micro steps at every step.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest helpers

import backends  # noqa: E402
from backends.deepspeed_engine import EngineSettings, build_engine, model_init_context  # noqa: E402
from backends.distributed import sum_across_ranks  # noqa: E402
from backends.portable_state import load_portable, save_portable  # noqa: E402
from conftest import build_batch  # noqa: E402
from ppllava import IMAGE, MULTI_IMAGE, VIDEO, PPLLaVAConfig, PPLLaVAForConditionalGeneration  # noqa: E402

SAMPLE_KINDS = [(VIDEO, 8), (IMAGE, 3), (MULTI_IMAGE, 2), (VIDEO, 4)]


def sample(config, index: int) -> dict:
    return build_batch(config, [SAMPLE_KINDS[index % len(SAMPLE_KINDS)]], seed=1000 + index)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zero-stage", type=int, required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--first-step", type=int, default=0, help="global step to start at (after --load)")
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--out", required=True, help="directory for rank<N>.json")
    parser.add_argument("--save", help="save a DeepSpeed checkpoint here at the end")
    parser.add_argument("--load", help="load a DeepSpeed checkpoint from here first")
    parser.add_argument("--save-portable", help="save a portable training state here at the end")
    parser.add_argument("--load-portable", help="load a portable training state from here first")
    parser.add_argument("--bt-adapter-depth", type=int, default=0, help="> 0: with a (trained) BT-Adapter")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    backend = backends.select("cpu")
    context = backends.init_distributed(backend, timeout_minutes=5)
    settings = EngineSettings(zero_stage=args.zero_stage, precision=args.precision, lr=3e-3, weight_decay=0.01,
                              gradient_accumulation_steps=args.accumulation, total_steps=20, warmup_ratio=0.1)
    # drop path off: the same samples must give the same losses on 1 and 2 ranks
    config = PPLLaVAConfig.tiny(bt_adapter_depth=args.bt_adapter_depth, bt_adapter_drop_path=0.0)
    backend.manual_seed(0)
    with model_init_context(settings, backend.resolve_dtype(args.precision)):
        model = PPLLaVAForConditionalGeneration._from_config(config)
    model.set_trainable_parts(vision=False, projector=True, clip_text=True, llm=True, bt_adapter=True)
    engine, _, scheduler = build_engine(model, backend, settings, context.local_rank)
    if args.load:
        path, _ = engine.load_checkpoint(args.load)
        assert path is not None, f"no checkpoint loaded from {args.load}"
    if args.load_portable:
        load_portable(engine, scheduler, Path(args.load_portable))

    per_step = context.world_size * args.accumulation
    losses, lrs = [], []
    for step in range(args.first_step, args.first_step + args.steps):
        step_loss = torch.zeros(())
        for micro in range(args.accumulation):
            batch = sample(config, step * per_step + micro * context.world_size + context.rank)
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            step_loss += loss.detach().float() / args.accumulation
        losses.append(sum_across_ranks([float(step_loss)], torch.device("cpu"))[0] / context.world_size)
        lrs.append(scheduler.get_last_lr()[0])
    if args.save:
        engine.save_checkpoint(args.save, tag="final")
    if args.save_portable:
        Path(args.save_portable).mkdir(parents=True, exist_ok=True)
        save_portable(engine, scheduler, Path(args.save_portable))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"rank{context.rank}.json").write_text(json.dumps({"rank": context.rank, "world": context.world_size, "losses": losses, "lrs": lrs}))
    backends.exit_process(0)


if __name__ == "__main__":
    main()
