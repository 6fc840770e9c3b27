"""Export stage end to end: a 2-step SFT of the tiny model under ZeRO-2 and ZeRO-3 exported by
`python -m pipeline run`, checked against weights consolidated here independently, in fresh
processes, and (remote code) in an interpreter where `ppllava` cannot be imported."""

import json
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time

import pytest
import torch
import yaml

from conftest import (REPO_ROOT, pipeline_env, run_pipeline, saved_tensors, small_shards, training_recipe,
                      write_recipe)
from pipeline.data.records import Turn
from pipeline.data.templates import encode, render
from pipeline.layout import CHECKSUMS
from pipeline.model.check import ModelFilesError, probe_inputs, probe_logits, verify_checksums
from pipeline.model.consolidate import model_from_state_dict
from pipeline.model.setup import build_model, load_tokenizers
from pipeline.recipe import RecipeError, load_recipe, parse_recipe, validate
from pipeline.runner import StageFailed
from ppllava import PPLLaVAConfig, PPLLaVAForConditionalGeneration
from stages import export as export_stage

pytestmark = pytest.mark.integration

STEPS = 2
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "clip_tokenizer/tokenizer.json", "clip_tokenizer/tokenizer_config.json"}
COMMON_FILES = TOKENIZER_FILES | {"config.json", "generation_config.json", "processor_config.json", "README.md",
                                  CHECKSUMS, "COMPLETE"}
REMOTE_CODE = {"configuration_ppllava.py", "modeling_ppllava.py", "bt_adapter.py", "clip_text.py", "pooling.py",
               "processing.py"}

# Loads an export and writes its logits on saved inputs; run in a fresh interpreter. "clean": -I -S
# plus the venv's site-packages appended by hand, so the .pth hook of the editable install never
# runs and `ppllava` is not importable; the export must bring its own code.
LOAD_SCRIPT = r"""
import importlib.util, sys
mode, site_packages, directory, inputs_path, output_path = sys.argv[1:6]
if mode == "clean":
    sys.path.append(site_packages)
    assert importlib.util.find_spec("ppllava") is None, "ppllava is importable: the check would prove nothing"
else:
    import ppllava  # registers the model type
import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer
model = AutoModelForImageTextToText.from_pretrained(directory, trust_remote_code=mode == "clean").eval()
tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=mode == "clean")
with torch.no_grad():
    logits = model(**torch.load(inputs_path)).logits
torch.save({"logits": logits, "class": type(model).__module__, "dtype": str(model.dtype),
            "eos": tokenizer.eos_token_id}, output_path)
"""


def export_run(root, manifest, zero_stage: int, export: dict, env: dict, **sft):
    recipe = training_recipe(root / "run", manifest, zero_stage=zero_stage, max_steps=STEPS, global_batch_size=2,
                             micro_batch_size=2, **sft)
    recipe["export"] = export
    return write_recipe(root / "recipe.yaml", recipe)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return small_shards(tmp_path_factory.mktemp("export_data"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # transformers copies remote code into HF_HOME/modules: keep it inside the test's directory
    return pipeline_env(HF_HOME=str(tmp_path_factory.mktemp("hf_home")), HF_HUB_OFFLINE="1")


@pytest.fixture(scope="module")
def zero2(tmp_path_factory, manifest, env):
    """fp32 export in shards of at most 200 KB (the tiny model is ~0.7 MB), with its modeling code."""
    root = tmp_path_factory.mktemp("export_zero2")
    recipe = export_run(root, manifest, 2, {"dtype": "fp32", "max_shard_size": "200KB", "trust_remote_code": True}, env)
    start = time.monotonic()
    result = run_pipeline("run", str(recipe), env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return {"recipe": recipe, "run": root / "run", "seconds": time.monotonic() - start, "dtype": torch.float32}


@pytest.fixture(scope="module")
def zero3(tmp_path_factory, manifest, env):
    """Default export settings (bf16, 5GB shards), a checkpoint at every step; the first attempt is
    killed with SIGKILL while the export is under way, the second one completes."""
    root = tmp_path_factory.mktemp("export_zero3")
    recipe = export_run(root, manifest, 3, {}, env, save_every=1)
    run_dir = root / "run"
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(recipe)], cwd=REPO_ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run_dir / "export.tmp").exists():
        assert process.poll() is None, f"the run ended before the export started: {process.communicate()[1][-4000:]}"
        assert time.monotonic() < deadline, "no export after 300 s"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    killed = {"files": sorted(p.name for p in (run_dir / "export").iterdir()) if (run_dir / "export").exists() else [],
              "temporary": (run_dir / "export.tmp").exists()}
    result = run_pipeline("run", str(recipe), env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return {"recipe": recipe, "run": run_dir, "killed": killed, "stderr": result.stderr, "dtype": torch.bfloat16}


def files_of(directory) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


def model_with(run_dir, state_dict, dtype) -> PPLLaVAForConditionalGeneration:
    """The checkpoint's model, built the plain way (random init, then the weights), in ``dtype`` as
    from_pretrained builds it (RoPE's inv_freq stays fp32; `.to(bf16)` would round it)."""
    config = PPLLaVAConfig.from_pretrained(run_dir / "sft" / "model")
    model = PPLLaVAForConditionalGeneration._from_config(config, dtype=dtype)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def logits_in_fresh_process(tmp_path, directory, inputs, mode: str, env: dict) -> dict:
    torch.save(inputs, tmp_path / "inputs.pt")
    site_packages = sysconfig.get_paths()["purelib"]
    flags = ["-I", "-S"] if mode == "clean" else []
    result = subprocess.run([sys.executable, *flags, "-c", LOAD_SCRIPT, mode, site_packages, str(directory),
                             str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                            cwd=tmp_path, env={k: v for k, v in env.items() if k != "PYTHONPATH"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(tmp_path / "out.pt")


@pytest.mark.parametrize("case", ["zero2", "zero3"])
def test_the_export_holds_exactly_these_files(case, request):
    run = request.getfixturevalue(case)
    export = run["run"] / "export"
    found = files_of(export)
    if case == "zero2":
        index = json.loads((export / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) >= 3, "200KB shards of a 0.7 MB model: the index path must be exercised"
        assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
        assert found == COMMON_FILES | REMOTE_CODE | set(shards) | {"model.safetensors.index.json"}
        assert json.loads((export / "config.json").read_text())["auto_map"] == export_stage.AUTO_MAP
    else:
        assert found == COMMON_FILES | {"model.safetensors"}
        assert "auto_map" not in json.loads((export / "config.json").read_text())
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "ppllava" and config["architectures"] == ["PPLLaVAForConditionalGeneration"]
    assert not (run["run"] / "export.tmp").exists()
    verify_checksums(export)


@pytest.mark.parametrize("case", ["zero2", "zero3"])
def test_exported_logits_equal_the_consolidated_checkpoint_in_a_fresh_process(case, request, tmp_path, env):
    run = request.getfixturevalue(case)
    checkpoint = run["run"] / "sft" / "checkpoints" / f"step_{STEPS}"
    assert (run["run"] / "sft" / "checkpoints" / "latest").read_text().strip() == checkpoint.name
    reference = model_with(run["run"], saved_tensors(checkpoint), run["dtype"])
    inputs = probe_inputs(reference.config, seed=7)  # not the stage's own probe (seed 0)
    expected = probe_logits(reference, inputs)
    loaded = logits_in_fresh_process(tmp_path, run["run"] / "export", inputs, "installed", env)
    assert loaded["class"] == "ppllava.modeling" and loaded["dtype"] == str(run["dtype"])
    tolerance = 1e-5 if run["dtype"] == torch.float32 else 0.0  # issue 7: atol 1e-5 in fp32
    torch.testing.assert_close(loaded["logits"], expected, atol=tolerance, rtol=0)


def test_zero2_export_has_the_trained_weights_and_the_frozen_ones_unchanged(zero2):
    """Rebuild the initial model as the SFT stage did (same seed): every trainable tensor moved in
    training, every frozen one (vision tower, CLIP's first positions, logit_scale) is bit-identical."""
    recipe = load_recipe(zero2["recipe"])
    torch.manual_seed(recipe.seed)
    initial = build_model(recipe, load_tokenizers(recipe)[0], "sdpa").state_dict()
    exported = PPLLaVAForConditionalGeneration.from_pretrained(zero2["run"] / "export").state_dict()
    assert set(exported) == set(initial)
    frozen = {k for k in initial if k.startswith("vision_tower.") or k in (
        "logit_scale", "clip_text.embeddings.position_embedding.frozen_head")}
    assert len(frozen) > 40
    assert [k for k in frozen if not torch.equal(exported[k], initial[k])] == []
    assert [k for k in set(initial) - frozen if torch.equal(exported[k], initial[k])] == []


def test_zero3_export_takes_the_latest_checkpoint_with_its_frozen_parameters(zero3):
    checkpoints = zero3["run"] / "sft" / "checkpoints"
    step1, step2 = saved_tensors(checkpoints / "step_1"), saved_tensors(checkpoints / "step_2")
    exported = PPLLaVAForConditionalGeneration.from_pretrained(zero3["run"] / "export").state_dict()
    assert set(exported) == set(step2) == set(step1)
    frozen = [k for k in step2 if k.startswith("vision_tower.") or "frozen_head" in k or k == "logit_scale"]
    assert all(torch.equal(step1[k], step2[k]) for k in frozen)
    assert all(torch.equal(exported[k], step2[k].to(torch.bfloat16)) for k in step2)
    moved = [k for k in step2 if k.startswith("language_model.") and not torch.equal(step1[k], step2[k])]
    assert moved and not all(torch.equal(exported[k], step1[k].to(torch.bfloat16)) for k in moved)


def test_remote_code_export_loads_where_ppllava_is_not_installed(zero2, tmp_path, env):
    export = zero2["run"] / "export"
    reference = PPLLaVAForConditionalGeneration.from_pretrained(export)
    inputs = probe_inputs(reference.config, seed=3)
    loaded = logits_in_fresh_process(tmp_path, export, inputs, "clean", env)
    assert loaded["class"].startswith("transformers_modules.") and loaded["class"].endswith(".modeling_ppllava")
    assert loaded["eos"] == 2
    torch.testing.assert_close(loaded["logits"], probe_logits(reference, inputs), atol=1e-5, rtol=0)


def test_model_card_generation_config_and_chat_template(zero2):
    export, checkpoint = zero2["run"] / "export", zero2["run"] / "sft" / "checkpoints" / f"step_{STEPS}"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    manifest = json.loads(load_recipe(zero2["recipe"]).manifest_path.read_text())
    card = (export / "README.md").read_text()
    assert f"| steps | {STEPS} of {STEPS} (world size 1) |" in card
    assert f"| `loss` | {state['last_metrics']['loss']:.6g} |" in card
    assert f"| manifest fingerprint | `{manifest['fingerprint']}` |" in card
    assert f"`{checkpoint.resolve()}`" in card
    assert (checkpoint / "recipe.yaml").read_text() in card and "zero_stage: 2" in card
    assert "trust_remote_code=True" in card

    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(zero2["run"] / "sft" / "model")
    generation = GenerationConfig.from_pretrained(export)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert generation.do_sample is False and generation.num_beams == 1 and generation.max_new_tokens == 512

    # The exported chat template renders what training encoded (plain_v1, the authors'): the same text,
    # and for a question the same tokens (in a history, joint tokenization may merge the space after
    # "ASSISTANT:" into the answer's first token; training tokenizes the two apart, as the authors do).
    exported = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
    image = exported.convert_tokens_to_ids("<image>")
    turns = [Turn("user", "<image>\nWhat colour is the red circle?"), Turn("assistant", "It is red."),
             Turn("user", "Which way does it move?")]
    messages = [{"role": t.role, "content": t.content} for t in turns]
    assert exported.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        tokenizer.bos_token + render(turns, "plain_v1"))
    question = exported.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True)["input_ids"]
    assert question == encode(turns[:1], tokenizer, image, "plain_v1").input_ids
    parts = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What colour is the red circle?"}]}]
    assert exported.apply_chat_template(parts, tokenize=False).endswith(
        "USER: <image>\nWhat colour is the red circle? ASSISTANT: ")


def test_a_second_run_skips_the_export(zero2, env):
    complete = (zero2["run"] / "export" / "COMPLETE").read_text()
    start = time.monotonic()
    result = run_pipeline("run", str(zero2["recipe"]), env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "stage export: skipped (complete, inputs unchanged" in result.stderr
    assert (zero2["run"] / "export" / "COMPLETE").read_text() == complete
    assert time.monotonic() - start < zero2["seconds"]


def test_a_killed_export_leaves_nothing_that_looks_complete(zero3):
    assert zero3["killed"] == {"files": [], "temporary": True}
    assert "export.tmp, left by an export that did not finish" in zero3["stderr"]
    assert "stage sft: skipped" in zero3["stderr"]


def test_checksums_name_a_missing_or_corrupted_shard(zero2, tmp_path):
    copy = shutil.copytree(zero2["run"] / "export", tmp_path / "export")
    shards = sorted(copy.glob("model-*.safetensors"))
    shards[0].unlink()
    data = bytearray(shards[1].read_bytes())
    data[-10] ^= 0xFF  # one flipped byte in the tensor data: safetensors would load it silently
    shards[1].write_bytes(bytes(data))
    with pytest.raises(ModelFilesError) as error:
        verify_checksums(copy)
    assert f"{shards[0].name} is missing" in str(error.value)
    assert f"{shards[1].name} is corrupted" in str(error.value)
    with pytest.raises(FileNotFoundError, match=shards[0].name):
        PPLLaVAForConditionalGeneration.from_pretrained(copy)


def test_weights_that_do_not_fit_the_config_fail_naming_the_keys(zero2):
    model_dir = zero2["run"] / "sft" / "model"
    state = dict(PPLLaVAForConditionalGeneration.from_pretrained(zero2["run"] / "export").state_dict())
    state.pop("image_newline")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing \['image_newline'\], unexpected \['extra.weight'\]"):
        model_from_state_dict(state, model_dir, torch.float32)


def test_recipe_checks_of_the_export_section(tmp_path, manifest):
    recipe = training_recipe(tmp_path / "run", manifest)
    with pytest.raises(RecipeError, match="export.max_shard_size: expected a size like 5GB"):
        validate(parse_recipe({**recipe, "export": {"max_shard_size": "5 gigabytes"}}))
    no_sft = {k: v for k, v in recipe.items() if k != "sft"}
    with pytest.raises(RecipeError, match="export.source_stage: exports the sft stage's final checkpoint, but"):
        validate(parse_recipe({**no_sft, "export": {}}))
    assert yaml.safe_load(parse_recipe({**recipe, "export": {}}).to_yaml())["export"]["dtype"] == "bf16"


def test_verification_fails_when_the_reloaded_logits_differ(zero3):
    export = zero3["run"] / "export"
    inputs = probe_inputs(PPLLaVAConfig.from_pretrained(export))
    expected = probe_logits(PPLLaVAForConditionalGeneration.from_pretrained(export), inputs)
    assert export_stage.verify(export, expected, inputs, torch.bfloat16, remote=False) == [
        "PPLLaVAForConditionalGeneration.from_pretrained", "AutoModelForImageTextToText.from_pretrained"]
    wrong = expected.clone()
    wrong[0, 0, 0] += 1
    # In bf16 the +1 lands on the nearest representable value (0.99..1.06 away, by that logit's size,
    # which depends on the trained fixture): assert the reported figure is the real difference and ~1.
    difference = float((wrong.float() - expected.float()).abs().max())
    assert 0.9 <= difference <= 1.1
    with pytest.raises(StageFailed) as failed:
        export_stage.verify(export, wrong, inputs, torch.bfloat16, remote=False)
    reported = re.fullmatch(r"PPLLaVAForConditionalGeneration\.from_pretrained: logits on the probe input differ from "
                            r"the checkpoint's by up to (\S+); the export in .* is not complete", str(failed.value))
    assert reported is not None, str(failed.value)
    # the message rounds to 3 significant figures (.3g): a difference of 1.0013 reads "1"
    assert float(reported.group(1)) == pytest.approx(difference, rel=5e-3)
    with pytest.raises(StageFailed, match="loads as torch.bfloat16, expected torch.float32"):
        export_stage.verify(export, expected, inputs, torch.float32, remote=False)


def test_a_zero0_checkpoint_exports_its_weights(tmp_path, manifest, env):
    """ZeRO-0 in fp32 has no DeepSpeed master copy: the module's weights are the master weights."""
    recipe = export_run(tmp_path, manifest, 0, {"dtype": "fp32"}, env)
    result = run_pipeline("run", str(recipe), env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    saved = saved_tensors(tmp_path / "run" / "sft" / "checkpoints" / f"step_{STEPS}")
    exported = PPLLaVAForConditionalGeneration.from_pretrained(tmp_path / "run" / "export").state_dict()
    assert set(exported) == set(saved) and all(torch.equal(exported[k], saved[k]) for k in saved)
