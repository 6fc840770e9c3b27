"""The demo's pooling ablation, a miniature of the paper's Table 7: the same starting model trained
on the same data, its videos pooled prompt-guided (weighted, eq.3), by plain window average
(PLLaVA-style, the authors' `avp`), by each window's most relevant token (max), or not at all
(all 288 patch tokens of the 8 frames), then scored on the demo's held-out questions. Pooled arms give the LLM 16 tokens per
video; no pooling gives it 288.

Per seed: the demo's synth and shard stages with that seed (new videos, images, eval questions,
and a new starting model: CLIP pretraining and LLM initialisation), then one run of
recipes/ablation_cpu.yaml per pooling mode on them. Prints one table: accuracy per modality,
mean +- standard deviation over the seeds (min to max in brackets), and the wall time of each arm's
SFT. Images are pooled prompt-guided in every arm (the image and multi-image columns are a control).

    python benchmarks/ablation.py [--seeds 0 1 2] [--modes weighted average max none] [--out runs/ablation_cpu]

Last line: prompt-guided minus average pooling on video, mean over seeds, in points.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASKS = {"eval_video": "video", "eval_image": "image", "eval_multi_image": "multi-image"}


def pipeline(*args: str) -> None:
    """`python -m pipeline ARGS` from the repository root; its output goes to a log, not the screen."""
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed: python -m pipeline {' '.join(args)}\n{result.stderr[-4000:]}")


def stage_record(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "COMPLETE").read_text())


def data_for(seed: int, out: Path) -> Path:
    """The demo's synth + shard stages with this seed (skipped when already done)."""
    run_dir = out / f"data_seed{seed}"
    pipeline("run", "recipes/demo_cpu.yaml", "--stages", "synth,shard", f"run_dir={run_dir}",
             f"seed={seed}", f"synth.seed={seed}")
    relevance = stage_record(run_dir, "synth")["summary"].get("relevance on the asked shape")
    print(f"seed {seed}: data and starting model in {run_dir} (relevance on the asked shape {relevance})", flush=True)
    return run_dir


def arm(mode: str, seed: int, data: Path, out: Path) -> dict:
    """One SFT + export + eval of recipes/ablation_cpu.yaml; accuracy per task and SFT seconds."""
    run_dir = out / f"seed{seed}_{mode}"
    synth = data / "synth"
    files = "[" + ",".join(str(synth / f"{task}.json") for task in TASKS) + "]"
    started = time.perf_counter()
    pipeline("run", "recipes/ablation_cpu.yaml", f"run_dir={run_dir}", f"seed={seed}",
             f"model.config_overrides.pooling_mode={mode}", f"model.pretrained_path={synth / 'model'}",
             f"data.manifest={data / 'shard' / 'manifest.json'}", f"eval.multiple_choice={files}",
             f"eval.media_root={synth / 'media'}")
    results = json.loads((run_dir / "eval" / "results.json").read_text())["multiple_choice"]
    with open(run_dir / "sft" / "metrics.jsonl") as lines:
        tokens = json.loads(lines.readline())["visual_tokens/video"]
    entry = {"tokens": tokens, "sft_s": stage_record(run_dir, "sft")["wall_seconds"],
             **{task: 100 * results[task]["accuracy"] for task in TASKS}}
    print(f"  {mode:8s} seed {seed}: " + ", ".join(f"{TASKS[t]} {entry[t]:.1f} %" for t in TASKS)
          + f" (SFT {entry['sft_s']:.0f} s, whole arm {time.perf_counter() - started:.0f} s)", flush=True)
    return entry


def spread(values: list[float], unit: str = " %") -> str:
    mean = statistics.fmean(values)
    deviation = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {deviation:.1f}{unit} ({min(values):.1f}–{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=["weighted", "average", "max", "none"])
    parser.add_argument("--out", type=Path, default=Path("runs/ablation_cpu"))
    args = parser.parse_args()
    out = args.out if args.out.is_absolute() else REPO / args.out
    started = time.perf_counter()
    runs: dict[str, list[dict]] = {mode: [] for mode in args.modes}
    for seed in args.seeds:
        data = data_for(seed, out)
        for mode in args.modes:
            runs[mode].append(arm(mode, seed, data, out))

    print(f"\n{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), 64 held-out questions per modality, "
          f"chance 25 %; total wall time {(time.perf_counter() - started) / 60:.1f} min\n")
    print("| video pooling | tokens per video | video | image | multi-image | SFT wall time |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, entries in runs.items():
        cells = [spread([e[task] for e in entries]) for task in TASKS]
        print(f"| {mode} | {int(entries[0]['tokens'])} | " + " | ".join(cells)
              + f" | {statistics.fmean(e['sft_s'] for e in entries):.0f} s |")
    if "weighted" in runs and "average" in runs:
        gains = [w["eval_video"] - a["eval_video"] for w, a in zip(runs["weighted"], runs["average"])]
        print(f"\nvideo accuracy, prompt-guided minus average pooling: {statistics.fmean(gains):+.1f} points "
              f"(per seed: {', '.join(f'{g:+.1f}' for g in gains)})")


if __name__ == "__main__":
    main()
