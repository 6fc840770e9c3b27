"""Eval stage: multiple-choice accuracy and open-ended answers of a model directory.

    model      eval.model_path, else run_dir/export (the export stage's output)
    check      every record of every file first: a malformed one stops the stage before the model
               loads, naming the file, the record index and the reason
    for each multiple-choice file (one task, named by the file's stem):
        for each question: log-likelihood of every option as the answer (pipeline.model.inference),
                           prediction = the highest mean log-prob per answer token
    for each open-ended file:
        for each question: greedy answer (eval.max_new_tokens)
    for each benchmark (eval.benchmarks: MVBench, VideoMME, MSVD/MSRVTT/ActivityNet-QA, VCG):
        for each question: the authors' prompt, a greedy generation, the answer read from it
                           (pipeline/benchmarks/); a video missing or undecodable is counted
                           with its reason, never fatal; answers are logged as they come
                           (pipeline/benchmarks/answer_log.py), so a re-run asks only the rest
    write  run_dir/eval/results.json, results.md, <stem>.choices.jsonl (every multiple-choice
           prediction with its scores), <stem>.jsonl (open-ended: question, prediction, reference,
           for external GPT-based scoring), <benchmark>.answers.jsonl and gpt/ (the files the
           benchmarks' GPT-assisted scoring reads); print the tables

Question files: see pipeline/benchmarks/question_files.py (MVBench-style multiple choice, open-ended).

Scoring by the mean rather than the sum: every answer token adds a negative log-prob, so the sum
prefers short options whatever they say (MVBench mixes "Not sure" with long phrases); the mean
compares options of different lengths on equal terms. Accuracy by the sum is recorded beside it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from backends.distributed import gather_objects, sum_across_ranks
from pipeline.atomic import sha256_of, write_text_atomically
from pipeline.benchmarks import answer_log
from pipeline.benchmarks.question_files import KINDS, LETTERS, Task, multiple_choice_prompt, read_task
from pipeline.benchmarks.readers import BenchmarkError, absent_mvbench_tasks, annotation_files
from pipeline.benchmarks.scoring import (answered, benchmark_questions, benchmark_table, failed,
                                         frames_of, gpt_scoring_files, headline, prepared, question_of,
                                         result_line, summarise, video_kernel)
from pipeline.data.media import MediaError
from pipeline.data.records import RecordError
from pipeline.model.check import ModelFilesError, directory_fingerprint
from pipeline.model.inference import InferenceError, InferenceModel, load_for_inference, round_rotary_frequencies
from pipeline.model.relevance_map import draw, relevance_map
from pipeline.model.setup import build_model, use_recipe_kernels
from pipeline.recipe import Recipe, RecipeError
from pipeline.runner import StageContext, StoppedForRequeue

logger = logging.getLogger(__name__)

DISTRIBUTED = True  # benchmark questions are spread over the ranks; rank 0 does the question files and writes


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
    for entry in recipe.eval.benchmarks:
        try:
            files.update({str(path): sha256_of(path) for path in annotation_files(entry)})
        except (OSError, BenchmarkError) as error:
            raise RecipeError(f"{recipe.source}: eval.benchmarks ({entry.name}): {error}") from None
    directory = model_directory(recipe)
    if not (directory / "config.json").is_file():
        raise RecipeError(f"{recipe.source}: eval: the model directory {directory} has no config.json (set "
                          f"eval.model_path, or run the export stage first)")
    return {"eval": asdict(recipe.eval), "files_sha256": files, "model_dir": str(directory),
            "model_files": directory_fingerprint(directory)}


def run(context: StageContext) -> dict:
    recipe, section, out = context.recipe, context.recipe.eval, context.directory
    tasks = []
    for kind in KINDS:
        for index, name in enumerate(getattr(section, kind)):
            try:
                tasks.append(read_task(name, kind, section.media_root, section.limit))
            except RecordError as error:
                raise RecipeError(f"{recipe.source}: eval.{kind}[{index}]: {error}") from None
    benchmarks = []  # every benchmark's records checked before the model loads, as the files'
    for index, entry in enumerate(section.benchmarks):
        try:
            benchmarks.append((entry, benchmark_questions(entry)))
        except (RecordError, BenchmarkError) as error:
            raise RecipeError(f"{recipe.source}: eval.benchmarks[{index}] ({entry.name}): {error}") from None
        absent = absent_mvbench_tasks(entry.root) if entry.name == "mvbench" else []
        if absent and context.ranks.is_main:
            logger.warning("eval.benchmarks[%d] (mvbench): %s holds %d of the 20 task files; not asked: %s", index,
                           entry.root, 20 - len(absent), ", ".join(absent))
    for kind in KINDS:
        stems = [task.name for task in tasks if task.kind == kind]
        if len(set(stems)) != len(stems):
            raise RecipeError(f"{recipe.source}: eval.{kind}: two files share a name ({', '.join(stems)}); tasks are "
                              f"named by file stem, so rename one")

    if not benchmarks and not context.ranks.is_main:  # nothing to share: the question files are rank 0's
        return None
    try:
        model = load_for_inference(model_directory(recipe), context.backend, context.ranks.local_rank,
                                   section.num_frames, section.video_kernel, recipe.data.decoder,
                                   recipe.model.kernels, recipe.model.attn_implementation)
    except ModelFilesError as error:
        raise RecipeError(f"{recipe.source}: eval: {error}") from None
    if section.authors_rope_rounding and not round_rotary_frequencies(model.model.language_model):
        raise RecipeError(f"{recipe.source}: eval.authors_rope_rounding: the model's LLM has no rotary embedding "
                          f"(inv_freq) to round")
    results = {"model": str(model.directory), "num_frames": model.num_frames,
               "authors_rope_rounding": section.authors_rope_rounding,
               "video_kernel": list(model.config.video_kernel), "scoring": "mean log-prob per answer token",
               "multiple_choice": {}, "open_ended": {}, "benchmarks": {}}
    ranks = context.ranks
    progress = tqdm(total=sum(len(task.items) for task in tasks) + sum(len(q) for _, q in benchmarks), desc="eval",
                    unit="question", dynamic_ncols=True, disable=not ranks.is_main)
    # Benchmarks: every rank asks its share of the questions not answered yet (question i on rank
    # i mod world); rank 0 gathers them.
    if benchmarks:
        answer_log.start(out, context.fingerprint, ranks.is_main)
    for entry, questions in benchmarks:
        done = answer_log.logged_answers(out, entry.label, ranks.is_main)
        todo = [item for item in questions if item.key not in done]
        if done and ranks.is_main:
            logger.info("eval %s: %d answers logged by an earlier run; asking the other %d", entry.label,
                        len(questions) - len(todo), len(todo))
        progress.update(len(questions) - len(todo))
        rounds = -(-len(todo) // (ranks.world_size * section.batch_size))
        log = answer_log.AnswerLog(out, entry.label, ranks.rank)
        mine = _ask(model, entry, todo[ranks.rank::ranks.world_size], rounds, context, progress, log)
        shares = gather_objects(mine)
        new = {item.key: shares[index % ranks.world_size][index // ranks.world_size] for index, item in enumerate(todo)}
        lines = [done.get(item.key) or new[item.key] for item in questions]
        if ranks.is_main:
            results["benchmarks"][entry.label] = _write_benchmark(model, entry, questions, lines, context)
    if not ranks.is_main:  # the question files and the result files are rank 0's
        return None
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
    table = "\n\n".join([results_table(results)] * bool(tasks) + [
        benchmark_table(name, entry) for name, entry in results["benchmarks"].items()])
    write_text_atomically(out / "results.json", json.dumps(results, indent=1))
    write_text_atomically(out / "results.md", table + "\n")
    answer_log.finish(out)
    print(f"\neval of {model.directory} ({model.num_frames} frames, video kernel "
          f"{'x'.join(map(str, model.config.video_kernel))})\n{table}\n", flush=True)
    summary = {"results": str(out / "results.json")}
    if choice:
        summary.update(accuracy=round(results["overall"]["accuracy"], 4), questions=results["overall"]["questions"])
        if section.baseline:
            summary["untrained accuracy"] = round(results["overall"]["untrained_accuracy"], 4)
    if results["open_ended"]:
        summary["open-ended answers"] = sum(t["questions"] for t in results["open_ended"].values())
    for label, entry in results["benchmarks"].items():
        overall, figure = entry["overall"], headline(entry)
        asked = f"{overall['asked']} of {overall['questions']} answered"
        summary[label] = f"{100 * figure:.1f} % ({asked})" if figure is not None else asked
    return summary


def _ask(model: InferenceModel, entry, questions: list, rounds: int, context: StageContext, progress,
         log: answer_log.AnswerLog) -> list[dict]:
    """This rank's share of a benchmark, asked by greedy generation eval.batch_size at a time
    (pipeline/benchmarks/), in ``rounds`` rounds on every rank (a stop signal is voted on each
    round, so all ranks leave together), each round's answers appended to ``log``. A question
    whose video is missing or cannot be decoded gets a ``failed`` line: counted, not fatal."""
    lines, size = [], context.recipe.eval.batch_size
    with video_kernel(model, entry.video_kernel):
        for round_ in range(rounds):
            if sum_across_ranks([float(context.stop.received is not None)], model.device)[0]:
                raise StoppedForRequeue(f"{context.stop.received or 'a stop signal'} received during eval (on some rank); "
                                        f"the answers so far are kept, the next run asks the rest")
            chunk, waiting, samples = questions[round_ * size:(round_ + 1) * size], [], []
            for item in chunk:
                try:
                    line, asked = prepared(model, item, entry)
                    inputs = [model.prepare(question) for question in asked]
                except (MediaError, InferenceError) as error:  # undecodable video, prompt too long
                    line, inputs = failed(result_line(item, frames_of(model, item, entry)), str(error)), []
                    logger.warning("%s %s: %s", entry.name, item.key, error)
                lines.append(line)
                if inputs:
                    waiting.append((len(lines) - 1, item, len(inputs)))
                    samples += inputs
            generated = model.generate_batch(samples, entry.max_new_tokens) if samples else []
            for index, item, count in waiting:
                lines[index] = answered(item, lines[index], generated[:count])
                generated = generated[count:]
            log.append(lines[len(lines) - len(chunk):])
            progress.set_postfix_str(entry.name)
            progress.update(len(chunk) * context.ranks.world_size)
    return lines


def _write_benchmark(model: InferenceModel, entry, questions: list, lines: list[dict], context: StageContext) -> dict:
    """Rank 0: the relevance maps of the first eval.relevance_maps questions, the answer file, the
    files GPT-assisted scoring reads, and the benchmark's summary."""
    out, section = context.directory, context.recipe.eval
    with video_kernel(model, entry.video_kernel):
        kernel = list(model.config.video_kernel)
        for item, line in list(zip(questions, lines))[:section.relevance_maps]:
            if "failed" not in line:
                picture = out / "relevance" / entry.label / f"{item.key.replace('/', '_')}.png"
                draw(relevance_map(model, question_of(model, item, entry)), picture)
                line["relevance_map"] = str(picture.relative_to(out))
    write_text_atomically(out / f"{entry.label}.answers.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    scoring = gpt_scoring_files(entry.name, lines)
    for filename, records in scoring.items():
        (out / "gpt").mkdir(exist_ok=True)
        write_text_atomically(out / "gpt" / filename, json.dumps(records, indent=1))
    frames = sorted({line["frames"] for line in lines})
    absent = {"absent_tasks": absent_mvbench_tasks(entry.root)} if entry.name == "mvbench" else {}
    return {"benchmark": entry.name, **summarise(entry.name, lines), **absent, "frames": frames, "video_kernel": kernel,
            "batch_size": section.batch_size, "ranks": context.ranks.world_size, "answers": f"{entry.label}.answers.jsonl",
            "gpt_scoring": [f"gpt/{name}" for name in scoring]}


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
                question, answers = multiple_choice_prompt(item, section.prompt)
                scores = model.answer_loglikelihoods(question, answers)
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
    use_recipe_kernels(start, context.backend, recipe.model.kernels, recipe.model.attn_implementation)
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
