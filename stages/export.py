"""Export stage: the final training checkpoint -> a HuggingFace model directory, run_dir/export/.

    source     = export.source_stage (auto: dpo when the recipe has it, else sft)
    checkpoint = run_dir/<source>/checkpoints/latest: ZeRO-0/1/2/3, written by any number of ranks
    model      = pipeline.model.consolidate: the checkpoint's training_state/ on CPU (fp32 master weights + frozen
                 parameters + buffers; no DeepSpeed needed) loaded strictly into run_dir/<source>/model/config.json's
                 model, in export.dtype
    write run_dir/export.tmp/: config.json, model*.safetensors (+ index past export.max_shard_size), the LLM
        tokenizer with the chat template training used, clip_tokenizer/, processor_config.json,
        generation_config.json, README.md (provenance), [trust_remote_code: modeling code + auto_map], SHA256SUMS
    verify: reload it with its class, with AutoModelForImageTextToText [and as remote code]; the logits on a fixed
        interleaved probe (video + image + multi-image) must equal the consolidated model's bit for bit
    rename export.tmp -> export (the runner then writes COMPLETE)

Model files appear under run_dir/export only once verified: a killed export leaves export.tmp/,
which the next run removes. Rank 0 works; the other ranks wait (cluster.dist_timeout_minutes).
"""

from __future__ import annotations

import ast
import json
import logging
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

import ppllava
from backends import PRECISIONS
from backends.portable_state import read_index
from pipeline.atomic import publish_directory, set_aside, temporary_directory
from pipeline.checkpoint import latest_checkpoint
from pipeline.data.templates import ASSISTANT, ROLE_TEMPLATES, USER
from pipeline.layout import (ADAPTER_DIR, CLIP_TOKENIZER_DIR, MODEL_DIR, PROCESSOR_CONFIG, RECIPE_FILE, TRAINER_STATE,
                             TRAINING_STATE, checkpoints_dir)
from pipeline.model.check import probe_inputs, probe_logits, write_checksums
from pipeline.model.consolidate import consolidated_state_dict, model_from_state_dict
from pipeline.model.setup import load_directory_tokenizers, save_tokenizers
from pipeline.recipe import Recipe
from pipeline.runner import StageContext, StageFailed
from ppllava import PPLLaVAForConditionalGeneration
from ppllava.lora import ADAPTER_CONFIG, is_adapter, load_lora_config, save_adapter

logger = logging.getLogger(__name__)

DISTRIBUTED = False  # rank 0 exports; the other ranks wait
MAX_NEW_TOKENS = 512  # generation_config.json default; generate(max_new_tokens=...) overrides it
# Remote-code file names transformers' convention expects; the other ppllava modules keep theirs.
REMOTE_NAMES = {"config": "configuration_ppllava", "modeling": "modeling_ppllava"}
AUTO_MAP = {"AutoConfig": "configuration_ppllava.PPLLaVAConfig",
            "AutoModel": "modeling_ppllava.PPLLaVAForConditionalGeneration",
            "AutoModelForImageTextToText": "modeling_ppllava.PPLLaVAForConditionalGeneration"}


def inputs(recipe: Recipe, world_size: int) -> dict:
    return {"export": asdict(recipe.export), "source": recipe.export_source}


def role_chat_template(template: str, image_token: str) -> str:
    """A role template of pipeline/data/templates.py (plain_v1, vicuna_v1) as a jinja chat template:
    "<s>{system} USER: {q} ASSISTANT: {a}</s>USER: ..." ending with the generation prompt; a leading
    system message replaces the template's system prompt; content may be a string or a list of parts
    ({"type": "text", "text": ...} or a visual part -> image token + newline)."""
    spec = ROLE_TEMPLATES[template]
    prompt_end = f" {ASSISTANT}" if spec.space_with_answer else f" {ASSISTANT} "
    answer_start = " " if spec.space_with_answer else ""
    return (
        "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
        "{%- set messages = messages[1:] -%}{%- else -%}{%- set system = " + json.dumps(spec.system) + " -%}"
        "{%- endif -%}{{- bos_token -}}{%- for message in messages -%}{%- set text = namespace(value='') -%}"
        "{%- if message['content'] is string -%}{%- set text.value = message['content'] -%}{%- else -%}"
        "{%- for part in message['content'] -%}{%- if part['type'] == 'text' -%}"
        "{%- set text.value = text.value + part['text'] -%}{%- else -%}"
        "{%- set text.value = text.value + " + json.dumps(image_token + "\n") + " -%}{%- endif -%}{%- endfor -%}"
        "{%- endif -%}{%- if message['role'] == 'user' -%}"
        "{{- (system + ' ' if loop.first and system else '') + " + json.dumps(USER) + " + text.value + "
        + json.dumps(prompt_end) + " -}}"
        "{%- else -%}{{- " + json.dumps(answer_start) + " + text.value + eos_token -}}{%- endif -%}{%- endfor -%}"
    )


def write_remote_code(directory: Path) -> list[str]:
    """The ppllava modules modeling.py needs, imports made relative (transformers' remote-code loader
    copies a file and its relative imports; an absolute `ppllava` import would need the package)."""
    package, needed, queue = Path(ppllava.__file__).parent, [], ["modeling"]
    while queue:
        name = queue.pop()
        if name not in needed:
            needed.append(name)
            tree = ast.parse((package / f"{name}.py").read_text())
            queue += [node.module.split(".")[1] for node in ast.walk(tree)
                      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ppllava.")]
    written = []
    for name in needed:
        source = re.sub(r"^(\s*)from ppllava\.(\w+) import",
                        lambda m: f"{m.group(1)}from .{REMOTE_NAMES.get(m.group(2), m.group(2))} import",
                        (package / f"{name}.py").read_text(), flags=re.MULTILINE)
        if re.search(r"^\s*(from|import)\s+ppllava\b", source, flags=re.MULTILINE):
            raise StageFailed(f"ppllava/{name}.py imports the package in a way the remote-code export cannot rewrite")
        written.append(f"{REMOTE_NAMES.get(name, name)}.py")
        (directory / written[-1]).write_text(source)
    return written


def model_card(recipe: Recipe, checkpoint: Path, trainer_state: dict, dtype: str, remote: bool) -> str:
    manifest_path = recipe.manifest_path
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    sources = "".join(f"| `{name}` | card `{v.get('card_sha256', '?')[:16]}`, annotations "
                      f"`{v.get('annotation_sha256', '?')[:16]}`, media `{v.get('media_fingerprint', '?')[:16]}` |\n"
                      for name, v in sorted(manifest.get("sources", {}).items()))
    metrics = "".join(f"| `{key}` | {value:.6g} |\n" if isinstance(value, float) else f"| `{key}` | {value} |\n"
                      for key, value in trainer_state.get("last_metrics", {}).items())
    load = ("from transformers import AutoModelForImageTextToText, AutoTokenizer  # ppllava need not be installed\n"
            "model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)\n"
            "tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)" if remote else
            "import ppllava  # registers the model type with transformers' Auto classes\n"
            "from transformers import AutoModelForImageTextToText, AutoTokenizer\n"
            "model = AutoModelForImageTextToText.from_pretrained(path)\ntokenizer = AutoTokenizer.from_pretrained(path)")
    recipe_yaml = (checkpoint / RECIPE_FILE).read_text()
    return (f"---\nlibrary_name: transformers\npipeline_tag: image-text-to-text\ntags: [ppllava, video-llm]\n---\n\n"
            f"# {recipe.name}: PPLLaVA\n\nPPLLaVA (prompt-guided pooling video LLM) in {dtype}, exported from a training "
            f"checkpoint by the pipeline's export stage on {time.strftime('%Y-%m-%d %H:%M:%S')}. CLIP tokenizer: "
            f"`{CLIP_TOKENIZER_DIR}/`; input settings: `{PROCESSOR_CONFIG}`.\n\n"
            f"```python\n{load}\n```\n\n## Provenance\n\n| | |\n|---|---|\n"
            f"| source checkpoint | `{checkpoint.resolve()}` |\n"
            f"| steps | {trainer_state['step']} of {trainer_state.get('total_steps', '?')} "
            f"(world size {trainer_state.get('world_size', '?')}) |\n"
            f"| first loss | {trainer_state.get('first_loss') or float('nan'):.6g} |\n"
            f"| data manifest | `{manifest_path}` |\n"
            f"| manifest fingerprint | `{manifest.get('fingerprint', 'not found')}` |\n"
            f"| samples | {manifest.get('counts', {})} |\n\n"
            f"## Data sources (sha256 prefixes)\n\n| source | fingerprints |\n|---|---|\n{sources}\n"
            f"## Final metrics (last logged step)\n\n| metric | value |\n|---|---|\n{metrics}\n"
            f"## Recipe (resolved, from the checkpoint)\n\n```yaml\n{recipe_yaml}```\n")


def verify(directory: Path, expected: torch.Tensor, inputs: dict, dtype: torch.dtype, remote: bool) -> list[str]:
    from transformers import AutoModelForImageTextToText

    loaders = {"PPLLaVAForConditionalGeneration.from_pretrained": lambda: PPLLaVAForConditionalGeneration.from_pretrained(directory),
               "AutoModelForImageTextToText.from_pretrained": lambda: AutoModelForImageTextToText.from_pretrained(directory)}
    if remote:  # transformers prefers the registered ppllava classes to auto_map here: load the copy itself
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        remote_class = get_class_from_dynamic_module(AUTO_MAP["AutoModelForImageTextToText"], str(directory))
        loaders[f"{AUTO_MAP['AutoModelForImageTextToText']}.from_pretrained (the exported code)"] = (
            lambda: remote_class.from_pretrained(directory))
    for how, load in loaders.items():
        model = load()
        if model.dtype != dtype:
            raise StageFailed(f"{how}: the export loads as {model.dtype}, expected {dtype}")
        logits = probe_logits(model, inputs)
        if not torch.equal(logits, expected):
            raise StageFailed(f"{how}: logits on the probe input differ from the checkpoint's by up to "
                              f"{(logits.float() - expected.float()).abs().max():.3g}; the export in {directory} is "
                              f"kept for inspection (until the next run) and is not complete")
        del model
    return list(loaders)


def write_adapter(state: dict[str, torch.Tensor], checkpoint: Path, model_dir: Path, directory: Path) -> int:
    """export.adapter: the LoRA adapters alone in PEFT's format, read back with PEFT's own loader
    and compared tensor by tensor; returns how many tensors were written. Refused when the stage
    also trained other parameters fully: an adapter file does not carry them."""
    config = load_lora_config(model_dir)
    if config is None:
        raise StageFailed(f"export.adapter: {model_dir} records no LoRA adapters ({ADAPTER_CONFIG}): the stage "
                          f"trained without lora")
    index = read_index(checkpoint / TRAINING_STATE)
    fully = sorted(name for name, entry in index["parameters"].items() if entry["trainable"] and not is_adapter(name))
    if fully:
        raise StageFailed(f"export.adapter: besides its LoRA adapters the stage trained {len(fully)} parameters fully "
                          f"({', '.join(fully[:3])}, ...), which an adapter file cannot carry: applied to the start "
                          f"model it would leave them untrained. Export the merged model only (export.adapter: "
                          f"false), or train the adapters alone (every trainable part false)")
    written = save_adapter(config, state, directory)
    from peft.utils import load_peft_weights

    read = load_peft_weights(str(directory), device="cpu")
    if set(read) != set(written) or any(not torch.equal(read[name], written[name]) for name in written):
        raise StageFailed(f"export.adapter: PEFT reads back other tensors from {directory}")
    return len(written)


def run(context: StageContext) -> dict:
    recipe, settings = context.recipe, context.recipe.export
    source = recipe.stage_dir(recipe.export_source)
    checkpoint = latest_checkpoint(checkpoints_dir(source))
    if checkpoint is None or not (source / MODEL_DIR / "config.json").is_file():
        raise StageFailed(f"nothing to export in {source}: no complete checkpoint or no {MODEL_DIR}/config.json")
    trainer_state = json.loads((checkpoint / TRAINER_STATE).read_text())
    final, temporary = context.directory, temporary_directory(context.directory, "an export")
    dtype = PRECISIONS[settings.dtype]
    logger.info("export: consolidating %s (step %d) into %s weights", checkpoint, trainer_state["step"], settings.dtype)
    try:
        state = consolidated_state_dict(checkpoint)
        model = model_from_state_dict(state, source / MODEL_DIR, dtype)  # LoRA adapters merged
    except (ValueError, FileNotFoundError) as error:
        raise StageFailed(f"cannot export: {checkpoint}: {error}") from None
    adapter = write_adapter(state, checkpoint, source / MODEL_DIR, temporary / ADAPTER_DIR) if settings.adapter else None
    del state
    probe = probe_inputs(model.config)
    expected = probe_logits(model, probe)

    from transformers import GenerationConfig

    tokenizer, clip_tokenizer = load_directory_tokenizers(source / MODEL_DIR)
    processor_config = source / MODEL_DIR / PROCESSOR_CONFIG
    processor = json.loads(processor_config.read_text()) if processor_config.is_file() else {}
    template = processor.get("template", "vicuna_v1")
    if template in ROLE_TEMPLATES:  # the template training used wins
        tokenizer.chat_template = role_chat_template(template, tokenizer.convert_ids_to_tokens(model.config.image_token_index))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, do_sample=False, num_beams=1,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        max_new_tokens=MAX_NEW_TOKENS)
    remote_files = []
    if settings.trust_remote_code:
        model.config.auto_map = dict(AUTO_MAP)
        remote_files = write_remote_code(temporary)
    model.save_pretrained(temporary, max_shard_size=settings.max_shard_size)
    del model
    save_tokenizers(tokenizer, clip_tokenizer, temporary)
    if processor_config.is_file():
        shutil.copyfile(processor_config, temporary / PROCESSOR_CONFIG)
    (temporary / "README.md").write_text(model_card(recipe, checkpoint, trainer_state, settings.dtype,
                                                    settings.trust_remote_code))

    loaded_by = verify(temporary, expected, probe, dtype, settings.trust_remote_code)
    write_checksums(temporary)
    if final.exists() and any(final.iterdir()):  # files of something else: kept, never deleted
        logger.warning("%s held files of an unfinished export; kept in %s", final, set_aside(final, "incomplete"))
    publish_directory(temporary, final)
    shards = sorted(p.name for p in final.glob("*.safetensors"))
    logger.info("export: %s verified (%s) and written to %s", settings.dtype, ", ".join(loaded_by), final)
    if adapter is not None:
        logger.info("export: the LoRA adapters alone (%d tensors, PEFT's format) in %s", adapter, final / ADAPTER_DIR)
    return {"directory": str(final), "from": str(checkpoint), "dtype": settings.dtype, "shards": len(shards),
            "verified": f"logits equal after {len(loaded_by)} reloads", "remote code": len(remote_files) > 0}
