"""Golden tests of the authors' formats (farewellthree/PPLLaVA, read for these tests): the exact
text, token ids, labels and CLIP text of reference samples as SFT, DPO and eval prepare them.

    SFT       plain_v1, a VideoChat2 instruction as the system text, CLIP reads the conversation
    DPO       Vicuna v1 with its system prompt, <video> dropped from LLaVA-Hound's prompt, CLIP
              reads the prompt
    MVBench   "Question: ...\\nOptions:\\n(A) ...\\nOnly give the best option. ASSISTANT: Best option:("
"""

import json

import pytest
import torch

from clip_vocabulary import END_OF_TEXT, START_OF_TEXT, write_clip_tokenizer
from conftest import tiny_config_for, tiny_tokenizer
from pipeline.data.collate import ProcessorSettings, SampleProcessor
from pipeline.data.pairs import PairProcessor
from pipeline.benchmarks.question_files import Item, multiple_choice_prompt
from pipeline.data.records import PreferencePair
from pipeline.data.sources import read_videochat2, strict
from pipeline.data.templates import IGNORE_INDEX, VICUNA_SYSTEM, encode_prefixed_answer
from pipeline.model.inference import Question

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from transformers import AutoTokenizer

    tokenizer = tiny_tokenizer()
    clip = AutoTokenizer.from_pretrained(write_clip_tokenizer(tmp_path_factory.mktemp("clip")))
    config = tiny_config_for(tokenizer)
    config.clip_text_config.vocab_size = len(clip)  # CLIP's real tokenizer beside the tiny LLM's
    return tokenizer, clip, config


def visible(tokenizer, ids: list[int]) -> str:
    """The text of ids with each run of image tokens shown once, as <image>."""
    image, out = tokenizer.convert_tokens_to_ids("<image>"), []
    for token in ids:
        if not (token == image and out and out[-1] == image):
            out.append(token)
    return tokenizer.decode(out)


def answers_of(ids, labels) -> list[list[int]]:
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_videochat2_sft_sample(tokenizers, tmp_path):
    tokenizer, clip, config = tokenizers
    path = tmp_path / "vc2.json"
    path.write_text(json.dumps([{"video": "v.mp4", "QA": [
        {"i": "Watch the video carefully.", "q": "What is the man doing?", "a": "He opens the door."},
        {"i": "Watch the video carefully.", "q": "And then?", "a": "He leaves."}]}]))
    sample = next(strict(read_videochat2(path, "vc2")))
    processor = SampleProcessor(config, tokenizer, clip, ProcessorSettings(max_length=512))
    processed = processor.encode(sample, torch.zeros(8, 3, 48, 48), (0, 0))
    text = ("Watch the video carefully. USER: <image>\nWhat is the man doing? ASSISTANT: He opens the door.</s>"
            "USER: And then? ASSISTANT: He leaves.</s>")
    assert visible(tokenizer, processed.input_ids) == "<s>" + text
    assert processed.input_ids.count(config.image_token_index) == 16
    eos = tokenizer.eos_token_id
    assert answers_of(processed.input_ids, processed.labels) == [
        tokenizer("He opens the door.", add_special_tokens=False)["input_ids"] + [eos],
        tokenizer("He leaves.", add_special_tokens=False)["input_ids"] + [eos]]
    # CLIP reads the whole formatted conversation (lower-cased by its tokenizer), between its own ends.
    assert processed.clip_input_ids == [START_OF_TEXT] + clip(text, add_special_tokens=False)["input_ids"] + [END_OF_TEXT]
    assert clip.decode(processed.clip_input_ids[1:8]) == "watch the video carefully . user :"


def test_llava_hound_dpo_pair(tokenizers):
    tokenizer, clip, config = tokenizers
    processor = PairProcessor(SampleProcessor(config, tokenizer, clip,
                                              ProcessorSettings(template="vicuna_v1", max_length=512, training=False)))
    pair = PreferencePair("h/0", "v.mp4", "<video>\nWhat happens in the video?", "A dog runs.", "A cat sleeps.")
    chosen = processor.samples.encode(processor.conversation(pair, pair.chosen), torch.zeros(8, 3, 48, 48), (0, 0))
    rejected = processor.samples.encode(processor.conversation(pair, pair.rejected), torch.zeros(8, 3, 48, 48), (0, 0))
    prompt = f"<s>{VICUNA_SYSTEM} USER: <image>\nWhat happens in the video? ASSISTANT:"
    assert visible(tokenizer, chosen.input_ids) == f"{prompt} A dog runs.</s>"
    assert visible(tokenizer, rejected.input_ids) == f"{prompt} A cat sleeps.</s>"
    assert answers_of(chosen.input_ids, chosen.labels) == [
        tokenizer(" A dog runs.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    question = clip("What happens in the video?", add_special_tokens=False)["input_ids"]
    assert chosen.clip_input_ids == rejected.clip_input_ids == [START_OF_TEXT] + question + [END_OF_TEXT]


def test_mvbench_question(tokenizers):
    tokenizer, _, config = tokenizers
    item = Item(0, {}, Question("What did the person do first?", "video", ()), ["Opened the door.", "Sat down."], 0)
    question, answers = multiple_choice_prompt(item)
    assert answers == ["A) Opened the door.", "B) Sat down."]
    assert question.guide == "Question: What did the person do first?\nOptions:\n(A) Opened the door.\n(B) Sat down."
    image = config.image_token_index
    prompt = encode_prefixed_answer([question.user_turn()], question.answer_prefix, None, tokenizer, image)
    assert tokenizer.decode(prompt.input_ids) == (
        "<s>USER: <image>\nQuestion: What did the person do first?\nOptions:\n(A) Opened the door.\n(B) Sat down.\n"
        "Only give the best option. ASSISTANT: Best option:(")
    scored = encode_prefixed_answer([question.user_turn()], question.answer_prefix, answers[1], tokenizer, image)
    assert scored.input_ids[: len(prompt.input_ids)] == prompt.input_ids
    assert answers_of(scored.input_ids, scored.labels) == [
        tokenizer("B) Sat down.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    assert multiple_choice_prompt(item, "plain") == (item.question, item.options)
