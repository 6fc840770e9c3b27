"""Recipe schema: typed parsing, overrides, cross-key validation, and the CLI failing fast."""

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT, pipeline_env, run_pipeline, write_recipe
from pipeline.recipe import Recipe, RecipeError, differences, load_recipe, parse_recipe, validate

pytestmark = pytest.mark.unit


def minimal(tmp_path: Path, **sft) -> dict:
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    return {"name": "t", "run_dir": str(tmp_path / "run"), "backend": "cpu",
            "data": {"manifest": str(manifest)}, "sft": {"global_batch_size": 8, "micro_batch_size": 2, **sft}}


def error_of(data: dict, overrides=()) -> str:
    with pytest.raises(RecipeError) as caught:
        validate(parse_recipe(data, list(overrides), "r.yaml"))
    return str(caught.value)


def test_a_valid_recipe_becomes_typed_sections(tmp_path):
    recipe = parse_recipe(minimal(tmp_path, lr=1e-4), ["sft.zero_stage=2", "data.weights.video=3"], "r.yaml")
    validate(recipe)
    assert parse_recipe(minimal(tmp_path), ["sft.lr=1e-5"]).sft.lr == 1e-5  # YAML 1.1 would say "1e-5" is a string
    assert recipe.stages == ["sft"]
    assert recipe.sft.lr == 1e-4 and recipe.sft.zero_stage == 2 and recipe.sft.trainable.vision is False
    assert recipe.data.weights == {"video": 3.0}  # a mapping given replaces the default mapping
    assert recipe.batch_layout(1) == (2, 4, 1) and recipe.batch_layout(4) == (2, 1, 4)
    assert parse_recipe(yaml.safe_load(recipe.to_yaml()), source="again").to_dict() == recipe.to_dict()


def test_unknown_keys_name_the_path_and_the_nearest_key(tmp_path):
    data = minimal(tmp_path)
    data["sft"]["learning_rate"] = 1e-5
    message = error_of(data)
    assert message.startswith("r.yaml: sft.learning_rate: unknown key (did you mean 'lr'?)")
    data = minimal(tmp_path)
    data["sft"]["trainable"] = {"visoin": True}
    assert "sft.trainable.visoin: unknown key (did you mean 'vision'?)" in error_of(data)
    assert "unknown key (did you mean 'seed'?)" in error_of({**minimal(tmp_path), "sed": 1})


def test_wrong_types_and_values_say_what_was_expected(tmp_path):
    assert "sft.lr: expected a number, got 'fast'" in error_of(minimal(tmp_path, lr="fast"))
    assert "sft.zero_stage: expected one of 0, 1, 2, 3, got 4" in error_of(minimal(tmp_path, zero_stage=4))
    assert "sft.micro_batch_size: expected an integer, got 2.5" in error_of(minimal(tmp_path, micro_batch_size=2.5))
    assert "backend: expected one of 'auto', 'cpu', 'cuda', 'npu', got 'tpu'" in error_of({**minimal(tmp_path), "backend": "tpu"})
    assert "sft.warmup_ratio: expected a fraction in [0, 1)" in error_of(minimal(tmp_path, warmup_ratio=1.5))
    assert "data.weights.audio: unknown modality" in error_of(minimal(tmp_path), ["data.weights.audio=1"])


def test_batch_sizes_must_multiply_to_the_global_batch(tmp_path):
    assert "not divisible by sft.micro_batch_size x world size = 3 x 1" in error_of(minimal(tmp_path, micro_batch_size=3))
    message = error_of(minimal(tmp_path, gradient_accumulation_steps=3))
    assert "2 x 3 x 1 = 6, but sft.global_batch_size=8" in message
    # the world size comes from the cluster section
    assert "micro_batch_size x world size = 2 x 3" in error_of(minimal(tmp_path), ["cluster.procs_per_node=3"])


def test_missing_paths_fail_with_their_key(tmp_path):
    data = minimal(tmp_path)
    data["data"]["manifest"] = str(tmp_path / "nowhere.json")
    assert "data.manifest: " in error_of(data) and "does not exist" in error_of(data)
    data = minimal(tmp_path)
    data["model"] = {"source": "llava_next", "llava_next_path": "${NO_SUCH_VARIABLE_X}/llava", "clip_path": str(tmp_path)}
    assert "model.llava_next_path: ${NO_SUCH_VARIABLE_X}/llava uses ${NO_SUCH_VARIABLE_X}, which is not set" in error_of(data)
    data = minimal(tmp_path)
    data["shard"] = {}
    data["data"]["cards"] = ["datasets/missing_card.yaml"]
    assert "data.cards[0]: datasets/missing_card.yaml does not exist" in error_of(data)
    missing = []
    validate(parse_recipe(data, source="r.yaml"), missing_paths=missing)  # `validate` on a login node: notes
    assert len(missing) == 1 and "data.cards[0]" in missing[0]


def test_overrides_are_type_checked_and_cannot_invent_stages(tmp_path):
    assert "sft.save_every: expected an integer, got 'often'" in error_of(minimal(tmp_path), ["sft.save_every=often"])
    with pytest.raises(RecipeError, match="has no 'shard' section"):
        parse_recipe(minimal(tmp_path), ["shard.processes=4"])
    with pytest.raises(RecipeError, match="not of the form key=value"):
        parse_recipe(minimal(tmp_path), ["sft.lr"])


def test_run_dir_and_environment_variables_are_interpolated(tmp_path, monkeypatch):
    monkeypatch.setenv("PPLLAVA_TEST_ROOT", str(tmp_path))
    data = minimal(tmp_path)
    data["run_dir"] = "${PPLLAVA_TEST_ROOT}/${name}"
    data["data"]["variables"] = {"SYNTH": "${run_dir}/synth"}
    recipe = parse_recipe(data)
    assert recipe.run_dir == f"{tmp_path}/t" and recipe.data.variables == {"SYNTH": f"{tmp_path}/t/synth"}


def test_differences_lists_dotted_keys():
    assert differences({"a": 1, "b": {"c": 2, "d": 3}}, {"a": 1, "b": {"c": 5, "d": 3}, "e": 0}) == ["b.c", "e"]


@pytest.mark.parametrize("name, layout", [("sft_gpu", "micro 4 x accumulation 4 x world 16"),
                                          ("sft_npu", "micro 2 x accumulation 4 x world 32")])
def test_cluster_recipes_validate_to_a_global_batch_of_256(name, layout):
    result = run_pipeline("validate", f"recipes/{name}.yaml", timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"sft global batch: {layout} " in result.stdout and result.stdout.rstrip().endswith("= 256")
    recipe = load_recipe(REPO_ROOT / "recipes" / f"{name}.yaml")
    assert (recipe.sft.lr, recipe.sft.warmup_ratio, recipe.sft.epochs, recipe.sft.zero_stage, recipe.sft.precision,
            recipe.data.max_length) == (2e-5, 0.03, 1.0, 3, "bf16", 4096)


@pytest.mark.parametrize("name, stage, layout, total", [
    ("sft_lora_gpu", "sft", "micro 1 x accumulation 32 x world 8", 256),
    ("sft_lora_npu", "sft", "micro 2 x accumulation 16 x world 8", 256),
    ("dpo_lora_gpu", "dpo", "micro 1 x accumulation 8 x world 8", 64)])
def test_lora_recipes_reach_the_papers_global_batch_on_one_node(name, stage, layout, total):
    result = run_pipeline("validate", f"recipes/{name}.yaml", timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"{stage} global batch: {layout} (1 node(s) x 8) = {total}" in result.stdout
    section = getattr(load_recipe(REPO_ROOT / "recipes" / f"{name}.yaml"), stage)
    assert section.lora is not None and section.lora.rank == 128 and section.zero_stage == 2
    assert stage == "dpo" or not section.trainable.llm


def test_every_recipe_starts_with_the_command_that_runs_it():
    for path in sorted((REPO_ROOT / "recipes").glob("*.yaml")):
        lines = path.read_text().splitlines()
        header = lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))]
        assert header and any(f"pipeline run recipes/{path.name}" in line for line in header[:3]), path.name


@pytest.mark.parametrize("change, expected", [
    ({"sft": {"lerning_rate": 1}}, "sft.lerning_rate: unknown key"),
    ({"sft": {"micro_batch_size": "two"}}, "sft.micro_batch_size: expected an integer"),
    ({"sft": {"lora": {}}}, "sft.lora trains the LLM through adapters, but sft.trainable.llm is true"),
    ({"sft": {"lora": {"dropout": 1.0}, "trainable": {"llm": False}}}, "sft.lora.dropout: expected a fraction in [0, 1)"),
    ({"sft": {"lora": {}, "trainable": {"llm": False}}, "export": {"adapter": True}},
     "export.adapter: sft also trains projector, clip_text, clip_projections fully"),
    ({"sft": {"micro_batch_size": 3}}, "not divisible"),
    ({"data": {"manifest": "/nonexistent/manifest.json"}}, "data.manifest: /nonexistent/manifest.json does not exist"),
    ({"data": {"shard_root": "pipe:aws s3 cp s3://bucket/shards -"}}, "data.shard_root: a pipe: command needs {path}"),
    ({"data": {"shard_root": "/nonexistent/shards"}}, "data.shard_root: /nonexistent/shards does not exist"),
    ({"data": {"read_retries": -1}}, "data.read_retries: must be >= 0, got -1"),
])
def test_bad_recipes_fail_fast_on_the_command_line(tmp_path, change, expected):
    data = minimal(tmp_path)
    for section, values in change.items():
        data.setdefault(section, {}).update(values)
    path = write_recipe(tmp_path / "bad.yaml", data)
    # Fast means before torch: a torch that cannot be imported stands first on the path.
    stand_in = tmp_path / "no_torch" / "torch"
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text("raise ImportError('torch was imported before the recipe was checked')\n")
    result = run_pipeline("run", str(path), timeout=60, env=pipeline_env(PYTHONPATH=str(stand_in.parent)))
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert not (tmp_path / "run").exists(), "nothing may be created before the recipe is valid"


def recipe_keys(cls=Recipe, prefix=""):
    """Every key of the schema: a section's keys bare (each section has its own table), deeper
    mappings dotted (trainable.vision)."""
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        if item.metadata.get("internal"):
            continue
        yield prefix + item.name
        nested = [o for o in (hints[item.name], *typing.get_args(hints[item.name])) if dataclasses.is_dataclass(o)]
        if nested:
            yield from recipe_keys(nested[0], "" if cls is Recipe else f"{prefix}{item.name}.")


def test_every_recipe_key_is_documented():
    documented = (REPO_ROOT / "docs" / "recipes.md").read_text()
    assert len(list(recipe_keys())) > 60
    assert sorted({key for key in recipe_keys() if f"`{key}`" not in documented}) == []


@pytest.mark.parametrize("name, layout", [("dpo_gpu", "micro 1 x accumulation 4 x world 16"),
                                          ("dpo_npu", "micro 1 x accumulation 2 x world 32")])
def test_dpo_recipes_carry_the_paper_settings(name, layout):
    result = run_pipeline("validate", f"recipes/{name}.yaml", timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"dpo global batch: {layout} " in result.stdout and result.stdout.rstrip().endswith("= 64")
    dpo = load_recipe(REPO_ROOT / "recipes" / f"{name}.yaml").dpo
    assert (dpo.lr, dpo.beta, dpo.epochs, dpo.zero_stage, dpo.precision) == (5e-6, 0.1, 2.0, 3, "bf16")


def test_fingerprinted_paths_are_relative_to_the_run_directory_and_path_variables(monkeypatch):
    monkeypatch.setenv("DATA_ROOT", "/mnt/cluster_a/data")
    monkeypatch.setenv("TEMPLATE", "plain_v1")
    recipe = parse_recipe({"name": "p", "run_dir": "/scratch/a/runs/p", "data": {"template": "${TEMPLATE}",
                           "cards": ["${DATA_ROOT}/cards/video.yaml"], "variables": {"MEDIA": "/mnt/media"}}})
    inputs = {"cards": recipe.data.cards, "model": "/scratch/a/runs/p/synth/model", "other": "/elsewhere/x",
              "media": {"/mnt/media/v.mp4": 1}, "template": recipe.data.template, "name": "/mnt/cluster_a/datax"}
    assert recipe.portable(inputs) == {
        "cards": ["${DATA_ROOT}/cards/video.yaml"], "model": "${run_dir}/synth/model", "other": "/elsewhere/x",
        "media": {"${MEDIA}/v.mp4": 1},
        "template": "plain_v1",  # a variable holding a setting stays its value: changing it must show
        "name": "/mnt/cluster_a/datax"}  # a prefix only at a path boundary
    assert recipe.to_dict().get("environment") is None


def test_model_kernels_are_checked_by_name_wherever_the_model_runs(tmp_path):
    def with_model(**model):
        return {**minimal(tmp_path), "model": model}

    assert "model.kernels: unknown op 'softmax'; expected one of attention, rms_norm" in error_of(
        with_model(kernels={"softmax": "fused"}))
    assert "model.kernels: attention: unknown implementation 'flash'" in error_of(with_model(kernels={"attention": "flash"}))
    assert "both choose the LLM's attention; keep one" in error_of(
        with_model(kernels={"attention": "eager"}, attn_implementation="sdpa"))
    assert "model.kernels: expected one of" in error_of(with_model(kernels="fastest"))
    for choice in ("auto", "reference", {"rms_norm": "reference"}):
        validate(parse_recipe(with_model(kernels=choice), source="r.yaml"))
    eval_only = {"name": "t", "run_dir": str(tmp_path / "run"), "backend": "cpu", "model": {"kernels": {"x": "y"}},
                 "eval": {"model_path": str(tmp_path)}}
    assert "model.kernels: unknown op 'x'" in error_of(eval_only)  # eval reads the key too


def test_validate_warns_of_allocator_settings_an_npu_job_would_exit_on(tmp_path, monkeypatch):
    from pipeline.__main__ import _environment_conflicts

    data = minimal(tmp_path)
    data["data"]["max_length"] = 512  # the tiny model's context
    data = {**data, "backend": "npu",
            "cluster": {"setup": ["source /usr/local/Ascend/ascend-toolkit/set_env.sh",
                                  "export PYTORCH_NPU_ALLOC_CONF=expandable_segments:True  # ours"]}}
    monkeypatch.delenv("PYTORCH_NPU_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    assert _environment_conflicts(parse_recipe(data, source="npu.yaml")) == []
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "garbage_collection_threshold:0.8")
    (conflict,) = _environment_conflicts(parse_recipe(data, source="npu.yaml"))
    assert conflict.startswith("PYTORCH_NPU_ALLOC_CONF=expandable_segments:True and PYTORCH_ALLOC_CONF=")
    assert "npu.yaml's cluster.setup" in conflict
    (tmp_path / "manifest.json").write_text('{"shards": []}')
    path = write_recipe(tmp_path / "npu.yaml", data)
    result = run_pipeline("validate", str(path), timeout=120,
                          env=pipeline_env(PYTORCH_ALLOC_CONF="garbage_collection_threshold:0.8"))
    assert result.returncode == 0, result.stderr
    assert "warning: PYTORCH_NPU_ALLOC_CONF=expandable_segments:True and PYTORCH_ALLOC_CONF=" in result.stdout
