"""Questions per second of the eval's batched generation (InferenceModel.generate_batch: prompts
left-padded into one batch, one key/value cache) against one question at a time
(InferenceModel.generate), on the same model, videos and questions, in the same run.

Workload: a PPLLaVA with a ~60M-parameter LLM (hidden 768, 6 layers, 32k vocabulary) and the tiny
vision tower, 16 synthetic videos (16 frames at 48x48 sampled to 8), MVBench-style prompts with
the "Best option:(" prefix, greedy, 32 new tokens; no answer ends early (the model is untrained,
so every question generates all 32 tokens: the same work both ways). Timing: wall clock, a
warm-up question first, then each way --repeats times interleaved; medians.

    python benchmarks/eval_generation.py [--batch-size 8] [--repeats 3]

Last line: questions per second, batched over one at a time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.benchmarks.prompts import mvbench_prompt  # noqa: E402
from pipeline.data.synthetic import SynthSettings, generate  # noqa: E402
from pipeline.model.inference import Question, load_model_dir  # noqa: E402
from pipeline.model.setup import save_processor_config, save_tokenizers  # noqa: E402
from pipeline.model.tiny import tiny_config_for, tiny_tokenizer  # noqa: E402
from pipeline.recipe import Recipe  # noqa: E402
from ppllava import PPLLaVAForConditionalGeneration  # noqa: E402

QUESTIONS, NEW_TOKENS = 16, 32


def build(directory: Path):
    generate(directory / "synth", SynthSettings(seed=5, videos=QUESTIONS, images=0, multi_images=0, eval_questions=0,
                                                dpo_pairs=0, size=48, frames=16))
    tokenizer = tiny_tokenizer()
    config = tiny_config_for(tokenizer, text_config={"vocab_size": 32000, "hidden_size": 768,
                                                     "intermediate_size": 2048, "num_hidden_layers": 6,
                                                     "num_attention_heads": 12, "num_key_value_heads": 12})
    torch.manual_seed(0)
    PPLLaVAForConditionalGeneration(config).save_pretrained(directory / "model")
    save_tokenizers(tokenizer, tokenizer, directory / "model")
    save_processor_config(Recipe(name="bench", run_dir=str(directory)), config, directory / "model")
    model = load_model_dir(directory / "model")
    model.eos_token_ids = []  # every question generates NEW_TOKENS tokens: equal work both ways
    videos = sorted((directory / "synth" / "media" / "videos").glob("*.mp4"))
    questions = []
    for index, video in enumerate(videos):
        prompt = mvbench_prompt(f"Which colour is the shape number {index}?" + " Look closely." * (index % 4),
                                ["red", "green", "blue", "yellow"])
        questions.append(Question(prompt.text, "video", (video,), answer_prefix=prompt.answer_prefix,
                                  guide=prompt.guide))
    return model, questions


def one_at_a_time(model, questions) -> tuple[float, list[str]]:
    start = time.perf_counter()
    answers = [model.generate(question, NEW_TOKENS) for question in questions]
    return time.perf_counter() - start, answers


def batched(model, questions, size: int) -> tuple[float, list[str]]:
    start = time.perf_counter()
    answers = []
    for first in range(0, len(questions), size):
        answers += model.generate_batch(questions[first:first + size], NEW_TOKENS)
    return time.perf_counter() - start, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        model, questions = build(Path(directory))
        model.generate(questions[0], 4)  # warm-up
        singles, batches = [], []
        for _ in range(args.repeats):
            seconds, reference = one_at_a_time(model, questions)
            singles.append(seconds)
            seconds, answers = batched(model, questions, args.batch_size)
            batches.append(seconds)
        same = sum(a == b for a, b in zip(answers, reference))
        single, batch = statistics.median(singles), statistics.median(batches)
        print(f"{len(questions)} questions x {NEW_TOKENS} new tokens, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads")
        print(f"one at a time: {len(questions) / single:.2f} questions/s ({single:.1f} s)")
        print(f"batch of {args.batch_size}:    {len(questions) / batch:.2f} questions/s ({batch:.1f} s); "
              f"{same}/{len(questions)} answers identical to one at a time")
        print(f"batched / one at a time: {single / batch:.2f}x questions per second")


if __name__ == "__main__":
    main()
