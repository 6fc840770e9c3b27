"""The benchmarks' prompts string for string against the authors' (golden strings written out from
their test scripts' templates), and answers read from real-looking generations
(pipeline/benchmarks/prompts.py)."""

import pytest

from pipeline.benchmarks.prompts import (after_prefix, lenient_mvbench_letter, mvbench_check_ans, mvbench_prompt,
                                         prompt_string, qa_prompt, repaired_videomme_letter, vcg_prompt,
                                         videomme_letter, videomme_prompt, videomme_subtitles)
from pipeline.benchmarks.question_files import Item, multiple_choice_prompt
from pipeline.model.inference import Question

OPTIONS = ["The man is running.", "The man is sitting.", "The man is jumping.", "The man is swimming."]


def test_mvbench_as_the_authors_release_runs_it():
    prompt = mvbench_prompt("What is the man doing?", OPTIONS)
    assert prompt_string(prompt) == (
        "USER: <image>\nQuestion: What is the man doing?\nOptions:\n(A) The man is running.\n(B) The man is sitting.\n"
        "(C) The man is jumping.\n(D) The man is swimming.\nOnly give the best option. ASSISTANT: Best option:(")
    assert prompt.guide == ("Question: What is the man doing?\nOptions:\n(A) The man is running.\n(B) The man is "
                            "sitting.\n(C) The man is jumping.\n(D) The man is swimming.")
    with_system = prompt_string(mvbench_prompt("What is the man doing?", OPTIONS[:2], system=True))
    assert with_system == (
        "USER: <image>\nCarefully watch the video and pay attention to the cause and sequence of events, the detail "
        "and movement of objects, and the action and pose of persons. Based on your observations, select the best "
        "option that accurately addresses the question.\nQuestion: What is the man doing?\nOptions:\n(A) The man is "
        "running.\n(B) The man is sitting.\nOnly give the best option. ASSISTANT: Best option:(")


def test_the_likelihood_eval_asks_the_same_mvbench_question():
    item = Item(0, {}, Question("What is the man doing?", "video"), OPTIONS, 1)
    question, answers = multiple_choice_prompt(item, "mvbench")
    assert (question.text, question.answer_prefix, question.guide) == tuple(vars(mvbench_prompt(
        "What is the man doing?", OPTIONS)).values())
    assert answers[1] == "B) The man is sitting."


def test_videomme_with_and_without_subtitles():
    options = ["A. Apples.", "B. Candles.", "C. Berries.", "D. The three kinds are of the same number."]
    plain = videomme_prompt("Which fruit appears most?", options)
    assert prompt_string(plain) == (
        "USER: <image>\nSelect the best answer to the following multiple-choice question based on the video and the "
        "subtitles. Respond with only the letter (A, B, C, or D) of the correct option.\nWhich fruit appears most?\n"
        "['A. Apples.' 'B. Candles.' 'C. Berries.'\n 'D. The three kinds are of the same number.'] "
        "ASSISTANT: The best answer is:")
    assert plain.guide == ("Which fruit appears most?\n['A. Apples.' 'B. Candles.' 'C. Berries.'\n "
                           "'D. The three kinds are of the same number.']")
    subtitled = videomme_prompt("Whose hat?", ["A. man's hat", "B. a hat"], subtitles="Hello there. Look!")
    assert prompt_string(subtitled) == (
        "USER: <image>\nThis video's subtitles are listed below: Hello there. Look! \nSelect the best answer to the "
        "following multiple-choice question based on the video and the subtitles. Respond with only the letter (A, B, "
        "C, or D) of the correct option.\nWhose hat?\n[\"A. man's hat\" 'B. a hat'] ASSISTANT: The best answer is:")
    assert "subtitles are listed" not in subtitled.guide


def test_open_ended_qa_and_vcg():
    assert prompt_string(qa_prompt("what is a woman doing?")) == (
        "USER: <image>\nThe input consists of a sequence of key frames from a video. Answer the question concisely "
        "first and followed by significant events, characters, or objects that appear throughout the frames. "
        "Question: what is a woman doing? ASSISTANT: Answer: In the video,")
    assert qa_prompt("what is a woman doing?").guide == "what is a woman doing?"
    assert prompt_string(vcg_prompt("Describe the video in detail.")) == \
        "USER: <image>\nDescribe the video in detail. ASSISTANT: "


@pytest.mark.parametrize("generated, letter", [
    ("B) The man is sitting.", "B"), ("B", "B"), ("C.", "C"), ("(D) swimming", "D"), (" A) x", "A"),
    ("Answer: C", "C"), ("The best option is D.", "D"), ("option (B)", "B"),
    ("", None), ("I am not sure.", None), ("E) out of range", None), ("Because the man", None),
])
def test_lenient_mvbench_letters_from_generations(generated, letter):
    assert lenient_mvbench_letter(generated, 4) == letter


@pytest.mark.parametrize("generated, answer, right", [
    # the authors' check_ans on "(" + the generation: its first word must hold "(x)" or be in it
    ("b", "B", True), ("B) The man is sitting.", "B", True), ("B", "C", False), ("(C)", "C", True),
    ("b.", "B", True), ("B\nThe best answer is: C", "C", False), ("B\nThe best answer is: C", "B", False),
    ("Answer: C", "C", False), ("The best answer is D", "D", False), ("Best option: (C)", "C", False),
    ("The correct option is A.", "A", False),
    ("", "A", True), ("", "D", True),          # their "(" is in every "(x)": an empty answer counts right
    (" D) swimming", "D", True), ("D) x Best option:(A", "D", True),  # stripped; cut at a repeated prefix
])
def test_mvbench_answers_read_by_the_authors_check(generated, answer, right):
    assert mvbench_check_ans(generated, answer, "the man is sitting.") is right


@pytest.mark.parametrize("generated, letter", [
    ("B", "B"), (" C. Berries.", "C"), ("The best answer is: A", "A"), ("Answer: D", "D"),
    ("(B) Candles", "B"), ("There are many kinds of fruit shown in this video and none is more common", None),
    ("", None),
])
def test_videomme_letters_from_generations(generated, letter):
    assert videomme_letter(generated) == letter == repaired_videomme_letter(generated)


@pytest.mark.parametrize("generated, authors, repaired", [
    # their prefix list lost two commas: "Best option:" and "The best option is" are never stripped
    ("Best option: (C)", "B", "C"), ("Best option: C", "B", "C"), ("Best answer: D", "B", "D"),
    ("The correct option is A", "A", "A"), ("Option: D", "D", "D"),
])
def test_videomme_extraction_is_the_authors_regex_as_written(generated, authors, repaired):
    assert videomme_letter(generated) == authors and repaired_videomme_letter(generated) == repaired


def test_videomme_subtitles_at_the_sampled_frames():
    srt = ('1\n00:00:00,000 --> 00:00:02,000\n<font color="white" size=".72c">First line.</font>\n\n'
           '2\n00:00:02,000 --> 00:00:04,000\n<font color="white" size=".72c">Second line.</font>\n\n'
           '3\n00:00:04,000 --> 00:00:06,000\nno font tag here\n\n'
           '4\n00:00:06,000 --> 00:00:08,000\n<font color="white" size=".72c">Fourth line.</font>\n')
    # 10 fps: frames 5 (block 1), 45 (block 3: no tag), 70 (block 4); block 2 (frames 20-39) unsampled
    assert videomme_subtitles(srt, [70, 5, 45], fps=10) == "First line. Fourth line."
    assert videomme_subtitles(srt, [95], fps=10) == ""


def test_videomme_subtitles_come_in_the_authors_set_order():
    """Their block numbers pass through list(set(...)): blocks 1 and 8 come 8 first (CPython puts 8
    in the first slot of a small set), as their prompt has them."""
    words = ["Zero.", "One.", "Two.", "Three.", "Four.", "Five.", "Six.", "Seven.", "Eight."]
    srt = "\n\n".join(f'{i + 1}\n00:00:0{i},000 --> 00:00:0{i + 1},000\n<font color="white" size=".72c">{word}</font>'
                       for i, word in enumerate(words))
    assert videomme_subtitles(srt, [15, 85], fps=10) == "Eight. One."
    assert videomme_subtitles(srt, [15, 35], fps=10) == "One. Three."


def test_mvbench_counting_tasks_may_write_numbers(tmp_path):
    """A task file whose candidates and answer are numbers reads as their text; a broken record
    names its file and index."""
    import json

    from pipeline.benchmarks.readers import MVBENCH_TASKS, read_mvbench
    from pipeline.data.records import RecordError

    for _, filename, *_ in MVBENCH_TASKS:
        (tmp_path / "json").mkdir(exist_ok=True)
        (tmp_path / "json" / filename).write_text(json.dumps([{"video": "v.mp4", "question": "How many?",
                                                                "candidates": [2, 3, 4], "answer": 3}]))
    items = read_mvbench(tmp_path)
    assert len(items) == 20 and items[0].options == ["2", "3", "4"] and items[0].answer == "B"
    assert items[0].missing  # no video there: kept, to be counted as failed
    (tmp_path / "json" / "action_count.json").write_text(json.dumps([{"video": "v.mp4", "question": "How many?",
                                                                       "candidates": ["2"], "answer": "2"}]))
    with pytest.raises(RecordError, match=r"action_count.json, record 0: 'candidates' must be a list of 2"):
        read_mvbench(tmp_path)


def test_an_answer_is_cut_where_the_generation_repeats_its_prefix():
    """The authors decode the whole sequence and keep what lies between the prompt's prefix and its
    next occurrence: a generation that says the prefix again is cut there."""
    assert after_prefix(" I think The best answer is: D", "The best answer is:") == "I think"
    assert videomme_letter(after_prefix("I think The best answer is: D", "The best answer is:")) is None
    assert after_prefix(" a dog. Answer: In the video, a cat", "Answer: In the video,") == "a dog."
    assert after_prefix("  the man runs  ") == "the man runs"
