"""A run directory moved to another path, with its data copied elsewhere (another cluster's file
system mounts both elsewhere): complete stages are skipped, the unfinished one resumes at its
checkpoint; data that really changed still re-runs its stage."""

import json
import shutil

import pytest

from conftest import pipeline_env, run_pipeline, write_recipe
from pipeline.checkpoint import FAULT_ENV
from pipeline.data.synthetic import SynthSettings, generate
from pipeline.metrics import read_metrics

pytestmark = pytest.mark.integration

CARDS = ["synthetic_video", "synthetic_image", "synthetic_multi_image"]


def recipe_at(run_dir) -> dict:
    return {"name": "moved", "run_dir": str(run_dir), "backend": "cpu", "seed": 0, "model": {"source": "tiny"},
            "data": {"cards": [f"${{DATA_ROOT}}/synth/cards/{card}.yaml" for card in CARDS], "num_workers": 2,
                     "max_length": 512, "shuffle_buffer": 8},
            "shard": {"max_samples_per_shard": 4, "num_frames": 8},
            "sft": {"zero_stage": 2, "precision": "fp32", "global_batch_size": 4, "micro_batch_size": 2, "lr": 2e-3,
                    "epochs": 10, "max_steps": 6, "log_every": 1, "save_every": 2}}


def test_a_moved_run_directory_skips_complete_stages_and_resumes_the_unfinished_one(tmp_path):
    site_a, site_b = tmp_path / "cluster_a", tmp_path / "cluster_b"
    generate(site_a / "data" / "synth", SynthSettings(seed=2, videos=12, images=8, multi_images=6, eval_questions=0,
                                                      dpo_pairs=0, size=48, frames=8))
    recipe_a = write_recipe(site_a / "recipe.yaml", recipe_at(site_a / "runs" / "moved"))
    killed = run_pipeline("run", str(recipe_a), env=pipeline_env(DATA_ROOT=str(site_a / "data"),
                                                                 **{FAULT_ENV: "before_rename:4"}))
    assert killed.returncode != 0 and (site_a / "runs/moved/shard/COMPLETE").is_file()
    assert (site_a / "runs/moved/sft/checkpoints/step_2").is_dir()

    # another cluster: the run directory and the data under other paths (copies keep mtimes), A gone
    shutil.copytree(site_a / "runs", site_b / "scratch" / "runs")
    shutil.copytree(site_a / "data", site_b / "datasets")
    shutil.rmtree(site_a)
    recipe_b = write_recipe(site_b / "recipe.yaml", recipe_at(site_b / "scratch" / "runs" / "moved"))
    env_b = pipeline_env(DATA_ROOT=str(site_b / "datasets"))
    resumed = run_pipeline("run", str(recipe_b), "--resume", "auto", env=env_b)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "stage shard: skipped" in resumed.stderr
    assert "resumed from" in resumed.stderr and "step_2 at step 2" in resumed.stderr
    assert "inputs changed" not in resumed.stderr and "different settings" not in resumed.stderr
    run_b = site_b / "scratch" / "runs" / "moved"
    assert [m["step"] for m in read_metrics(run_b / "sft" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert not list(run_b.glob("*.replaced*")) and not list(run_b.glob("*/*.replaced*"))

    # data that really changed: a question edited -> the shard stage (and what follows) runs again
    annotation = site_b / "datasets" / "synth" / "video_qa.json"
    records = json.loads(annotation.read_text())
    records[0]["QA"][0]["q"] = records[0]["QA"][0]["q"] + " (edited)"
    annotation.write_text(json.dumps(records))
    again = run_pipeline("run", str(recipe_b), "--stages", "shard", env=env_b)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "stage shard: skipped" not in again.stderr and "inputs changed since it completed" in again.stderr
