"""A benchmark question asked of a model and its answer read and scored; the results laid out like
the paper's tables; the answer files in the input format of the GPT-assisted scoring the
open-ended benchmarks use (the eval stage runs the loop: stages/eval.py).

    multiple choice (mvbench, videomme)   accuracy per group (MVBench task, VideoMME duration),
                                          the authors' way (prompts.py): MVBench's check_ans over
                                          every question, its figure the mean over the tasks (the
                                          paper's); VideoMME's extraction over the questions it
                                          reads a letter from. Beside each, the second reading
                                          (lenient MVBench letters; VideoMME's repaired phrases,
                                          over every question). A failed question (video missing
                                          or undecodable) counts wrong and is counted apart, with
                                          its reason
    open-ended QA                         answers for GPT scoring ({pred, answer, question, id},
                                          the authors' file), and two scorer-free figures: exact
                                          match and "contains" (the reference, normalised, is in
                                          the answer)
    vcg                                   general.json / temporal.json / consist.json as
                                          Video-ChatGPT's scoring scripts read them
"""

from __future__ import annotations

import contextlib
import re

from pipeline.benchmarks.prompts import (LETTERS, MVBENCH_ANSWER_PREFIX, QA_ANSWER_PREFIX, VIDEOMME_ANSWER_PREFIX,
                                         Prompt, after_prefix,
                                         lenient_mvbench_letter, mvbench_check_ans, mvbench_prompt, qa_prompt,
                                         repaired_videomme_letter, vcg_prompt, videomme_letter, videomme_prompt,
                                         videomme_subtitles)
from pipeline.benchmarks.readers import (QA_BENCHMARKS, BenchmarkQuestion, read_mvbench, read_qa, read_vcg,
                                         read_videomme)
from pipeline.data.media import frame_positions
from pipeline.model.inference import InferenceModel, Question

MULTIPLE_CHOICE = ("mvbench", "videomme")


def benchmark_questions(entry) -> list[BenchmarkQuestion]:
    """The questions of a recipe's ``eval.benchmarks`` entry (a BenchmarkSection)."""
    if entry.name == "mvbench":
        return read_mvbench(entry.root, entry.limit)
    if entry.name == "videomme":
        return read_videomme(entry.root, entry.limit, entry.subtitles)
    if entry.name in QA_BENCHMARKS:
        return read_qa(entry.name, entry.annotations, entry.videos, entry.answers, entry.limit)
    return read_vcg(entry.root, entry.videos, entry.limit)


@contextlib.contextmanager
def video_kernel(model: InferenceModel, kernel: list[int] | None):
    """The model pools videos with ``kernel`` (= stride) inside the block (None: as it is)."""
    config = model.config
    saved = (config.video_kernel, config.video_stride)
    if kernel is not None:
        config.video_kernel = config.video_stride = tuple(kernel)
    try:
        yield
    finally:
        config.video_kernel, config.video_stride = saved


def _subtitles(model: InferenceModel, item: BenchmarkQuestion, frames: int, scheme: str) -> str:
    """The subtitle lines shown at the frames the model sees of this video."""
    if item.subtitles is None:
        return ""
    data, decoder = item.media.read_bytes(), model.processor.video_decoder
    positions = frame_positions(data, frames, False, str(item.media), video_decoder=decoder,
                                scheme=scheme)
    return videomme_subtitles(item.subtitles.read_text(encoding="utf-8", errors="replace"), positions,
                              decoder.frame_rate(data, str(item.media)))


def prompt_of(model: InferenceModel, item: BenchmarkQuestion, entry, frames: int) -> Prompt:
    if item.benchmark == "mvbench":
        return mvbench_prompt(item.question, item.options, entry.system)
    if item.benchmark == "videomme":
        return videomme_prompt(item.question, item.options, _subtitles(model, item, frames, entry.frame_sampling))
    if item.benchmark in QA_BENCHMARKS:
        return qa_prompt(item.question)
    return vcg_prompt(item.question)


def frames_of(model: InferenceModel, item: BenchmarkQuestion, entry) -> int:
    """Frames sampled for a question: the entry's, else the benchmark's (VideoMME's by duration), else the model's."""
    return entry.num_frames or item.frames or model.num_frames


def question_of(model: InferenceModel, item: BenchmarkQuestion, entry) -> Question:
    """The question as the model is asked it (media, the authors' prompt, pooling text, frames)."""
    frames = frames_of(model, item, entry)
    return _question(item, prompt_of(model, item, entry, frames), frames, entry.frame_sampling)


def _question(item: BenchmarkQuestion, prompt: Prompt, frames: int, scheme: str) -> Question:
    return Question(prompt.text, "video", (item.media,), answer_prefix=prompt.answer_prefix, guide=prompt.guide,
                    bounds=item.bounds, frames=frames, folder_fps=item.folder_fps, frame_scheme=scheme)


def result_line(item: BenchmarkQuestion, frames: int) -> dict:
    return {"benchmark": item.benchmark, "group": item.group, "key": item.key, "question": item.question,
            "answer": item.answer, "frames": frames, **item.fields}


def failed(line: dict, reason: str) -> dict:
    """A question that could not be asked (its video missing or undecodable): wrong, and counted."""
    return {**line, "failed": reason, "prediction": None, "correct": False}


def prepared(model: InferenceModel, item: BenchmarkQuestion, entry) -> tuple[dict, list[Question]]:
    """A question's result line so far and the questions the model is asked for it (two for a VCG
    consistency pair: the same video, the question said two ways); none when its video is missing
    (the line is then ``failed``)."""
    frames = frames_of(model, item, entry)
    line = result_line(item, frames)
    if item.missing:
        return failed(line, f"video not found: {item.media}"), []
    prompt = prompt_of(model, item, entry, frames)
    asked = [_question(item, prompt, frames, entry.frame_sampling)]
    if item.second_question is not None:
        asked.append(_question(item, vcg_prompt(item.second_question), frames, entry.frame_sampling))
    return {**line, "prompt": prompt.text}, asked


def answered(item: BenchmarkQuestion, line: dict, generated: list[str]) -> dict:
    """The line with the generation(s) and the answer read from them (and, for multiple choice,
    whether it is right)."""
    line = {**line, "generated": generated[0]}
    if item.benchmark == "mvbench":
        option, response = item.options[LETTERS.index(item.answer)], after_prefix(generated[0], MVBENCH_ANSWER_PREFIX)
        lenient = lenient_mvbench_letter(generated[0], len(item.options))
        return {**line, "options": item.options, "prediction": "(" + response,  # the authors' prediction string
                "correct": mvbench_check_ans(generated[0], item.answer, option), "empty": not response,
                "lenient_letter": lenient, "lenient_correct": lenient == item.answer}
    if item.benchmark == "videomme":
        response = after_prefix(generated[0], VIDEOMME_ANSWER_PREFIX)
        letter, repaired = videomme_letter(response), repaired_videomme_letter(response)
        return {**line, "options": item.options, "prediction": letter, "correct": letter == item.answer,
                "repaired_letter": repaired, "repaired_correct": repaired == item.answer}
    if item.second_question is not None:
        return {**line, "question2": item.second_question, "prediction": after_prefix(generated[0]),
                "prediction2": after_prefix(generated[1])}
    prefix = QA_ANSWER_PREFIX if item.benchmark in QA_BENCHMARKS else ""
    return {**line, "prediction": after_prefix(generated[0], prefix)}


# -- results ------------------------------------------------------------------------------------

def _normalised(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


# Per benchmark, the counts each group keeps: the headline's (the authors' reading) and the second
# reading's. "no_letter": an answer the reading found no letter in (MVBench: the lenient reading;
# VideoMME: the authors', whose accuracy is over the questions "with_letter"); "empty": an MVBench
# generation with nothing in it, which the authors' check counts right.
COUNTS = {"mvbench": ("correct", "empty", "lenient_correct", "no_letter"),
          "videomme": ("correct", "with_letter", "repaired_correct", "no_letter"),
          **{name: ("exact_match", "contains") for name in QA_BENCHMARKS}, "vcg": ()}


def _line_counts(name: str, line: dict) -> dict[str, int]:
    if "failed" in line:
        return {}
    if name == "mvbench":
        return {"correct": line["correct"], "empty": line["empty"], "lenient_correct": line["lenient_correct"],
                "no_letter": line["lenient_letter"] is None}
    if name == "videomme":
        return {"correct": line["correct"], "with_letter": line["prediction"] is not None,
                "repaired_correct": line["repaired_correct"], "no_letter": line["prediction"] is None}
    if name in QA_BENCHMARKS:
        answer, prediction = _normalised(line["answer"]), _normalised(line["prediction"])
        return {"exact_match": prediction == answer, "contains": bool(answer) and f" {answer} " in f" {prediction} "}
    return {}


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def failure_reasons(lines: list[dict]) -> dict[str, int]:
    """Failed questions by reason, the reason's text up to its first colon ("video not found")."""
    reasons: dict[str, int] = {}
    for line in lines:
        if "failed" in line:
            reason = line["failed"].split(":")[0]
            reasons[reason] = reasons.get(reason, 0) + 1
    return reasons


def summarise(name: str, lines: list[dict]) -> dict:
    """Per group and overall: questions, answered (asked: not failed), failed, and the benchmark's
    figures: accuracy the authors' way and the second reading (multiple choice), the scorer-free
    figures (open-ended QA), or the counts alone (VCG). A benchmark whose every question failed
    summarises to zeros."""
    keys = ("questions", "asked", "failed", *COUNTS[name])
    groups: dict[str, dict] = {}
    for line in lines:
        group = groups.setdefault(line["group"], dict.fromkeys(keys, 0))
        group["questions"] += 1
        group["failed" if "failed" in line else "asked"] += 1
        for key, value in _line_counts(name, line).items():
            group[key] += int(value)
    overall = {key: sum(group[key] for group in groups.values()) for key in keys}
    for entry in (*groups.values(), overall):
        if name == "mvbench":
            entry["accuracy"] = _ratio(entry["correct"], entry["questions"])
            entry["lenient_accuracy"] = _ratio(entry["lenient_correct"], entry["questions"])
        elif name == "videomme":
            entry["accuracy"] = _ratio(entry["correct"], entry["with_letter"])  # the authors': over those read
            entry["accuracy_over_all"] = _ratio(entry["correct"], entry["questions"])
            entry["repaired_accuracy"] = _ratio(entry["repaired_correct"], entry["questions"])
        elif name in QA_BENCHMARKS:
            entry["exact_match_accuracy"] = _ratio(entry["exact_match"], entry["questions"])
            entry["contains_accuracy"] = _ratio(entry["contains"], entry["questions"])
    if name == "mvbench":
        overall["mean_group_accuracy"] = _ratio(sum(g["accuracy"] for g in groups.values()), len(groups))
        overall["lenient_mean_group_accuracy"] = _ratio(sum(g["lenient_accuracy"] for g in groups.values()),
                                                        len(groups))
    overall["failure_reasons"] = failure_reasons(lines)
    return {"groups": groups, "overall": overall}


def headline(summary: dict) -> float | None:
    """The figure the paper's table reports (the authors' way): MVBench's mean over tasks,
    VideoMME's accuracy; None for the open-ended benchmarks (GPT scores them)."""
    overall, name = summary["overall"], summary["benchmark"]
    return overall["mean_group_accuracy"] if name == "mvbench" else overall["accuracy"] if name == "videomme" else None


def gpt_scoring_files(name: str, lines: list[dict]) -> dict[str, list[dict]]:
    """What the GPT-assisted scoring reads, in its field names: the QA benchmarks' {pred, answer,
    question, id}; VCG's general (generic questions), temporal and consist files."""
    answered = [line for line in lines if "failed" not in line]
    if name in QA_BENCHMARKS:
        return {f"{name}.json": [{"pred": line["prediction"], "answer": line["answer"], "question": line["question"],
                                  "id": line["id"]} for line in answered]}
    if name != "vcg":
        return {}
    general = [{"pred": line["prediction"], "A": line["answer"], "Q": line["question"],
                "video_name": line["video_name"]} for line in answered if line["group"] == "generic"]
    temporal = [{"pred": line["prediction"], "A": line["answer"], "Q": line["question"],
                 "video_name": line["video_name"]} for line in answered if line["group"] == "temporal"]
    consist = [{"pred1": line["prediction"], "pred2": line["prediction2"], "video_name": line["video_name"],
                "A": line["answer"], "Q1": line["question"], "Q2": line["question2"]}
               for line in answered if line["group"] == "consistency"]
    return {"general.json": general, "temporal.json": temporal, "consist.json": consist}


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def benchmark_table(label: str, summary: dict) -> str:
    """The paper's layout: MVBench's tasks and their mean; VideoMME's durations and overall; the QA
    datasets' scorer-free figures; VCG's answer counts (its scores come from GPT). ``label``: the
    entry's (BenchmarkSection.label); ``summary`` carries the benchmark's name. The headline
    column is the authors' reading; the second reading stands beside it."""
    groups, overall, name = summary["groups"], summary["overall"], summary["benchmark"]
    if name in MULTIPLE_CHOICE:
        second, extra = ("lenient", "empty") if name == "mvbench" else ("repaired, of all", "no letter")
        rows = [f"| {label} | questions | answered | accuracy (authors') | {second} | {extra} | failed |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        figures = ("lenient_accuracy", "empty") if name == "mvbench" else ("repaired_accuracy", "no_letter")

        def row(group: str, entry: dict, value: float, other: float) -> str:
            return (f"| {group} | {entry['questions']} | {entry['asked']} | {_percent(value)} | {_percent(other)} | "
                    f"{entry[figures[1]]} | {entry['failed']} |")

        for group, entry in groups.items():
            rows.append(row(group, entry, entry["accuracy"], entry[figures[0]]))
        if name == "mvbench":
            rows.append(row("**mean of tasks**", overall, overall["mean_group_accuracy"],
                            overall["lenient_mean_group_accuracy"]))
            if summary.get("absent_tasks"):
                rows.append(f"\n{len(summary['absent_tasks'])} of the 20 tasks not asked (no annotation file): "
                            f"{', '.join(summary['absent_tasks'])}; the mean is over the {len(groups)} asked")
        else:
            rows.append(row("**overall**", overall, overall["accuracy"], overall["repaired_accuracy"]))
        return "\n".join(rows)
    if name in QA_BENCHMARKS:
        return "\n".join([f"| {name} | questions | answered | exact match | contains | failed | GPT scoring |",
                          "|---|---:|---:|---:|---:|---:|---|",
                          f"| answers | {overall['questions']} | {overall['asked']} | "
                          f"{_percent(overall['exact_match_accuracy'])} | {_percent(overall['contains_accuracy'])} | "
                          f"{overall['failed']} | gpt/{name}.json |"])
    rows = [f"| {name} task | questions | answered | failed | GPT scoring |", "|---|---:|---:|---:|---|"]
    files = {"generic": "general.json", "temporal": "temporal.json", "consistency": "consist.json"}
    for group, entry in groups.items():
        rows.append(f"| {group} | {entry['questions']} | {entry['asked']} | {entry['failed']} | gpt/{files[group]} |")
    return "\n".join(rows)
