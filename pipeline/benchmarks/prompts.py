"""The paper's benchmarks asked and scored the authors' way: prompts, answer prefixes, what guides
the pooling, and how an answer is read from the generated text.

The authors answer every benchmark by generation with fixed prompts (their ``test/`` scripts;
read from farewellthree/PPLLaVA, nothing copied). In their Vicuna format a question renders as

    USER: <image>\\n{text} ASSISTANT: {answer_prefix}

which is ``templates.render`` of one user turn in ``plain_v1`` followed by the prefix
(``prompt_string``), so the same ``Question`` objects drive our inference:

    mvbench     text "Question: {q}\\nOptions:\\n(A) {o1}\\n(B) {o2}...\\nOnly give the best option.",
                prefix "Best option:(", CLIP reads the question and options. Their released
                script passes --system_llm, a store_false flag: no system text (``system=True``
                puts it back in front).
    videomme    text "{instruction}\\n{q}\\n{options}", with subtitles first when there are
                any ("This video's subtitles are listed below: {subs} \\n"); prefix
                "The best answer is:"; CLIP reads "{q}\\n{options}". {options} is numpy's text
                of the options array (their parquet rows hold numpy arrays and they format
                them with str()), reproduced here by numpy itself.
    qa          MSVD-QA, MSRVTT-QA, ActivityNet-QA: "{instruction} Question: {q}", prefix
                "Answer: In the video,"; CLIP reads the question. The prediction is what follows
                the prefix, for GPT-assisted scoring.
    vcg         Video-ChatGPT's benchmark: the question alone, no prefix; CLIP reads it.

Reading answers, the authors' way first (the headline figures) and a second reading each, named
apart (docs/eval.md, "Differences from the authors"):

    mvbench     ``mvbench_check_ans``: their ``check_ans`` on "(" + the generation: its first
                space-separated word, lower-cased, "." removed, and the right option's "(x)"
                must hold one another. "b" and "B) The man" count as B; "Answer: C" and "The
                correct option is A." as no letter; an empty generation as right (their "(" is in
                every "(x)"; how many there were is counted). ``lenient_mvbench_letter``: the
                letter a generation opens with or names ("Answer: C", "The best option is D").
    videomme    ``videomme_letter``: their ``extract_characters_regex`` exactly, its answer
                phrases as written, where two missing commas glue four of them into two that
                never match (so "Best option: (C)" reads as B, the B of "Best"); accuracy over
                the answered questions. ``repaired_videomme_letter``: the phrases as meant;
                accuracy over every question.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.data.records import IMAGE_PLACEHOLDER, Turn
from pipeline.data.templates import render

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

MVBENCH_SYSTEM = ("Carefully watch the video and pay attention to the cause and sequence of events, the detail and "
                  "movement of objects, and the action and pose of persons. Based on your observations, select the "
                  "best option that accurately addresses the question.\n")
MVBENCH_INSTRUCTION = "Only give the best option."
MVBENCH_ANSWER_PREFIX = "Best option:("

VIDEOMME_INSTRUCTION = ("Select the best answer to the following multiple-choice question based on the video and the "
                        "subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")
VIDEOMME_SUBTITLES = "This video's subtitles are listed below: "
VIDEOMME_ANSWER_PREFIX = "The best answer is:"

QA_INSTRUCTION = ("The input consists of a sequence of key frames from a video. Answer the question concisely first "
                  "and followed by significant events, characters, or objects that appear throughout the frames. "
                  "Question:")
QA_ANSWER_PREFIX = "Answer: In the video,"


@dataclass(frozen=True)
class Prompt:
    text: str                 # the user turn after the visual placeholder
    answer_prefix: str = ""   # the assistant's answer opens with it (generation continues it)
    guide: str = ""           # the text CLIP reads to weigh the visual tokens (prompt-guided pooling)


def prompt_string(prompt: Prompt) -> str:
    """The whole prompt as the authors' Vicuna format writes it (without the BOS token)."""
    return render([Turn("user", f"{IMAGE_PLACEHOLDER}\n{prompt.text}")], "plain_v1") + prompt.answer_prefix


def lettered(options: list[str]) -> str:
    return "\n".join(f"({LETTERS[index]}) {option}" for index, option in enumerate(options))


def mvbench_prompt(question: str, options: list[str], system: bool = False) -> Prompt:
    guide = f"Question: {question}\nOptions:\n{lettered(options)}".rstrip()
    text = f"{MVBENCH_SYSTEM if system else ''}{guide}\n{MVBENCH_INSTRUCTION}"
    return Prompt(text, MVBENCH_ANSWER_PREFIX, guide)


def numpy_options(options: list[str]) -> str:
    """The options as the authors' VideoMME prompt writes them: numpy's str() of the array."""
    import numpy

    return str(numpy.array(options, dtype=object))


def videomme_prompt(question: str, options: list[str], subtitles: str = "") -> Prompt:
    """``options`` as VideoMME gives them ("A. ...", "B. ..."); ``subtitles`` the lines of the
    sampled frames (``videomme_subtitles``), empty for none."""
    guide = f"{question}\n{numpy_options(options)}"
    head = f"{VIDEOMME_SUBTITLES}{subtitles} \n" if subtitles else ""
    return Prompt(f"{head}{VIDEOMME_INSTRUCTION}\n{guide}", VIDEOMME_ANSWER_PREFIX, guide)


def qa_prompt(question: str) -> Prompt:
    return Prompt(f"{QA_INSTRUCTION} {question}", QA_ANSWER_PREFIX, question)


def vcg_prompt(question: str) -> Prompt:
    return Prompt(question, "", question)


# -- reading answers ----------------------------------------------------------------------------

def mvbench_check_ans(generated: str, answer: str, option: str) -> bool:
    """The authors' MVBench reading: their prediction is "(" + the generation after "Best option:("
    (stripped; a generation that repeats the prefix is cut there, as their split does), the truth
    "(X) option". The first space-separated word of each, lower-cased, the prediction's "." removed:
    right when either holds the other."""
    predicted = ("(" + after_prefix(generated, MVBENCH_ANSWER_PREFIX)).lower().split(" ")[0].replace(".", "")
    truth = f"({answer}) {option}".lower().split(" ")[0]
    return predicted in truth or truth in predicted


def lenient_mvbench_letter(generated: str, options: int) -> str | None:
    """The option letter a generation after "Best option:(" gives: its first character when that
    is a letter of an option followed by ")", ".", ":", a space or the end ("B) The man", "B."),
    else a letter named as the answer ("Answer: C", "option (D)"); None when there is none."""
    allowed = LETTERS[:options]
    text = generated.strip()
    opening = re.match(rf"\(?([{allowed}])(?:[).:,\s]|$)", text)
    if opening:
        return opening.group(1)
    named = re.search(rf"(?:answer|option)(?: is)?\s*[:\-]?\s*\(?([{allowed}])(?:[).:,\s]|$)", text, re.IGNORECASE)
    return named.group(1) if named else None


# The phrases the authors' VideoMME scorer strips before looking for a letter, as their list is
# written: two missing commas glue four phrases into two ("The best option isThe correct option
# is", "Best answer:Best option:") that never match.
AUTHORS_VIDEOMME_PHRASES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                            "The best option is" "The correct option is", "Best answer:" "Best option:", "Answer:",
                            "Option:", "The correct answer", "The correct option")
# The same list with the commas put back: the phrases it meant.
REPAIRED_VIDEOMME_PHRASES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                             "The best option is", "The correct option is", "Best answer:", "Best option:", "Answer:",
                             "Option:", "The correct answer", "The correct option")


def _first_letter_after(generated: str, phrases: tuple[str, ...]) -> str | None:
    """Strip the answer phrases; a long answer (over 10 words) without any of A-D gives nothing;
    else the first of A-D in the text, or None."""
    text = generated.strip()
    for phrase in phrases:
        text = text.replace(phrase, "")
    if len(text.split()) > 10 and not re.search("[ABCD]", text):
        return None
    found = re.search("[ABCD]", text)
    return found.group(0) if found else None


def videomme_letter(generated: str) -> str | None:
    """The authors' VideoMME reading (``extract_characters_regex``), None where theirs gives ""."""
    return _first_letter_after(generated, AUTHORS_VIDEOMME_PHRASES)


def repaired_videomme_letter(generated: str) -> str | None:
    """The authors' rule with their phrase list as it was meant (the commas put back)."""
    return _first_letter_after(generated, REPAIRED_VIDEOMME_PHRASES)


def after_prefix(generated: str, prefix: str = "") -> str:
    """An answer as the authors read it: they decode the whole sequence and take what follows the
    answer prefix up to its next occurrence (``split(prefix)[1]``), stripped; the generation
    continues the prefix, so that is the generation cut where it repeats the prefix."""
    return (generated.split(prefix)[0] if prefix else generated).strip()


# -- VideoMME subtitles -------------------------------------------------------------------------

_SRT_TIME = re.compile(r"(\d+):(\d+):(\d+)[,.](\d+)")
_WHITE_FONT = re.compile(r'<font color="white" size=".72c">(.*?)</font>')


def _seconds(stamp: str) -> float:
    hours, minutes, seconds, millis = (int(part) for part in _SRT_TIME.match(stamp.strip()).groups())
    return hours * 3600 + minutes * 60 + seconds + millis / 1000


def _srt_blocks(srt: str) -> dict[tuple[float, float], str]:
    """The authors' SRT reading: blocks split at blank lines, each with at least three lines, keyed
    by (start, end) seconds (a repeated time range keeps its first place and its last text)."""
    blocks: dict[tuple[float, float], str] = {}
    for section in srt.split("\n\n"):
        lines = section.split("\n")
        if section.strip() and len(lines) >= 3 and " --> " in lines[1]:
            start, end = (_seconds(stamp) for stamp in lines[1].split(" --> "))
            blocks[(start, end)] = " ".join(lines[2:])
    return blocks


def videomme_subtitles(srt: str, frame_indices: list[int], fps: float) -> str:
    """The subtitle lines shown at the sampled frames, as the authors join them: every block whose
    [start, end) frame range holds a sampled frame (frames in the order given, blocks in file
    order), the block numbers deduplicated through a Python set (their ``list(set(...))``: an
    order CPython fixes for the same numbers, not always time order: blocks 1 and 8 come 8
    first), each block's text inside VideoMME's ``<font color="white" size=".72c">`` tag (blocks
    without it skipped), joined by spaces."""
    blocks = [(int(start * fps), int(end * fps), text) for (start, end), text in _srt_blocks(srt).items()]
    shown = [number for frame in frame_indices for number, (start, end, _) in enumerate(blocks) if start <= frame < end]
    texts = []
    for number in list(set(shown)):  # noqa: C403 - the authors' order, reproduced on purpose
        found = _WHITE_FONT.findall(blocks[number][2])
        if found:
            texts.append(found[0])
    return " ".join(texts)
