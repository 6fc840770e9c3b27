"""SFT stage: interleaved instruction tuning of PPLLaVA with DeepSpeed (paper §3.3, §4.1).

    tokenizers, model (vision frozen; projector, CLIP text and LLM train, per sft.trainable; with
    sft.lora the LLM trains through LoRA adapters, PEFT's, its own weights frozen)
    DeepSpeed engine: ZeRO stage, bf16, AdamW, cosine schedule with warmup, gradient clipping
    streaming loader over run_dir/shard (interleaved micro-batches of video / image / multi-image)
    resume (--resume auto|PATH): engine + optimizer + scheduler, loader position, RNG states
    for step in [start, total):
        for the `accumulation` micro-batches:      forward -> loss finite on every rank?
                                                   no: leave it out, count it (stop after N in a row)
                                                   yes: backward, engine.step (optimizer on the last)
        every log_every: console (tqdm), metrics.jsonl, TensorBoard
        every save_every, at the end, or after SIGTERM/SIGUSR1: atomic checkpoint
                                                   (after a signal: exit code 3, "requeue me")

Global batch = micro batch x accumulation x world size = sft.global_batch_size (paper: 256).
Outputs: run_dir/sft/checkpoints/step_N (+ latest), metrics.jsonl, tensorboard/, model/ (config.json and
tokenizers: the model directory without its weights, which live in the checkpoints).
"""

from __future__ import annotations

import logging

from backends.deepspeed_engine import build_engine, model_init_context
from pipeline.data.loader import StreamingLoader
from pipeline.data.shard_files import manifest_samples, mixture_weights, never_drawn, never_drawn_warning
from pipeline.layout import MODEL_DIR
from pipeline.model.setup import (build_model, build_processor, count_parameters, load_tokenizers,
                                  loads_partitioned, save_processor_config, save_tokenizers, set_trained_parts,
                                  stage_trained_parts, use_recipe_kernels)
from pipeline.recipe import Recipe
from pipeline.runner import DRY_RUN_DONE, StageContext
from pipeline.training import (TrainingRun, answer_tokens, engine_settings, loader_settings, schedule_length,
                               stage_inputs)
from ppllava.lora import save_lora_config

logger = logging.getLogger(__name__)

DISTRIBUTED = True


def inputs(recipe: Recipe, world_size: int) -> dict:
    return stage_inputs(recipe, "sft", world_size)


def run(context: StageContext) -> dict:
    recipe, backend, ranks = context.recipe, context.backend, context.ranks
    sft, device = recipe.sft, backend.device(ranks.local_rank)
    micro, accumulation, world = recipe.batch_layout(ranks.world_size)
    if world != recipe.cluster.world_size and ranks.is_main:
        logger.warning("the recipe's cluster section describes %d processes but %d were launched; gradient "
                       "accumulation adapts so the global batch stays %d", recipe.cluster.world_size, world,
                       sft.global_batch_size)
    weights = mixture_weights(recipe.manifest_path, recipe.data.mixture, recipe.data.weights)
    samples = manifest_samples(recipe.manifest_path, weights)
    total_steps = schedule_length(recipe, "sft", samples)
    undrawn = never_drawn(recipe.manifest_path, weights)
    if undrawn and ranks.is_main:
        logger.warning("sft: %s", never_drawn_warning(undrawn))

    # Build: tokenizers, model, engine, loader.
    tokenizer, clip_tokenizer = load_tokenizers(recipe)
    settings = engine_settings(sft, micro, accumulation, total_steps)
    with model_init_context(settings, backend.resolve_dtype(sft.precision, ranks.local_rank),
                            partitioned=loads_partitioned(recipe)):
        model = build_model(recipe, tokenizer, backend.attn_implementation)
    use_recipe_kernels(model, backend, recipe.model.kernels, recipe.model.attn_implementation)
    lora = set_trained_parts(model, stage_trained_parts(recipe, "sft"), sft.lora)
    config = model.config
    engine, _, scheduler = build_engine(model, backend, settings, ranks.local_rank)
    loader = StreamingLoader(recipe.manifest_path, build_processor(recipe, config, tokenizer, clip_tokenizer),
                             loader_settings(recipe, micro, accumulation, weights, recipe.data.interleave),
                             rank=ranks.rank, world_size=world)
    parameters, trainable = count_parameters(model)
    if ranks.is_main:
        logger.info("sft: %d steps of %d samples (micro %d x accumulation %d x world %d) over %d samples; "
                    "%.1fM parameters, %.1fM trainable", total_steps, micro * accumulation * world, micro,
                    accumulation, world, samples, parameters / 1e6, trainable / 1e6)

    if context.dry_run:
        batch = next(iter(loader))
        loss = engine(**{k: v.to(device) for k, v in batch.inputs.items()}).loss
        engine.backward(loss)
        if ranks.is_main:
            print(f"dry run: loss {float(loss):.4f} on {len(batch.keys)} samples {batch.visual_tokens}; "
                  f"memory {backend.memory_stats()}", flush=True)
        return DRY_RUN_DONE

    if ranks.is_main:
        # The model directory without its weights: what export (and a DPO stage starting here) needs
        # besides a checkpoint to rebuild the model.
        save_tokenizers(tokenizer, clip_tokenizer, context.directory / MODEL_DIR)
        config.save_pretrained(context.directory / MODEL_DIR)
        save_processor_config(recipe, config, context.directory / MODEL_DIR)
        if lora is not None:  # the checkpoints hold the adapters: export merges them
            save_lora_config(lora, context.directory / MODEL_DIR)

    # The loop.
    training = TrainingRun(context, engine, scheduler, loader, total_steps)
    first_step = training.start()  # restores engine, scheduler, loader position and RNG with --resume
    engine.train()
    batches = iter(loader)
    for step in range(first_step, total_steps):
        lr = training.lr
        window = training.step_window(batches, accumulation)
        # The step's loss: every answer token of the global batch counts once, however it is split.
        per_micro = training.per_micro_batch([int(answer_tokens(b.inputs["labels"]).sum()) for b in window],
                                             accumulation)
        step_loss = 0.0
        for batch in window:
            inputs = {k: v.to(device) for k, v in batch.inputs.items()}
            loss = engine(**inputs, num_items_in_batch=per_micro).loss
            if not training.finite(loss, batch.keys, step):
                training.stand_in(batch)  # left out of the step; the next steps read what they always would
                continue
            engine.backward(loss)
            engine.step()  # the optimizer steps on the last micro-batch of the accumulation
            step_loss += float(loss.detach()) / accumulation
            training.interval.add(batch)
        training.end_step(step + 1, step_loss, lr)
    summary = training.finish()
    if undrawn:
        summary["sharded, never drawn"] = undrawn
    return summary
