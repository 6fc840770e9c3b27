"""Eval stage: multiple-choice accuracy and open-ended answers of a model directory.

    model      eval.model_path, else run_dir/export (the export stage's output)
    check      every record of every file first: a malformed one stops the stage before the model
               loads, naming the file, the record index and the reason
    for each multiple-choice file (one task, named by the file's stem):
        for each question: log-likelihood of every option as the answer (pipeline.model.inference),
                           prediction = the highest mean log-prob per answer token
    for each open-ended file:
        for each question: greedy answer (eval.max_new_tokens)
    write  run_dir/eval/results.json, results.md, <stem>.choices.jsonl (every multiple-choice
           prediction with its scores), <stem>.jsonl (open-ended: question, prediction, reference,
           for external GPT-based scoring); print the per-task table

Multiple-choice records (MVBench style): {"video" | "image": path, "question": str,
"options" | "candidates": [str, ...], "answer": a letter "A".. or the answer's text}; open-ended
records: {"video" | "image": path, "question": str, "answer": str (optional)}. Media paths are
relative to eval.media_root (default: the file's folder) and may not leave it.

Scoring by the mean rather than the sum: every answer token adds a negative log-prob, so the sum
prefers short options whatever they say (MVBench mixes "Not sure" with long phrases); the mean
compares options of different lengths on equal terms. Accuracy by the sum is recorded beside it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.atomic import sha256_of, write_text_atomically
from pipeline.data.cards import media_under_root
from pipeline.data.media import MediaError
from pipeline.data.records import RecordError
from pipeline.layout import CHECKSUMS
from pipeline.model.check import ModelFilesError, directory_fingerprint, verify_checksums
from pipeline.model.inference import InferenceError, InferenceModel, Question, load_model_dir
from pipeline.model.setup import build_model
from pipeline.recipe import Recipe, RecipeError
from pipeline.runner import StageContext, StoppedForRequeue

logger = logging.getLogger(__name__)

DISTRIBUTED = False  # rank 0 evaluates; the other ranks wait
TRAINING = False
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
KINDS = ("multiple_choice", "open_ended")


@dataclass
class Item:
    index: int                    # position in its file
    record: dict
    question: Question
    options: list[str]            # multiple choice only
    answer: int | str | None      # multiple choice: index of the right option; open-ended: reference or None


@dataclass
class Task:
    kind: str                     # multiple_choice | open_ended
    path: Path
    items: list[Item]

    @property
    def name(self) -> str:
        return self.path.stem


def model_directory(recipe: Recipe) -> Path:
    return Path(recipe.eval.model_path) if recipe.eval.model_path else recipe.stage_dir("export")


def inputs(recipe: Recipe, world_size: int) -> dict:
    """The eval section, the sha256 of every question file (changed questions re-run the stage)
    and the model directory's contents (a re-exported model re-runs it)."""
    files = {}
    for kind in KINDS:
        for index, name in enumerate(getattr(recipe.eval, kind)):
            path = Path(name)
            if not path.is_file():
                raise RecipeError(f"{recipe.source}: eval.{kind}[{index}]: {name} does not exist")
            files[name] = sha256_of(path)
    directory = model_directory(recipe)
    if not (directory / "config.json").is_file():
        raise RecipeError(f"{recipe.source}: eval: the model directory {directory} has no config.json (set "
                          f"eval.model_path, or run the export stage first)")
    return {"eval": asdict(recipe.eval), "files_sha256": files, "model_dir": str(directory),
            "model_files": directory_fingerprint(directory)}


# -- reading the question files ---------------------------------------------------------------------

def _text(record: dict, key: str, file: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise RecordError(file, where, f"'{key}' must be a non-empty string, got {value!r}")
    return value


def _media(record: dict, root: Path, file: str, where: str) -> Question:
    present = [key for key in ("video", "image") if key in record]
    if len(present) != 1:
        raise RecordError(file, where, "exactly one of 'video' or 'image' must be set")
    value = record[present[0]]
    names = value if present[0] == "image" and isinstance(value, list) else [value]
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise RecordError(file, where, f"'{present[0]}' must be a path{' or a list of paths' if present[0] == 'image' else ''}, "
                          f"got {value!r}")
    paths = []
    for name in names:
        try:
            path = media_under_root(root, name)
        except ValueError as error:
            raise RecordError(file, where, str(error)) from None
        if not path.is_file():
            raise RecordError(file, where, f"media file {name!r} not found under {root}")
        paths.append(path)
    question = _text(record, "question", file, where)
    return Question.from_media(question, videos=paths if present[0] == "video" else (),
                               images=paths if present[0] == "image" else ())


def _answer_index(record: dict, options: list[str], file: str, where: str) -> int:
    answer = _text(record, "answer", file, where).strip()
    by_text = [i for i, option in enumerate(options) if option.strip() == answer]
    by_letter = [LETTERS.index(answer)] if len(answer) == 1 and answer in LETTERS[: len(options)] else []
    found = sorted(set(by_text + by_letter))
    if len(found) > 1:
        raise RecordError(file, where, f"answer {answer!r} is ambiguous: option {LETTERS[by_letter[0]]} by letter, "
                          f"option {LETTERS[by_text[0]]} by text")
    if not found:
        raise RecordError(file, where, f"answer {answer!r} is neither a letter A-{LETTERS[len(options) - 1]} nor the "
                          f"text of an option {options}")
    return found[0]


def _item(record, index: int, kind: str, root: Path, file: str) -> Item:
    where = f"record {index}"
    if not isinstance(record, dict):
        raise RecordError(file, where, f"expected an object, got {type(record).__name__}")
    question = _media(record, root, file, where)
    if kind == "open_ended":
        reference = record.get("answer")
        if reference is not None and not isinstance(reference, str):
            raise RecordError(file, where, f"'answer' must be a string when given, got {reference!r}")
        return Item(index, record, question, [], reference)
    keys = [key for key in ("options", "candidates") if key in record]
    if len(keys) != 1:
        raise RecordError(file, where, "exactly one of 'options' or 'candidates' must be set")
    options = record[keys[0]]
    if (not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS)
            or not all(isinstance(o, str) and o.strip() for o in options)):
        raise RecordError(file, where, f"'{keys[0]}' must be a list of 2 to {len(LETTERS)} non-empty strings, got {options!r}")
    if len({o.strip() for o in options}) != len(options):
        raise RecordError(file, where, f"'{keys[0]}' has duplicate options {options}")
    return Item(index, record, question, [o.strip() for o in options], _answer_index(record, options, file, where))


def read_task(path: str | Path, kind: str, media_root: str | None = None, limit: int | None = None) -> Task:
    """A question file, every record checked (media present, answer resolvable); the first
    ``limit`` records when given. Raises RecordError naming the file, the record and the reason."""
    path = Path(path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise RecordError(str(path), f"line {error.lineno}", f"not valid JSON: {error.msg}") from None
    if not isinstance(records, list) or not records:
        raise RecordError(str(path), "top level", "expected a non-empty JSON list of question records")
    root = Path(media_root) if media_root else path.parent
    chosen = records[:limit] if limit else records
    return Task(kind, path, [_item(record, index, kind, root, str(path)) for index, record in enumerate(chosen)])


# -- the stage ------------------------------------------------------------------------------------------

def run(context: StageContext) -> dict:
    recipe, section, out = context.recipe, context.recipe.eval, context.directory
    tasks = []
    for kind in KINDS:
        for index, name in enumerate(getattr(section, kind)):
            try:
                tasks.append(read_task(name, kind, section.media_root, section.limit))
            except RecordError as error:
                raise RecipeError(f"{recipe.source}: eval.{kind}[{index}]: {error}") from None
    for kind in KINDS:
        stems = [task.name for task in tasks if task.kind == kind]
        if len(set(stems)) != len(stems):
            raise RecipeError(f"{recipe.source}: eval.{kind}: two files share a name ({', '.join(stems)}); tasks are "
                              f"named by file stem, so rename one")

    backend = context.backend
    if (model_directory(recipe) / CHECKSUMS).is_file():  # an export: a corrupted shard would load silently
        try:
            verify_checksums(model_directory(recipe))
        except ModelFilesError as error:
            raise RecipeError(f"{recipe.source}: eval: {error}") from None
    model = load_model_dir(model_directory(recipe), section.num_frames, section.video_kernel,
                           device=backend.device(context.dist.local_rank),
                           dtype=backend.resolve_dtype(backend.inference_precision, context.dist.local_rank),
                           attn_implementation=backend.attn_implementation, video_decoder=recipe.data.decoder)
    results = {"model": str(model.directory), "num_frames": model.num_frames,
               "video_kernel": list(model.config.video_kernel), "scoring": "mean log-prob per answer token",
               "multiple_choice": {}, "open_ended": {}}
    progress = tqdm(total=sum(len(task.items) for task in tasks), desc="eval", unit="question", dynamic_ncols=True)
    for task in tasks:
        lines, correct, correct_by_sum = _answer(model, task, context, progress)
        count = len(task.items)
        if task.kind == "open_ended":
            write_text_atomically(out / f"{task.name}.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
            results["open_ended"][task.name] = {"file": str(task.path), "questions": count, "answers": f"{task.name}.jsonl"}
        else:
            write_text_atomically(out / f"{task.name}.choices.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
            results["multiple_choice"][task.name] = {
                "file": str(task.path), "questions": count, "correct": correct, "accuracy": correct / count,
                "accuracy_by_sum": correct_by_sum / count, "predictions": f"{task.name}.choices.jsonl"}
    progress.close()

    choice = results["multiple_choice"]
    if section.baseline and choice:  # the same questions, asked of the model training started from
        untrained = _untrained(context, model)
        for task in (task for task in tasks if task.kind == "multiple_choice"):
            _, correct, _ = _answer(untrained, task, context, None)
            choice[task.name]["untrained_accuracy"] = correct / len(task.items)
    if choice:
        questions = sum(t["questions"] for t in choice.values())
        right = sum(t["correct"] for t in choice.values())
        results["overall"] = {"questions": questions, "correct": right, "accuracy": right / questions,
                              "mean_task_accuracy": sum(t["accuracy"] for t in choice.values()) / len(choice)}
        if section.baseline:
            results["overall"]["untrained_accuracy"] = sum(
                t["untrained_accuracy"] * t["questions"] for t in choice.values()) / questions
    table = results_table(results)
    write_text_atomically(out / "results.json", json.dumps(results, indent=1))
    write_text_atomically(out / "results.md", table + "\n")
    print(f"\neval of {model.directory} ({model.num_frames} frames, video kernel "
          f"{'x'.join(map(str, model.config.video_kernel))})\n{table}\n", flush=True)
    summary = {"results": str(out / "results.json")}
    if choice:
        summary.update(accuracy=round(results["overall"]["accuracy"], 4), questions=results["overall"]["questions"])
        if section.baseline:
            summary["untrained accuracy"] = round(results["overall"]["untrained_accuracy"], 4)
    if results["open_ended"]:
        summary["open-ended answers"] = sum(t["questions"] for t in results["open_ended"].values())
    return summary


def _answer(model: InferenceModel, task: Task, context: StageContext, progress) -> tuple[list[dict], int, int]:
    """Every question of a task: (result lines, correct by mean, correct by sum)."""
    recipe, section = context.recipe, context.recipe.eval
    lines, correct, correct_by_sum = [], 0, 0
    for item in task.items:
        if context.stop.received:
            raise StoppedForRequeue(f"{context.stop.received} received during eval; the stage starts over next run")
        media = {k: item.record[k] for k in ("video", "image") if k in item.record}
        try:
            if task.kind == "open_ended":
                prediction = model.generate(item.question, section.max_new_tokens)
            else:
                scores = model.answer_loglikelihoods(item.question, item.options)
        except (MediaError, InferenceError) as error:  # undecodable media, a prompt too long
            raise RecipeError(f"{recipe.source}: eval.{task.kind}: {task.path}, record {item.index}: {error}") from None
        if task.kind == "open_ended":
            lines.append({"index": item.index, **media, "question": item.question.text, "prediction": prediction,
                          "reference": item.answer})
        else:
            chosen = max(range(len(scores)), key=lambda i: scores[i].mean)
            by_sum = max(range(len(scores)), key=lambda i: scores[i].total)
            correct += chosen == item.answer
            correct_by_sum += by_sum == item.answer
            lines.append({"index": item.index, **media, "question": item.question.text, "options": item.options,
                          "answer": LETTERS[item.answer], "prediction": LETTERS[chosen],
                          "correct": chosen == item.answer, "logprob_mean": [s.mean for s in scores],
                          "logprob_sum": [s.total for s in scores]})
        if progress is not None:
            progress.set_postfix_str(task.name)
            progress.update(1)
    return lines, correct, correct_by_sum


def _untrained(context: StageContext, trained: InferenceModel) -> InferenceModel:
    """The model training started from, built as the recipe's `model` section builds it (weights
    initialised with the recipe's seed where they are not loaded), with the trained model's
    tokenizers, processor and frame / kernel settings."""
    recipe = context.recipe
    torch.manual_seed(recipe.seed)
    start = build_model(recipe, trained.tokenizer, context.backend.attn_implementation)
    start.config.num_frames = trained.config.num_frames
    start.config.video_kernel, start.config.video_stride = trained.config.video_kernel, trained.config.video_stride
    start = start.to(device=trained.device, dtype=next(trained.model.parameters()).dtype).eval()
    return InferenceModel(start, trained.tokenizer, trained.clip_tokenizer, trained.processor, Path("untrained"))


def results_table(results: dict) -> str:
    """The per-task table (markdown: printed, and saved as results.md); with a baseline, the
    untrained model's accuracy on the same questions stands beside the trained one's."""
    baseline = "untrained_accuracy" in results.get("overall", {})
    rows = ["| task | kind | questions | accuracy |" + (" untrained |" if baseline else ""),
            "|---|---|---:|---:|" + ("---:|" if baseline else "")]

    def row(name: str, kind: str, entry: dict) -> str:
        line = f"| {name} | {kind} | {entry['questions']} | {100 * entry['accuracy']:.1f} % |"
        return line + (f" {100 * entry['untrained_accuracy']:.1f} % |" if baseline else "")

    for name, task in results["multiple_choice"].items():
        rows.append(row(name, "multiple choice", task))
    if "overall" in results:
        rows.append(row("**overall**", "multiple choice", results["overall"]))
    for name, task in results["open_ended"].items():
        rows.append(f"| {name} | open-ended | {task['questions']} | answers in {task['answers']} |"
                    + (" |" if baseline else ""))
    return "\n".join(rows)
