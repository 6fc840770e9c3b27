"""The eval stage launched on 2 processes (gloo): each rank asks its share of every benchmark's
questions (one rank has one more than the other), rank 0 gathers them, and every answer file and
table equals a 1-process run's."""

import json

import pytest

from benchmark_layout import write_benchmarks
from conftest import run_pipeline, write_recipe

pytestmark = pytest.mark.dist


def run_eval(world, root, processes: int):
    recipe = {"name": "eval_ranks", "run_dir": str(root / f"run_{processes}"), "backend": "cpu",
              "cluster": {"nodes": 1, "procs_per_node": processes},
              "eval": {"model_path": str(world["model"]), "benchmarks": world["benchmarks"], "batch_size": 1,
                       "relevance_maps": 1}}
    result = run_pipeline("run", str(write_recipe(root / f"eval_{processes}.yaml", recipe)), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return root / f"run_{processes}" / "eval"


def test_two_ranks_answer_as_one(tmp_path):
    world = write_benchmarks(tmp_path / "data")
    one, two = run_eval(world, tmp_path, 1), run_eval(world, tmp_path, 2)
    for name in ("mvbench", "videomme", "videomme_subtitles", "msvd_qa", "activitynet_qa", "vcg"):
        assert (two / f"{name}.answers.jsonl").read_text() == (one / f"{name}.answers.jsonl").read_text()
    results_one, results_two = (json.loads((d / "results.json").read_text())["benchmarks"] for d in (one, two))
    assert results_two["mvbench"]["ranks"] == 2 and results_one["mvbench"]["ranks"] == 1
    for name, entry in results_one.items():
        assert {k: v for k, v in results_two[name].items() if k != "ranks"} == \
            {k: v for k, v in entry.items() if k != "ranks"}
    assert sorted(p.name for p in (two / "gpt").iterdir()) == sorted(p.name for p in (one / "gpt").iterdir())
    assert len(list((two / "relevance").rglob("*.png"))) == 6
