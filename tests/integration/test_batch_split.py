"""The global batch, not its split, decides training: the same samples in every step (the data
order is a function of seed and step) and the same loss (normalised over the global batch)."""

import pytest

from conftest import run_pipeline, small_shards, training_recipe, write_recipe
from pipeline.metrics import read_metrics

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return small_shards(tmp_path_factory.mktemp("split_data"))


def losses(tmp_path, manifest, micro: int, accumulation: int) -> list[float]:
    run_dir = tmp_path / f"run_{micro}x{accumulation}"
    recipe = training_recipe(run_dir, manifest, micro_batch_size=micro, gradient_accumulation_steps=accumulation,
                             global_batch_size=4, max_steps=4)
    result = run_pipeline("run", str(write_recipe(tmp_path / f"{micro}x{accumulation}.yaml", recipe)))
    assert result.returncode == 0, result.stderr[-4000:]
    return [m["loss"] for m in read_metrics(run_dir / "sft" / "metrics.jsonl")]


def test_micro_batch_times_accumulation_at_a_fixed_global_batch_leaves_every_loss_unchanged(tmp_path, manifest):
    reference = losses(tmp_path, manifest, 4, 1)
    assert len(reference) == 4 and len(set(reference)) == 4
    for micro, accumulation in ((2, 2), (1, 4)):
        assert losses(tmp_path, manifest, micro, accumulation) == pytest.approx(reference, abs=1e-5)
