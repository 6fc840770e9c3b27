"""The memory plan (`python -m pipeline plan`, pipeline/model/memory.py) against the peak memory of
real training steps on CPU.

Each case runs the real SFT or DPO stage (`run_recipe`: DeepSpeed engine, loader with a worker,
the model's own forward and backward, optimizer steps) in a fresh process on synthetic 32-frame
336x336 videos (a 24x24 patch grid: 1024 pooled visual tokens per video, as the paper's), with
PyTorch's profiler recording every allocation of the CPU allocator: the measured peak is the
most bytes live at once from before the model is built until the stage's first checkpoint save
(after its last training step). The plan is then computed for the same recipe, at the longest
row the LLM actually saw (the loader pads a micro-batch to its longest row; `plan` itself uses
data.max_length, the worst case). CPU has no runtime reserve and no allocator fragmentation to
plan for, so plan total vs measured peak is the whole comparison.

Cases (the LLM shrunk in width and depth only; vocabulary 32000 as Vicuna's):

    tiny             the tests' tiny PPLLaVA, ZeRO-2 fp32, micro 2
    100m-full        LLM 768 x 12 layers (134 M parameters), full fine-tuning, ZeRO-2 fp32, micro 3
    100m-lora-ckpt   the same with LoRA (rank 16) and gradient checkpointing, ZeRO-2 fp32
    100m-zero3-bf16  full fine-tuning, ZeRO-3, bf16 (fp32 master weights), checkpointing
    100m-dpo-lora    DPO with LoRA, the live reference = the policy with adapters off, ZeRO-2 fp32

    python benchmarks/memory_plan.py [--cases tiny,100m-full] [--steps 2]

Prints one line per case: plan, measured, plan / measured; the last line the largest deviation.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LLM_100M = {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
            "num_attention_heads": 12, "num_key_value_heads": 12, "max_position_embeddings": 4096}
VIDEO_336 = {"num_frames": 32, "vision_config": {"image_size": 336, "patch_size": 14, "hidden_size": 64,
                                                 "intermediate_size": 256, "num_hidden_layers": 2,
                                                 "num_attention_heads": 2}}
CASES = {
    "tiny": dict(stage="sft", overrides={}, zero=2, precision="fp32", micro=2),
    "100m-full": dict(stage="sft", overrides={**VIDEO_336, "text_config": LLM_100M}, zero=2, precision="fp32", micro=3),
    "100m-lora-ckpt": dict(stage="sft", overrides={**VIDEO_336, "text_config": LLM_100M}, zero=2, precision="fp32",
                           micro=1, lora={"rank": 16, "alpha": 32, "dropout": 0.05}, checkpointing=True),
    "100m-zero3-bf16": dict(stage="sft", overrides={**VIDEO_336, "text_config": LLM_100M}, zero=3, precision="bf16",
                            micro=1, checkpointing=True),
    "100m-dpo-lora": dict(stage="dpo", overrides={**VIDEO_336, "text_config": LLM_100M}, zero=2, precision="fp32",
                          micro=1, lora={"rank": 16, "alpha": 32, "dropout": 0.05}),
}


def make_data(root: Path) -> Path:
    """32-frame 336x336 synthetic videos and preference pairs, sharded; the manifest's path."""
    from pipeline.data.sharding import ShardSettings, run_shard
    from pipeline.data.synthetic import SynthSettings, generate

    generate(root / "synth", SynthSettings(seed=1, videos=8, images=0, multi_images=0, eval_questions=0, dpo_pairs=8,
                                           size=336, frames=32))
    cards = [str(path) for path in sorted((root / "synth" / "cards").glob("*.yaml"))]
    run_shard(cards, root / "shards", ShardSettings(max_samples_per_shard=4, num_frames=32))
    return root / "shards" / "manifest.json"


def case_recipe(name: str, manifest: Path, run_dir: Path, steps: int) -> dict:
    case = CASES[name]
    training = {"zero_stage": case["zero"], "precision": case["precision"], "micro_batch_size": case["micro"],
                "global_batch_size": case["micro"], "lr": 1e-4, "max_steps": steps, "epochs": 100, "log_every": 1,
                "save_every": 1000, "keep_last": 1}
    if case.get("lora"):
        training["lora"] = case["lora"]
    recipe = {"name": f"memory_{name}", "run_dir": str(run_dir), "backend": "cpu", "seed": 0,
              "model": {"source": "tiny", "config_overrides": case["overrides"],
                        "gradient_checkpointing": case.get("checkpointing", False)},
              "data": {"manifest": str(manifest), "num_workers": 1, "max_length": 2048, "shuffle_buffer": 4,
                       "weights": {"video": 1.0, "image": 0.0, "multi_image": 0.0}}}
    if case["stage"] == "sft":
        recipe["sft"] = {**training, "trainable": {"llm": not case.get("lora")}}
    else:
        recipe["dpo"] = {**training, "init": "model", "reference": "live", "beta": 0.1}
    return recipe


def measure(recipe_path: Path, stage: str) -> dict:
    """Run the stage under the profiler (this process); the peak before the first save and the
    longest row the LLM was given."""
    from torch.profiler import ProfilerActivity, profile, record_function

    import pipeline.training.run
    from pipeline.recipe import load_recipe, validate
    from pipeline.runner import run_recipe
    from ppllava import PPLLaVAForConditionalGeneration

    recipe = load_recipe(recipe_path)
    validate(recipe)
    rows = []
    forward = PPLLaVAForConditionalGeneration.forward

    def recording_forward(self, *args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and self.training:
            rows.append(int(ids.shape[1]))
        return forward(self, *args, **kwargs)

    save = pipeline.training.run.save_checkpoint

    def marked_save(*args, **kwargs):
        with record_function("memory_plan.save"):
            return save(*args, **kwargs)

    PPLLaVAForConditionalGeneration.forward = recording_forward
    pipeline.training.run.save_checkpoint = marked_save
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        run_recipe(recipe, [stage])
    events = profiler.profiler.kineto_results.events()
    saves = [event.start_ns() for event in events if event.name() == "memory_plan.save"]
    end = min(saves) if saves else float("inf")
    live = peak = 0
    for event in sorted((e for e in events if e.name() == "[memory]" and e.start_ns() < end), key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return {"peak": peak, "tokens": max(rows)}


def plan_total(recipe_path: Path, stage: str, tokens: int) -> tuple[int, list]:
    from pipeline.model.memory import plan_stage
    from pipeline.recipe import load_recipe

    plan = plan_stage(load_recipe(recipe_path), stage, tokens)
    return plan.total, [(line.label, line.bytes) for line in plan.lines]


def run_case(name: str, manifest: Path, work: Path, steps: int) -> dict:
    recipe_path = work / f"{name}.yaml"
    recipe_path.write_text(yaml.safe_dump(case_recipe(name, manifest, work / name, steps)))
    child = subprocess.run([sys.executable, __file__, "--measure", str(recipe_path), CASES[name]["stage"]],
                           capture_output=True, text=True)
    if child.returncode:
        raise RuntimeError(f"{name}: the measured run failed:\n{child.stderr[-3000:]}")
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    planned, lines = plan_total(recipe_path, CASES[name]["stage"], measured["tokens"])
    return {"case": name, "plan": planned, "measured": measured["peak"], "tokens": measured["tokens"], "lines": lines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--measure", nargs=2, metavar=("RECIPE", "STAGE"), help=argparse.SUPPRESS)
    parser.add_argument("--verbose", action="store_true", help="print each plan's lines")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), args.measure[1])))
        return
    names = args.cases.split(",")
    unknown = [name for name in names if name not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        manifest = make_data(work / "data")
        worst = 0.0
        for name in names:
            result = run_case(name, manifest, work, args.steps)
            ratio = result["plan"] / result["measured"]
            worst = max(worst, abs(ratio - 1))
            print(f"{name:<16} {result['tokens']:>5} tokens/row  plan {result['plan'] / 2**20:8.1f} MiB  "
                  f"measured {result['measured'] / 2**20:8.1f} MiB  plan/measured {ratio:.3f}", flush=True)
            if args.verbose:
                for label, size in result["lines"]:
                    print(f"    {label:<28}{size / 2**20:10.1f} MiB")
        print(f"largest deviation of the plan from the measured peak: {worst:.1%}")


if __name__ == "__main__":
    main()
