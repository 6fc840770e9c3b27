"""Prompts at the level the model sees them: token ids with Llama-2's real SentencePiece vocabulary
(tests/llama_vocabulary.py), legacy mode as Vicuna v1.5 loads it.

The authors' benchmark scripts tokenize each prompt as one string; the ids here must be the same,
answer prefix included (tokenized apart, "ASSISTANT: " | "Best option:(" gives ":" "▁" "▁Best").
SFT's plain_v1 tokenizes the text before and after "ASSISTANT: " apart, as the authors' SFT does,
and an eval prompt without a prefix is the SFT sample's prompt, id for id."""

import pytest

from llama_vocabulary import IMAGE_TOKEN_INDEX, KNOWN_IDS, llama2_tokenizer, reference_pairs
from pipeline.benchmarks.prompts import mvbench_prompt, prompt_string, qa_prompt, vcg_prompt, videomme_prompt
from pipeline.data.records import IMAGE_PLACEHOLDER, Turn
from pipeline.data.templates import IGNORE_INDEX, encode, encode_prefixed_answer

pytestmark = pytest.mark.unit

LONE_SPACE, COLON = 29871, 29901


@pytest.fixture(scope="module")
def tokenizer():
    return llama2_tokenizer()


def test_the_vocabulary_is_llama2s(tokenizer):
    assert tokenizer.convert_tokens_to_ids(list(KNOWN_IDS)) == list(KNOWN_IDS.values())
    assert len(tokenizer) == 32001 and (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    pairs = reference_pairs()
    assert len(pairs) > 40
    mismatched = [(text, ids) for text, ids in pairs if tokenizer(text, add_special_tokens=False).input_ids != ids]
    assert mismatched == []


def authors_ids(tokenizer, prompt) -> list[int]:
    """The whole prompt string tokenized at once, BOS first: what the authors' scripts feed the LLM."""
    return [tokenizer.bos_token_id] + tokenizer(prompt_string(prompt), add_special_tokens=False).input_ids


def our_ids(tokenizer, prompt) -> list[int]:
    turns = [Turn("user", f"{IMAGE_PLACEHOLDER}\n{prompt.text}")]
    return encode_prefixed_answer(turns, prompt.answer_prefix, None, tokenizer, IMAGE_TOKEN_INDEX).input_ids


OPTIONS = ["The man opens the door.", "The man sits down.", "Not sure"]
PROMPTS = {
    "mvbench": mvbench_prompt("What did the man do first?", OPTIONS),
    "mvbench_system": mvbench_prompt("What did the man do first?", OPTIONS, system=True),
    "videomme": videomme_prompt("Which fruit appears most?", ["A. apples", "B. pears", "C. plums", "D. figs"]),
    "videomme_subtitles": videomme_prompt("Which fruit?", ["A. apples", "B. pears"], "Here they are. Look."),
    "qa": qa_prompt("what is a woman doing?"),
    "vcg": vcg_prompt("Describe the video in detail."),
}
# The last ids of each prompt: "ASSISTANT:" then the answer prefix, each word with its own "▁"
ASSISTANT = [319, 1799, 9047, 13566, COLON]
TAILS = {
    "mvbench": ASSISTANT + [6407, 2984, 5919],                       # ▁Best ▁option :(
    "videomme": ASSISTANT + [450, 1900, 1234, 338, COLON],            # ▁The ▁best ▁answer ▁is :
    "qa": ASSISTANT + [673, COLON, 512, 278, 4863, 29892],           # ▁Answer : ▁In ▁the ▁video ,
    "vcg": ASSISTANT + [LONE_SPACE],                                  # no prefix: the prompt's space
}


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_every_benchmark_prompt_is_the_authors_token_for_token(tokenizer, name):
    prompt = PROMPTS[name]
    ids = our_ids(tokenizer, prompt)
    assert ids == authors_ids(tokenizer, prompt)
    assert ids[:6] == [1, 3148, 1001, COLON, LONE_SPACE, IMAGE_TOKEN_INDEX]   # <s> ▁US ER : ▁ <image>
    tail = TAILS[name.split("_")[0]]
    assert ids[-len(tail):] == tail
    if prompt.answer_prefix:  # the prefix's first word follows "ASSISTANT:" directly: no lone "▁" between
        assert ids[ids.index(COLON, len(ids) - len(tail)) + 1] != LONE_SPACE


def test_the_prefix_tokenized_apart_would_insert_a_lone_space(tokenizer):
    """The difference this file guards: what the prompt was before (the prefix tokenized alone)."""
    apart = tokenizer("ASSISTANT: ", add_special_tokens=False).input_ids + \
        tokenizer("Best option:(", add_special_tokens=False).input_ids
    together = tokenizer("ASSISTANT: Best option:(", add_special_tokens=False).input_ids
    assert apart == [*ASSISTANT, LONE_SPACE, 6407, 2984, 5919] and together == [*ASSISTANT, 6407, 2984, 5919]


def test_an_answer_scored_after_the_prefix_keeps_its_own_tokens(tokenizer):
    prompt = PROMPTS["mvbench"]
    turns = [Turn("user", f"{IMAGE_PLACEHOLDER}\n{prompt.text}")]
    scored = encode_prefixed_answer(turns, prompt.answer_prefix, "B) The man sits down.", tokenizer, IMAGE_TOKEN_INDEX)
    asked = our_ids(tokenizer, prompt)
    assert scored.input_ids[:len(asked)] == asked
    answer = tokenizer("B) The man sits down.", add_special_tokens=False).input_ids + [2]
    assert scored.input_ids[len(asked):] == answer and scored.labels[len(asked):] == answer
    assert set(scored.labels[:len(asked)]) == {IGNORE_INDEX}


def test_sft_plain_v1_ids_and_the_eval_prompt_agree(tokenizer):
    """SFT: the text up to "ASSISTANT: " and the answer tokenized apart (the authors' SFT), so the
    answer starts with its own "▁"; the eval prompt of the same question, without a prefix, is
    the SFT sample's prompt id for id."""
    question = f"{IMAGE_PLACEHOLDER}\nWhat colour is the circle?"
    sample = encode([Turn("user", question), Turn("assistant", "Red.")], tokenizer, IMAGE_TOKEN_INDEX)
    assert sample.input_ids == [1, 3148, 1001, COLON, LONE_SPACE, IMAGE_TOKEN_INDEX, LONE_SPACE, 13, 5618, 12384,
                                338, 278, 8607, 29973, *ASSISTANT, LONE_SPACE, 4367, 29889, 2]
    answer = [4367, 29889, 2]                                     # ▁Red . </s>
    assert sample.labels == [IGNORE_INDEX] * (len(sample.input_ids) - 3) + answer
    asked = encode_prefixed_answer([Turn("user", question)], "", None, tokenizer, IMAGE_TOKEN_INDEX).input_ids
    assert sample.input_ids[:len(asked)] == asked and len(asked) == len(sample.input_ids) - 3
