"""The run directory's layout: every file and folder name stages hand off through, in one place.

    run_dir/
      recipe.yaml                     the resolved recipe of the latest `run`
      <stage>/                        one folder per stage: synth, shard, sft, dpo, export, eval
        COMPLETE                      written last by the runner: fingerprint, inputs, wall time, summary
      shard/manifest.json             shards, counts, source fingerprints, rejected samples
      sft/, dpo/                      training stages:
        checkpoints/step_N/           training_state/, rank_00000.pt ..., trainer_state.json, recipe.yaml,
                                      files.json (every file's size and sha256, checked on resume)
        checkpoints/latest            the name of the newest complete step_N
        metrics.jsonl, tensorboard/
        samples/rank_00000.jsonl ...  with record_samples: per optimizer step, the keys each rank trained on
        model/                        the model directory without weights: config.json, tokenizer,
                                      clip_tokenizer/, processor_config.json (export adds the weights)
      dpo/init/                       the consolidated SFT model DPO starts from
      dpo/reference_logps.json        the precomputed reference log-probs
      export/                         a HuggingFace model directory (+ SHA256SUMS, README.md; adapter/ with
                                      export.adapter: the LoRA adapters alone, PEFT's format)
      eval/                           results.json, results.md, per-task predictions

A model directory (export/, dpo/init/, sft/model/) holds the LLM tokenizer at its top,
CLIP's tokenizer in clip_tokenizer/ and the input settings in processor_config.json.
This module imports nothing, so the recipe checks can use it without torch.
"""

from __future__ import annotations

from pathlib import Path

RECIPE_FILE = "recipe.yaml"
COMPLETE = "COMPLETE"
MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_FILES = "files.json"      # size (and sha256) of every file of a step_N checkpoint
DEEPSPEED_TAG = "deepspeed"          # DeepSpeed's own layout, in checkpoints of earlier versions (export reads it)
TRAINING_STATE = "training_state"    # model, optimizer and schedule, loadable on any layout (backends.portable_state)

SAMPLES_DIR = "samples"

MODEL_DIR = "model"
CLIP_TOKENIZER_DIR = "clip_tokenizer"
PROCESSOR_CONFIG = "processor_config.json"
CHECKSUMS = "SHA256SUMS"

ADAPTER_DIR = "adapter"              # export/adapter/: the LoRA adapters alone (export.adapter)

DPO_INIT = "init"
REFERENCE_LOGPS = "reference_logps.json"


def checkpoints_dir(stage_dir: Path) -> Path:
    return stage_dir / CHECKPOINTS


def is_checkpoint(path: Path) -> bool:
    """A complete checkpoint: its trainer state is the last file written before the rename."""
    return (path / TRAINER_STATE).is_file()
