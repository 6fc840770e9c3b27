"""Chat templates: exact token layout and exactly which positions are labelled."""

import pytest

from conftest import tiny_tokenizer
from pipeline.data.records import Turn
from pipeline.data.templates import IGNORE_INDEX, VICUNA_SYSTEM, clip_text, encode

pytestmark = pytest.mark.unit

IMAGE = 4  # "<image>" in the tiny tokenizer
TURNS = [Turn("user", "<image>\nWhat colour is the circle?"), Turn("assistant", "Red."),
         Turn("user", "Where does it go?"), Turn("assistant", "Left.")]


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_vicuna_layout_and_label_positions():
    tokenizer = tiny_tokenizer()
    encoded = encode(TURNS, tokenizer, IMAGE)
    first_prompt = ids(tokenizer, f"{VICUNA_SYSTEM} USER: ") + [IMAGE] + ids(tokenizer, "\nWhat colour is the circle? ASSISTANT:")
    first_answer = ids(tokenizer, " Red.") + [tokenizer.eos_token_id]
    second_prompt = ids(tokenizer, "USER: Where does it go? ASSISTANT:")
    second_answer = ids(tokenizer, " Left.") + [tokenizer.eos_token_id]
    assert encoded.input_ids == [tokenizer.bos_token_id] + first_prompt + first_answer + second_prompt + second_answer
    masked = [IGNORE_INDEX] * (1 + len(first_prompt))
    assert encoded.labels == masked + first_answer + [IGNORE_INDEX] * len(second_prompt) + second_answer
    assert encoded.input_ids.count(IMAGE) == 1


def test_vicuna_prompt_for_generation_ends_with_assistant():
    tokenizer = tiny_tokenizer()
    encoded = encode(TURNS[:1], tokenizer, IMAGE)
    assert tokenizer.decode(encoded.input_ids).endswith("What colour is the circle? ASSISTANT:")
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


def test_clip_text_is_question_and_answer_in_training_question_only_otherwise():
    assert clip_text(TURNS, training=True) == "What colour is the circle? Red. Where does it go? Left."
    assert clip_text(TURNS, training=False) == "What colour is the circle? Where does it go?"
