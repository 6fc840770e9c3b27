"""Chat templates: exact token layout and exactly which positions are labelled."""

import pytest

from conftest import tiny_tokenizer
from pipeline.data.records import Turn
from pipeline.data.templates import IGNORE_INDEX, VICUNA_SYSTEM, clip_text, encode, render

pytestmark = pytest.mark.unit

IMAGE = 4  # "<image>" in the tiny tokenizer
TURNS = [Turn("user", "<image>\nWhat colour is the circle?"), Turn("assistant", "Red."),
         Turn("user", "Where does it go?"), Turn("assistant", "Left.")]


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# Golden strings, written from the authors' conversation/conv.py (plain_v1: system "", roles
# "USER: " / "ASSISTANT: ", separators " " and "</s>") and LLaVA's Vicuna v1 (their DPO's).
SINGLE = [Turn("user", "<image>\nWhat is this?"), Turn("assistant", "A cat.")]
GOLDEN = [
    (SINGLE, "plain_v1", None, "USER: <image>\nWhat is this? ASSISTANT: A cat.</s>"),
    (SINGLE[:1] + SINGLE[1:] + [Turn("user", "And color?"), Turn("assistant", "Black.")], "plain_v1", None,
     "USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: And color? ASSISTANT: Black.</s>"),
    (SINGLE + [Turn("user", "And color?"), Turn("assistant", "Black.")], "plain_v1", "Watch the video.",
     "Watch the video. USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: And color? ASSISTANT: Black.</s>"),
    ([Turn("user", "What is <image> this?"), Turn("assistant", "A cat.")], "plain_v1", None,
     "USER: What is <image>\n this? ASSISTANT: A cat.</s>"),
    ([Turn("user", "<image>A <image>B"), Turn("assistant", "C")], "plain_v1", None,
     "USER: <image>\nA <image>\nB ASSISTANT: C</s>"),
    (SINGLE[:1], "plain_v1", None, "USER: <image>\nWhat is this? ASSISTANT: "),
    (SINGLE, "vicuna_v1", None, f"{VICUNA_SYSTEM} USER: <image>\nWhat is this? ASSISTANT: A cat.</s>"),
    (SINGLE[:1], "vicuna_v1", None, f"{VICUNA_SYSTEM} USER: <image>\nWhat is this? ASSISTANT:"),
]


@pytest.mark.parametrize("turns, template, system, expected", GOLDEN)
def test_rendered_conversations_match_the_authors_strings(turns, template, system, expected):
    assert render(turns, template, system) == expected


def test_plain_v1_tokens_and_labels_split_after_the_assistant_space():
    """The authors' SFT: "<s>" + the text cut after each "ASSISTANT: ", each piece tokenized alone;
    every answer and its </s> labelled, everything else (BOS, system, questions, roles) masked."""
    tokenizer = tiny_tokenizer()
    encoded = encode(TURNS, tokenizer, IMAGE, "plain_v1", system="Watch.")
    first_prompt = ids(tokenizer, "Watch. USER: ") + [IMAGE] + ids(tokenizer, "\nWhat colour is the circle? ASSISTANT: ")
    first_answer = ids(tokenizer, "Red.") + [tokenizer.eos_token_id]
    second_prompt = ids(tokenizer, "USER: Where does it go? ASSISTANT: ")
    second_answer = ids(tokenizer, "Left.") + [tokenizer.eos_token_id]
    assert encoded.input_ids == [tokenizer.bos_token_id] + first_prompt + first_answer + second_prompt + second_answer
    assert encoded.labels == ([IGNORE_INDEX] * (1 + len(first_prompt)) + first_answer
                              + [IGNORE_INDEX] * len(second_prompt) + second_answer)
    decoded = tokenizer.decode(encoded.input_ids)
    assert decoded == "<s>Watch. USER: <image>\nWhat colour is the circle? ASSISTANT: Red.</s>USER: Where does it go? ASSISTANT: Left.</s>"


def test_vicuna_v1_gives_the_space_to_the_answer_as_llava_counts_it():
    tokenizer = tiny_tokenizer()
    encoded = encode(TURNS[:2], tokenizer, IMAGE, "vicuna_v1")
    prompt = ids(tokenizer, f"{VICUNA_SYSTEM} USER: ") + [IMAGE] + ids(tokenizer, "\nWhat colour is the circle? ASSISTANT:")
    answer = ids(tokenizer, " Red.") + [tokenizer.eos_token_id]
    assert encoded.input_ids == [tokenizer.bos_token_id] + prompt + answer
    assert encoded.labels == [IGNORE_INDEX] * (1 + len(prompt)) + answer


@pytest.mark.parametrize("template, end", [("plain_v1", "ASSISTANT: "), ("vicuna_v1", "ASSISTANT:")])
def test_the_generation_prompt_ends_where_training_put_the_answer(template, end):
    tokenizer = tiny_tokenizer()
    encoded = encode(TURNS[:1], tokenizer, IMAGE, template)
    assert tokenizer.decode(encoded.input_ids).endswith(f"What colour is the circle? {end}")
    assert set(encoded.labels) == {IGNORE_INDEX}


def test_tokenizer_chat_template_labels_replies_and_their_end_token():
    tokenizer = tiny_tokenizer(chat_template=True)
    encoded = encode(TURNS, tokenizer, IMAGE, template="tokenizer")
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    labelled = [token for token in encoded.labels if token != IGNORE_INDEX]
    assert labelled == ids(tokenizer, "Red.") + [end] + ids(tokenizer, "Left.") + [end]
    first = encoded.labels.index(labelled[0])
    assert encoded.input_ids[first - 1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert encoded.input_ids.count(IMAGE) == 1 and encoded.labels[encoded.input_ids.index(IMAGE)] == IGNORE_INDEX
    # Exact layout and mask: <|user|>q<|end|><|assistant|>a<|end|>..., only each "a<|end|>" labelled.
    user, assistant = tokenizer.convert_tokens_to_ids("<|user|>"), tokenizer.convert_tokens_to_ids("<|assistant|>")
    first_prompt = [user, IMAGE] + ids(tokenizer, "\nWhat colour is the circle?") + [end, assistant]
    first_answer = ids(tokenizer, "Red.") + [end]
    second_prompt = [user] + ids(tokenizer, "Where does it go?") + [end, assistant]
    second_answer = ids(tokenizer, "Left.") + [end]
    assert encoded.input_ids == first_prompt + first_answer + second_prompt + second_answer
    assert encoded.labels == ([IGNORE_INDEX] * len(first_prompt) + first_answer
                              + [IGNORE_INDEX] * len(second_prompt) + second_answer)


def test_bad_conversations_and_templates_are_reported():
    tokenizer = tiny_tokenizer()
    with pytest.raises(ValueError, match="alternate user/assistant"):
        encode([Turn("assistant", "hi")], tokenizer, IMAGE)
    with pytest.raises(ValueError, match="has no chat_template"):
        encode(TURNS, tokenizer, IMAGE, template="tokenizer")
    with pytest.raises(ValueError, match="unknown chat template 'chatml'"):
        encode(TURNS, tokenizer, IMAGE, template="chatml")


def test_clip_text_is_the_conversation_in_training_and_the_questions_otherwise():
    assert clip_text(TURNS, training=True, system="Watch.") == (
        "Watch. USER: <image>\nWhat colour is the circle? ASSISTANT: Red.</s>USER: Where does it go? ASSISTANT: Left.</s>")
    assert clip_text(TURNS, training=True, style="turns") == "What colour is the circle? Red. Where does it go? Left."
    assert clip_text(TURNS, training=False) == "What colour is the circle? Where does it go?"
