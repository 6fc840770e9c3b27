"""Benchmark a training step (forward + backward + AdamW step): PPLLaVA against no pooling.

Paper Table 5 (Vicuna-7B, 32-frame videos): "LLaVA-Next (w/o Pooling)", 4608 visual tokens,
15.0 s per video, against "+Prompt-guided Pooling", 1024 tokens, 4.6 s: 3.3x (inference
throughput there, a training step here). Three variants of ONE model (same weights, same 128
text tokens, loss on the 64 answer tokens) differ only in how the visual tokens are made and
how many reach the LLM:

    ppllava      32 frames x 24x24 patches -> prompt-guided pooling (2,3,3) -> 16x8x8 = 1024
                 tokens; the model's own forward (CLIP text tower, relevance, pooling)
    no pooling   32 frames at half side (ViT grid 12x12, position embeddings interpolated): all
                 32x12x12 = 4608 patch tokens go to the LLM, no pooling op (headline baseline)
    2x2 average  32 frames x 24x24 patches, projected, then averaged 2x2 per frame as
                 LLaVA-NeXT-Video does -> 32x12x12 = 4608 tokens

LLM-dominated as in a 7B model (DESIGN.md §8): the paper's geometry and token counts, a tiny ViT
(48x48 frames, 2x2 patches) and an LLM (7 layers x 576) sized so that it takes the share of the
step's FLOPs that Llama-7B takes next to CLIP-L/14-336 (printed for both). Its attention width,
2 heads x 32, keeps attention at ~9% of the LLM's FLOPs at 4736 tokens as in the 7B: full-width
attention in a narrow model would let the quadratic term inflate the speedup. The measured LLM
share is the step minus the visual-token path timed alone. SFT settings: vision tower frozen;
projector, CLIP text and LLM train.

Timing: one thread, CPU time (= wall time on a dedicated core; on a shared machine wall time also
counts the neighbours, so it is printed, not used); a warm-up, then --repeats interleaved rounds;
medians. Last line: step speedup of PPLLaVA over no pooling.

    python benchmarks/step.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from pooling import cpu_name  # benchmarks/pooling.py (a script's folder is on sys.path)

from ppllava import VIDEO, PPLLaVAConfig, PPLLaVAForConditionalGeneration
from ppllava.processing import visual_token_count

FRAMES, GRID, TEXT, IMAGE_TOKEN = 32, 24, 128, 1023


def bench_config() -> PPLLaVAConfig:
    return PPLLaVAConfig.tiny(
        vision_config={"image_size": 2 * GRID, "patch_size": 2, "hidden_size": 64, "intermediate_size": 256,
                       "num_hidden_layers": 2, "num_attention_heads": 2},
        text_config={"vocab_size": IMAGE_TOKEN + 1, "hidden_size": 576, "intermediate_size": 1584,
                     "num_hidden_layers": 7, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 32,
                     "max_position_embeddings": 8192},
        num_frames=FRAMES, image_token_index=IMAGE_TOKEN,
    )


def step_flops(config: PPLLaVAConfig, visual: int, grid: int) -> tuple[float, float]:
    """(LLM, vision side) matmul + attention FLOPs of a step; ViT forward only (frozen), projector
    and LLM forward + backward (3x forward). CLIP text and pooling left out (<0.3% at 7B)."""
    v, t = config.vision_config, config.text_config
    patches, d = grid * grid + 1, t.hidden_size
    vit = FRAMES * v.num_hidden_layers * patches * (2 * (4 * v.hidden_size + 2 * v.intermediate_size) * v.hidden_size
                                                    + 4 * patches * v.hidden_size)
    projector = 3 * 2 * FRAMES * grid * grid * (v.hidden_size + d) * d
    head_dim = getattr(t, "head_dim", None) or d // t.num_attention_heads
    q, kv, n = t.num_attention_heads * head_dim, t.num_key_value_heads * head_dim, visual + TEXT
    weights = t.num_hidden_layers * (2 * d * (q + kv) + 3 * d * t.intermediate_size) + d * t.vocab_size
    llm = 3 * (2 * n * weights + 2 * n * n * q * t.num_hidden_layers)  # causal: half of QK^T and of AV
    return llm, vit + projector


def text_batch(visual: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[16 prompt tokens][visual image tokens][48 question + 64 answer tokens]; loss on the answer."""
    ids = torch.randint(3, IMAGE_TOKEN, (1, TEXT + visual), generator=generator)
    ids[0, 16 : 16 + visual] = IMAGE_TOKEN
    labels = ids.clone()
    labels[0, : TEXT + visual - 64] = -100
    return ids, labels


def variants(model: PPLLaVAForConditionalGeneration, config: PPLLaVAConfig):
    """name -> (visual tokens, ViT grid side, visual-token path alone, loss of the full forward)."""
    generator = torch.Generator().manual_seed(0)
    clip_ids = torch.randint(1, 126, (1, config.clip_context_length), generator=generator)
    clip_ids[0, -1] = config.clip_text_config.eos_token_id
    side = config.vision_config.image_size
    video = {"frame_counts": torch.tensor([FRAMES]), "modalities": torch.tensor([VIDEO]), "clip_input_ids": clip_ids,
             "pixel_values": torch.randn(FRAMES, 3, side, side, generator=generator)}
    pooled = visual_token_count(config, VIDEO, FRAMES)
    ids, labels = text_batch(pooled, generator)
    table = {"ppllava": (pooled, GRID, lambda: model.visual_tokens(**video)[0],
                         lambda: model(input_ids=ids, labels=labels, **video).loss)}

    def baseline(half_side: bool, average: bool):
        pixels = torch.randn(FRAMES, 3, side // 2, side // 2, generator=generator) if half_side else video["pixel_values"]
        grid = pixels.shape[-1] // config.vision_config.patch_size

        def tokens() -> torch.Tensor:
            hidden = model.vision_tower(pixels, output_hidden_states=True, interpolate_pos_encoding=True)
            projected = model.multi_modal_projector(hidden.hidden_states[config.vision_feature_layer][:, 1:])
            if average:  # LLaVA-NeXT-Video: project, then 2x2 average per frame
                grid_first = projected.transpose(1, 2).reshape(FRAMES, -1, grid, grid)
                projected = F.avg_pool2d(grid_first, 2).flatten(2).transpose(1, 2)
            return projected.reshape(-1, projected.shape[-1])

        count = FRAMES * (grid // 2 if average else grid) ** 2
        base_ids, base_labels = text_batch(count, generator)
        slots = base_ids == IMAGE_TOKEN

        def loss() -> torch.Tensor:
            embeds = model.get_input_embeddings()(base_ids.masked_fill(slots, 0))
            embeds = model._splice_visual_tokens(base_ids, embeds, slots, [tokens()])
            return model.language_model(inputs_embeds=embeds, labels=base_labels).loss

        return count, grid, tokens, loss

    table["no pooling"] = baseline(half_side=True, average=False)
    table["2x2 average"] = baseline(half_side=False, average=True)
    return table


def timed(fn, *args) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn(*args)
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds, each runs every variant once")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    torch.set_num_threads(1)  # CPU time of one thread = wall time on a dedicated core, whatever else runs
    torch.manual_seed(0)
    config = bench_config()
    model = PPLLaVAForConditionalGeneration(config).train()
    model.set_trainable_parts()  # SFT: vision frozen; projector, CLIP text, LLM train
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    table = variants(model, config)

    def step(loss) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    def visual_path(tokens) -> None:
        optimizer.zero_grad(set_to_none=True)
        tokens().sum().backward()

    llm_params = sum(p.numel() for p in model.language_model.parameters()) / 1e6
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} thread, torch {torch.__version__}")
    print(f"LLM {llm_params:.1f} M parameters; {FRAMES} frames of {GRID}x{GRID} patches, {TEXT} text tokens")
    reference = PPLLaVAConfig()  # CLIP-L/14-336 + Llama-7B shapes (a config only, no weights)
    flops = {name: [step_flops(c, count, grid) for c in (config, reference)] for name, (count, grid, _, _) in table.items()}
    print("LLM share of step FLOPs, this model | PPLLaVA-7B: " + ", ".join(
        f"{name} {ours[0] / sum(ours):.0%} | {ref[0] / sum(ref):.0%}" for name, (ours, ref) in flops.items()))
    print("step FLOPs / ppllava's, this model | PPLLaVA-7B: " + ", ".join(
        f"{name} {sum(ours) / sum(flops['ppllava'][0]):.2f} | {sum(ref) / sum(flops['ppllava'][1]):.2f}"
        for name, (ours, ref) in flops.items() if name != "ppllava"))
    for _, _, tokens, loss in table.values():  # warm-up
        step(loss)
        visual_path(tokens)
    steps, visuals = {name: [] for name in table}, {name: [] for name in table}
    for _ in range(args.repeats):  # interleaved, so drifts hit every variant alike
        for name, (_, _, tokens, loss) in table.items():
            steps[name].append(timed(step, loss))
            visuals[name].append(timed(visual_path, tokens))
    cpu = {name: statistics.median(cpu for cpu, _ in times) for name, times in steps.items()}
    print(f"{'variant':<12} {'visual tokens':>13} {'step, CPU s':>12} {'(wall s)':>9} {'visual path':>12} {'LLM share':>10}")
    for name, (count, _, _, _) in table.items():
        wall = statistics.median(wall for _, wall in steps[name])
        visual = statistics.median(cpu for cpu, _ in visuals[name])
        print(f"{name:<12} {count:>13} {cpu[name]:>12.2f} {wall:>9.2f} {visual:>12.2f} {1 - visual / cpu[name]:>10.0%}")
    print(f"step speedup, PPLLaVA (1024 tokens) vs 2x2 average (4608 tokens): {cpu['2x2 average'] / cpu['ppllava']:.2f}x")
    print(f"step speedup, PPLLaVA (1024 tokens) vs no pooling (4608 tokens): {cpu['no pooling'] / cpu['ppllava']:.2f}x")


if __name__ == "__main__":
    main()
