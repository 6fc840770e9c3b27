"""Conversations -> token ids and labels, with only the assistant replies labelled.

Two templates:

    vicuna_v1   the paper's default (LLaVA-NeXT-Vicuna-7B):
                "{system} USER: {question} ASSISTANT: {answer}</s>USER: ..."
    tokenizer   the tokenizer's own chat template (Mistral, Qwen2, Llama-3 chat models)

``<image>`` in a user turn becomes one ``image_token_index`` (the processor later expands it to
the pooled visual token count). Labels are -100 everywhere except the tokens of each assistant
reply and the end-of-turn token that closes it, which the model must learn to emit.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.data.records import IMAGE_PLACEHOLDER, Turn
from ppllava.config import IGNORE_INDEX

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
TEMPLATES = ("vicuna_v1", "tokenizer")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


def _tokens(tokenizer, text: str, image_token_index: int) -> list[int]:
    """Token ids of ``text`` with each ``<image>`` mapped to ``image_token_index``."""
    ids: list[int] = []
    for position, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if position:
            ids.append(image_token_index)
        if piece:
            ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
    return ids


def _check_turns(turns: list[Turn]) -> None:
    roles = [turn.role for turn in turns]
    if not roles or roles[0] != "user" or any(a == b for a, b in zip(roles, roles[1:])):
        raise ValueError(f"a conversation must alternate user/assistant turns starting with user, got {roles}")


def encode_vicuna(turns: list[Turn], tokenizer, image_token_index: int) -> Encoded:
    """Vicuna v1. Each piece is tokenised on its own, so label boundaries are exact by
    construction (the same per-round scheme as LLaVA's own preprocessing). A conversation
    ending with a user turn ends with "ASSISTANT:", the prompt for generation."""
    _check_turns(turns)
    ids, labels = [tokenizer.bos_token_id], [IGNORE_INDEX]
    for index, turn in enumerate(turns):
        if turn.role == "user":
            prefix = f"{VICUNA_SYSTEM} USER: " if index == 0 else "USER: "
            piece = _tokens(tokenizer, f"{prefix}{turn.content} ASSISTANT:", image_token_index)
            ids += piece
            labels += [IGNORE_INDEX] * len(piece)
        else:
            piece = _tokens(tokenizer, f" {turn.content}", image_token_index) + [tokenizer.eos_token_id]
            ids += piece
            labels += piece
    return Encoded(ids, labels)


def encode_with_tokenizer_template(turns: list[Turn], tokenizer, image_token_index: int,
                                   add_generation_prompt: bool = False) -> Encoded:
    """The tokenizer's chat template. The conversation is rendered once; each assistant reply's
    character span comes from rendering the conversation up to it, and tokens are labelled by
    their character offsets. The template must render prefixes as prefixes (all common ones do)."""
    _check_turns(turns)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("template 'tokenizer' was chosen but this tokenizer has no chat_template; use 'vicuna_v1'")
    image_token = tokenizer.convert_ids_to_tokens(image_token_index)
    messages = [{"role": t.role, "content": t.content.replace(IMAGE_PLACEHOLDER, image_token)} for t in turns]

    def render(count: int, prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages[:count], tokenize=False, add_generation_prompt=prompt)

    text = render(len(messages), add_generation_prompt)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = len(render(index, True)), len(render(index + 1, False))
        if not text.startswith(render(index + 1, False)):
            raise ValueError("the tokenizer's chat template does not render a conversation prefix as a prefix")
        spans.append((start, end))
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoding["input_ids"]
    labels = [
        token if any(start <= begin and finish <= end and finish > begin for start, end in spans) else IGNORE_INDEX
        for token, (begin, finish) in zip(ids, encoding["offset_mapping"])
    ]
    return Encoded(ids, labels)


def encode(turns: list[Turn], tokenizer, image_token_index: int, template: str = "vicuna_v1",
           add_generation_prompt: bool = False) -> Encoded:
    if template == "vicuna_v1":
        return encode_vicuna(turns, tokenizer, image_token_index)
    if template == "tokenizer":
        return encode_with_tokenizer_template(turns, tokenizer, image_token_index, add_generation_prompt)
    raise ValueError(f"unknown chat template {template!r}; expected one of {TEMPLATES}")


def clip_text(turns: list[Turn], training: bool) -> str:
    """The text that guides pooling: questions and answers in SFT (paper §4.1), questions only
    at inference and in DPO. Placeholders are dropped; the CLIP tokenizer truncates to 248."""
    parts = [t.content for t in turns if training or t.role == "user"]
    return " ".join(" ".join(p.replace(IMAGE_PLACEHOLDER, " ").split()) for p in parts)
