"""Sharded samples no mixture weight draws (LLaVA-665k's text-only records under weights without
``text``) are said, not dropped silently: by validate when the shards exist, in the shard and SFT
stages' logs and summaries, and in a rehearsal's report."""

import json

import pytest

from conftest import write_recipe
from pipeline.__main__ import main
from pipeline.data.shard_files import never_drawn, never_drawn_warning
from pipeline.exit_codes import ExitCode

pytestmark = pytest.mark.unit


def manifest_with(tmp_path, counts: dict[str, int]):
    shards = [{"path": f"{stream}/000000.tar", "modality": stream, "samples": count, "dataset": stream}
              for stream, count in counts.items()]
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"shards": shards, "counts": counts}))
    return path


def test_streams_without_a_weight_are_never_drawn(tmp_path):
    manifest = manifest_with(tmp_path, {"video": 3, "image": 2, "text": 5, "dpo": 4})
    assert never_drawn(manifest, {"video": 1.0, "image": 1.0}) == {"text": 5}
    assert never_drawn(manifest, {"video": 1.0, "image": 0.0, "text": 1.0}) == {"image": 2}
    assert never_drawn(manifest, {"video": 1.0, "image": 1.0, "text": 0.5}) == {}
    assert never_drawn_warning({"text": 5}).startswith("sharded, never drawn: 5 text sample(s)")
    assert "data.weights.text" in never_drawn_warning({"text": 5})


def test_validate_warns_when_the_shards_hold_samples_no_weight_draws(tmp_path, capsys):
    manifest = manifest_with(tmp_path, {"video": 3, "text": 5})
    recipe = {"name": "r", "run_dir": str(tmp_path / "run"), "backend": "cpu",
              "data": {"manifest": str(manifest), "weights": {"video": 1.0}, "max_length": 512},
              "sft": {"global_batch_size": 1}}
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == ExitCode.OK
    assert f"warning: {manifest}: sharded, never drawn: 5 text sample(s)" in capsys.readouterr().out
    recipe["data"]["mixture"] = "natural"  # every sample alike: nothing left out
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == ExitCode.OK
    assert "never drawn" not in capsys.readouterr().out


@pytest.mark.parametrize("content, expected", [
    ({"counts": {"video": 3}}, 'no "shards" list: expected the manifest.json a shard stage writes'),
    ({"shards": [{"path": "video/0.tar", "modality": "video"}]}, "shards[0]: expected samples (int)"),
    ({"shards": [{"path": "v/0.tar", "modality": "audio", "samples": 2}]}, "shards[0].modality 'audio': expected one of"),
    ("{not json", "cannot read it as a shard manifest"),
])
def test_validate_names_a_manifest_that_is_not_one(tmp_path, capsys, content, expected):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(content if isinstance(content, str) else json.dumps(content))
    recipe = {"name": "r", "run_dir": str(tmp_path / "run"), "backend": "cpu",
              "data": {"manifest": str(manifest), "max_length": 512}, "sft": {"global_batch_size": 1}}
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == ExitCode.BAD_INPUT
    assert f"{manifest}: {expected}" in capsys.readouterr().err
