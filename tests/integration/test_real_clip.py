"""OpenAI's CLIP as users have it: its real BPE tokenizer (end token 49407) beside a text config
that still carries the legacy ids (bos 0, eos 2, pad 1) and 77 positions. A model converted from
a LLaVA-NeXT + CLIP pair like that trains (SFT, DPO), is exported, evaluated and chats."""

import json

import pytest
import yaml
from transformers import AutoTokenizer

from clip_vocabulary import END_OF_TEXT, START_OF_TEXT, VOCAB_SIZE, open_clip_tokenizer, write_clip_tokenizer
from conftest import REPO_ROOT, run_pipeline, tiny_tokenizer, write_recipe
from pipeline.metrics import read_metrics
from test_checkpoints import write_clip_checkpoint, write_llava_hf_checkpoint

pytestmark = pytest.mark.integration

LEGACY_CLIP_TEXT = {"vocab_size": VOCAB_SIZE, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 2,
                    "pad_token_id": 1}
TEXTS = ["A man walks to the door, opens it!", "USER: <image>\nWhat is happening?  ASSISTANT: The cat   jumps.",
         "naïve café — 東京 😀 don't", "Which way does the red circle move? (A) left (B) right"]


def test_the_tokenizer_built_from_the_wheel_matches_openclip_id_for_id(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "clip"))
    reference = open_clip_tokenizer()
    assert len(tokenizer) == len(reference.encoder) == VOCAB_SIZE
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (START_OF_TEXT, END_OF_TEXT)
    for text in TEXTS:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == reference.encode(text), text
    assert tokenizer("a photo")["input_ids"] == [START_OF_TEXT, 320, 1125, END_OF_TEXT]  # OpenAI's ids


def test_llava_next_with_legacy_clip_ids_trains_evaluates_and_chats(tmp_path):
    tokenizer = tiny_tokenizer()
    llava_dir, clip_dir = tmp_path / "llava", tmp_path / "clip"
    write_llava_hf_checkpoint(llava_dir, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                              vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    tokenizer.save_pretrained(llava_dir)
    write_clip_checkpoint(clip_dir, **LEGACY_CLIP_TEXT)
    write_clip_tokenizer(clip_dir)

    recipe = yaml.safe_load((REPO_ROOT / "recipes/demo_cpu.yaml").read_text())
    recipe.update(name="legacy_clip", run_dir=str(tmp_path / "run"))
    recipe["model"] = {"source": "llava_next", "llava_next_path": str(llava_dir), "clip_path": str(clip_dir),
                       "config_overrides": {"num_frames": 8}}
    recipe["synth"].update(videos=12, images=6, multi_images=4, eval_questions=4, dpo_pairs=8, clip_pretrain_steps=0)
    recipe["sft"].update(max_steps=3, save_every=100, log_every=1)
    recipe["dpo"].update(max_steps=2, epochs=2)
    recipe["eval"]["baseline"] = False
    result = run_pipeline("run", str(write_recipe(tmp_path / "recipe.yaml", recipe)), timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]

    run = tmp_path / "run"
    assert [m["step"] for m in read_metrics(run / "sft/metrics.jsonl")] == [1, 2, 3]
    assert [m["step"] for m in read_metrics(run / "dpo/metrics.jsonl")] == [1, 2]
    export = run / "export"
    config = json.loads((export / "config.json").read_text())["clip_text_config"]
    assert (config["eos_token_id"], config["vocab_size"], config["max_position_embeddings"]) == (2, VOCAB_SIZE, 248)
    clip_tokenizer = AutoTokenizer.from_pretrained(export / "clip_tokenizer")
    assert clip_tokenizer("a photo")["input_ids"] == [START_OF_TEXT, 320, 1125, END_OF_TEXT]
    results = json.loads((run / "eval/results.json").read_text())
    assert results["multiple_choice"]["eval_video"]["questions"] == 4

    video = run / "synth/media" / json.loads((run / "synth/eval_video.json").read_text())[0]["video"]
    chat = run_pipeline("chat", str(export), "--video", str(video), "--max-new-tokens", "4", "--backend", "cpu",
                        "Which way does the red circle move?", timeout=300)
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert chat.stdout.strip()
