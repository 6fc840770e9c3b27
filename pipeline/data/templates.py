"""Conversations -> token ids and labels, with only the assistant replies labelled.

Three templates:

    plain_v1    the authors' SFT and eval format (their conversation/conv.py): no system prompt
                (a sample's own system text, e.g. a VideoChat2 instruction, goes first), and
                "{system} USER: {question} ASSISTANT: {answer}</s>USER: ..."
    vicuna_v1   LLaVA's Vicuna v1, which the authors' DPO (LLaVA-Hound's) uses: the same layout
                with Vicuna's system prompt by default
    tokenizer   the tokenizer's own chat template (Mistral, Qwen2, Llama-3 chat models)

In the first user turn every ``<image>`` is followed by a newline (the authors' rule: added where
the text has none), and each becomes one ``image_token_index`` (the processor later expands it to
the pooled visual token count). Labels are -100 everywhere except the tokens of each assistant
reply and the end-of-turn token that closes it, which the model must learn to emit.

The two role templates render the same string and differ in where the space after "ASSISTANT:"
is tokenized: plain_v1 keeps it with the prompt ("ASSISTANT: " | "Red."), as the authors' SFT
splits the text after "ASSISTANT: " and tokenizes each piece alone, and their inference prompt
ends with that space; vicuna_v1 gives it to the answer ("ASSISTANT:" | " Red."), as LLaVA's
preprocessing counts it. Each piece is tokenized on its own, so label boundaries are exact.

An assistant answer prefix (eval's "Best option:(") is tokenized with the prompt it ends, as one
string, as the authors' benchmark scripts tokenize the whole prompt: with a Llama / Vicuna
SentencePiece vocabulary "ASSISTANT: " and "Best option:(" tokenized apart give ":" "▁" "▁Best",
together ":" "▁Best" (tests/unit/test_prompt_token_ids.py checks the ids with Llama-2's vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.data.records import IMAGE_PLACEHOLDER, Turn
from ppllava.config import IGNORE_INDEX

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
USER, ASSISTANT, END_OF_TURN = "USER: ", "ASSISTANT:", "</s>"


@dataclass(frozen=True)
class RoleTemplate:
    system: str             # the default system prompt ("" = none)
    space_with_answer: bool  # the space after "ASSISTANT:" is tokenized with the answer (LLaVA) or the prompt


ROLE_TEMPLATES = {"plain_v1": RoleTemplate("", False), "vicuna_v1": RoleTemplate(VICUNA_SYSTEM, True)}
TEMPLATES = (*ROLE_TEMPLATES, "tokenizer")


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


def with_image_newlines(text: str) -> str:
    """The authors' first-turn rule: each ``<image>`` followed by a newline, unless one already is."""
    if f"{IMAGE_PLACEHOLDER}\n" in text:
        return text
    return text.replace(IMAGE_PLACEHOLDER, f"{IMAGE_PLACEHOLDER}\n")


def role_pieces(turns: list[Turn], template: str, system: str | None = None) -> list[tuple[str, bool]]:
    """(text, is_answer) pieces of a role template's rendering, in order; an answer piece is
    followed by the end-of-turn token. A conversation ending with a user turn ends with the
    generation prompt ("ASSISTANT:" and, for plain_v1, its space)."""
    _check_turns(turns)
    spec = ROLE_TEMPLATES[template]
    system = spec.system if system is None else system
    prompt_end = f" {ASSISTANT}" if spec.space_with_answer else f" {ASSISTANT} "
    pieces: list[tuple[str, bool]] = []
    for index, turn in enumerate(turns):
        if turn.role == "user":
            content = with_image_newlines(turn.content) if index == 0 else turn.content
            prefix = f"{system} " if index == 0 and system else ""
            pieces.append((f"{prefix}{USER}{content}{prompt_end}", False))
        else:
            pieces.append((f" {turn.content}" if spec.space_with_answer else turn.content, True))
    return pieces


def render(turns: list[Turn], template: str = "plain_v1", system: str | None = None) -> str:
    """The exact text of a conversation in a role template (without the BOS token)."""
    return "".join(text + (END_OF_TURN if answer else "") for text, answer in role_pieces(turns, template, system))


def encode_roles(turns: list[Turn], tokenizer, image_token_index: int, template: str = "plain_v1",
                 system: str | None = None, answer_prefix: str = "") -> Encoded:
    """plain_v1 / vicuna_v1: BOS, then each piece tokenized on its own; answers and their </s>
    labelled. ``answer_prefix``: a conversation ending with a user turn ends with the assistant's
    prefix, in the same piece as the generation prompt before it (vicuna_v1: after its space)."""
    ids, labels = [tokenizer.bos_token_id], [IGNORE_INDEX]
    pieces = role_pieces(turns, template, system)
    if answer_prefix:
        text, answer = pieces[-1]
        if answer:
            raise ValueError("an answer prefix follows a generation prompt: the conversation must end with a user turn")
        space = " " if ROLE_TEMPLATES[template].space_with_answer else ""
        pieces[-1] = (text + space + answer_prefix, False)
    for text, answer in pieces:
        piece = _tokens(tokenizer, text, image_token_index)
        if answer:
            piece += [tokenizer.eos_token_id]
        ids += piece
        labels += piece if answer else [IGNORE_INDEX] * len(piece)
    return Encoded(ids, labels)


def encode_with_tokenizer_template(turns: list[Turn], tokenizer, image_token_index: int,
                                   add_generation_prompt: bool = False, system: str | None = None) -> Encoded:
    """The tokenizer's chat template. The conversation is rendered once; each assistant reply's
    character span comes from rendering the conversation up to it, and tokens are labelled by
    their character offsets. The template must render prefixes as prefixes (all common ones do)."""
    _check_turns(turns)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("template 'tokenizer' was chosen but this tokenizer has no chat_template; use 'plain_v1'")
    image_token = tokenizer.convert_ids_to_tokens(image_token_index)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": t.role, "content": t.content.replace(IMAGE_PLACEHOLDER, image_token)} for t in turns]

    def rendered(count: int, prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages[:count], tokenize=False, add_generation_prompt=prompt)

    text = rendered(len(messages), add_generation_prompt)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = len(rendered(index, True)), len(rendered(index + 1, False))
        if not text.startswith(rendered(index + 1, False)):
            raise ValueError("the tokenizer's chat template does not render a conversation prefix as a prefix")
        spans.append((start, end))
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoding["input_ids"]
    labels = [
        token if any(start <= begin and finish <= end and finish > begin for start, end in spans) else IGNORE_INDEX
        for token, (begin, finish) in zip(ids, encoding["offset_mapping"])
    ]
    return Encoded(ids, labels)


def encode(turns: list[Turn], tokenizer, image_token_index: int, template: str = "plain_v1",
           add_generation_prompt: bool = False, system: str | None = None) -> Encoded:
    """``system``: the sample's own system text (None: the template's default)."""
    if template in ROLE_TEMPLATES:
        return encode_roles(turns, tokenizer, image_token_index, template, system)
    if template == "tokenizer":
        return encode_with_tokenizer_template(turns, tokenizer, image_token_index, add_generation_prompt, system)
    raise ValueError(f"unknown chat template {template!r}; expected one of {TEMPLATES}")


def encode_prefixed_answer(turns: list[Turn], prefix: str, answer: str | None, tokenizer, image_token_index: int,
                           template: str = "plain_v1", system: str | None = None) -> Encoded:
    """A conversation ending with a user turn: its generation prompt, the assistant's ``prefix``
    (not labelled; the eval's "Best option:("), then ``answer`` and the end token (labelled). With
    ``answer`` None the prompt for generation ends with the prefix. In the role templates the
    prefix is tokenized with the prompt's last piece, as one string (the authors' way, see the
    module docstring); the tokenizer's own template tokenizes it apart. The answer is tokenized
    apart, so its tokens are the same whatever precedes them."""
    space = " " if template in ROLE_TEMPLATES and ROLE_TEMPLATES[template].space_with_answer else ""
    if template in ROLE_TEMPLATES:
        prompt = encode_roles(turns, tokenizer, image_token_index, template, system, answer_prefix=prefix)
        ids, labels = prompt.input_ids, prompt.labels
    else:
        prompt = encode(turns, tokenizer, image_token_index, template, add_generation_prompt=True, system=system)
        head = _tokens(tokenizer, prefix, image_token_index) if prefix else []
        ids, labels = prompt.input_ids + head, prompt.labels + [IGNORE_INDEX] * len(head)
    if answer is not None:
        tail = _tokens(tokenizer, ("" if prefix else space) + answer, image_token_index) + [tokenizer.eos_token_id]
        ids, labels = ids + tail, labels + tail
    return Encoded(ids, labels)


CLIP_TEXTS = ("conversation", "turns", "questions")


def clip_text(turns: list[Turn], training: bool, style: str = "conversation", template: str = "plain_v1",
              system: str | None = None, tokenizer=None) -> str:
    """The text that guides pooling; the CLIP tokenizer cuts it to 248 tokens.

    Training, ``conversation`` (the authors'): the whole formatted conversation, roles,
    placeholders, answers and end tokens included, as the LLM reads it. Training, ``turns``: the
    questions and answers alone, joined by spaces (no roles or placeholders, which spend CLIP's
    context on text that says nothing about the picture). Training, ``questions``: the questions
    alone, as at inference (the answer cannot guide the pooling it is read from). Inference and
    DPO: the questions only.
    """
    if training and style == "conversation":
        if template in ROLE_TEMPLATES:
            return render(turns, template, system)
        chat = ([{"role": "system", "content": system}] if system else []) + [
            {"role": t.role, "content": t.content} for t in turns]
        return tokenizer.apply_chat_template(chat, tokenize=False)
    if training and style not in CLIP_TEXTS:
        raise ValueError(f"unknown CLIP text {style!r}; expected one of {CLIP_TEXTS}")
    parts = [t.content for t in turns if (training and style == "turns") or t.role == "user"]
    return " ".join(" ".join(p.replace(IMAGE_PLACEHOLDER, " ").split()) for p in parts)
