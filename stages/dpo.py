"""DPO stage: LLaVA-Hound-style preference tuning on video pairs (paper §3.3, Table 9).

    start model   the SFT stage's final checkpoint, consolidated once into run_dir/dpo/init/
                  (dpo.init: sft), the model section's model written there (dpo.init: model; e.g.
                  the authors' released SFT model), or a PPLLaVA directory (dpo.init: PATH)
    policy        the start model in a DeepSpeed engine; only the LLM trains (vision tower,
                  projector and CLIP text frozen), all its weights or LoRA adapters on them (dpo.lora)
    reference     the start model, frozen: either its log-probs of every pair computed in one
                  pass before training and stored in run_dir/dpo/reference_logps.json
                  (dpo.reference: precomputed, the default: no second model in memory), or a
                  second copy run beside the policy (live; under ZeRO-3 an optimizer-less engine;
                  with LoRA the policy itself with its adapters disabled, no copy)
    data          the `dpo` shards: per pair one video (frames at segment middles, the same every
                  epoch), CLIP text = the prompt, chosen and rejected answers in ONE forward of
                  2B rows that share the B videos' visual tokens (visual_rows)
    for step in [start, total):
        for the `accumulation` micro-batches:
            logp_pi = policy(chosen + rejected);  logp_ref = lookup or reference forward
            loss = sigmoid DPO (beta) [+ sft_weight x NLL of the chosen answers]
            finite on every rank? backward, engine.step : leave it out, count
        log rewards/*, logps/* (TRL's names); checkpoint; requeue on a signal — as SFT does
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path

import torch

from backends.deepspeed_engine import build_engine, build_frozen_model, model_init_context
from backends.distributed import broadcast_from_rank0, gather_objects, max_across_ranks
from pipeline.atomic import publish_directory, temporary_directory, write_text_atomically
from pipeline.checkpoint import latest_checkpoint
from pipeline.data.collate import SampleProcessor, SampleTooLong
from pipeline.data.loader import StreamingLoader, media_members
from pipeline.data.shard_files import OnePass, manifest_samples
from pipeline.data.media import MediaError, decoder
from pipeline.data.pairs import PairProcessor
from pipeline.layout import DPO_INIT, MODEL_DIR, REFERENCE_LOGPS, checkpoints_dir
from pipeline.model.check import directory_fingerprint
from pipeline.model.consolidate import consolidated_model, copy_model_files
from pipeline.model.setup import (count_parameters, load_directory_tokenizers, load_processor_settings,
                                  model_source_directory, set_trained_parts, stage_trained_parts,
                                  use_recipe_kernels, write_start_model)
from pipeline.preference import dpo_loss, sequence_logps
from pipeline.recipe import Recipe, RecipeError
from pipeline.runner import DRY_RUN_DONE, StageContext, StageFailed, fingerprint_of
from pipeline.training import (TrainingRun, answer_tokens, engine_settings, loader_settings, read_settings,
                               schedule_length, stage_inputs)
from ppllava import PPLLaVAForConditionalGeneration
from ppllava.lora import adapters_disabled, save_lora_config

logger = logging.getLogger(__name__)

DISTRIBUTED = True


def inputs(recipe: Recipe, world_size: int) -> dict:
    found = stage_inputs(recipe, "dpo", world_size)
    if recipe.dpo.init == "model":  # the model section's checkpoint: a changed one re-runs the stage
        source = model_source_directory(recipe)
        found["init_files"] = directory_fingerprint(source) if source else None
    elif recipe.dpo.init != "sft":  # a model directory: a re-export re-runs the stage
        found["init_files"] = directory_fingerprint(Path(recipe.dpo.init))
    return found


def _start_model(context: StageContext) -> Path:
    """The directory the policy (and the reference) start from."""
    recipe = context.recipe
    if recipe.dpo.init not in ("sft", "model"):
        return Path(recipe.dpo.init)
    init = context.directory / DPO_INIT
    if context.ranks.is_main and not (init / "config.json").is_file():
        if recipe.dpo.init == "model":
            logger.info("dpo: writing the model section's model (source %s) into %s", recipe.model.source, init)
            partial = temporary_directory(init, "the start model")
            write_start_model(recipe, partial)
        else:
            sft_dir = recipe.stage_dir("sft")
            step_dir = latest_checkpoint(checkpoints_dir(sft_dir))
            if step_dir is None:
                raise StageFailed(f"dpo.init: sft, but {checkpoints_dir(sft_dir)} holds no checkpoint")
            logger.info("dpo: consolidating %s into %s", step_dir, init)
            partial = temporary_directory(init, "a consolidation")
            model = consolidated_model(step_dir, sft_dir / MODEL_DIR)
            model.save_pretrained(partial)
            copy_model_files(sft_dir / MODEL_DIR, partial)
        publish_directory(partial, init)
    context.barrier()
    return init


def _load(init: Path, attn: str) -> PPLLaVAForConditionalGeneration:
    # fp32 whatever the directory holds (a bf16 export): DeepSpeed casts to the training precision,
    # and fp32 master weights must not start from a silent downcast.
    return PPLLaVAForConditionalGeneration.from_pretrained(str(init), attn_implementation=attn, dtype=torch.float32)


def _pair_logps(model, batch, device) -> torch.Tensor:
    """Summed answer log-probs of the 2B rows (chosen then rejected) of a pair batch."""
    inputs = {k: v.to(device) for k, v in batch.inputs.items() if k != "labels"}
    logits = model(**inputs).logits
    return sequence_logps(logits, batch.inputs["labels"].to(device))[0]


def _precompute_reference(context: StageContext, engine, processor: PairProcessor, micro: int) -> dict:
    """Reference log-probs of every pair, by the start model (the policy before its first step).

    Each rank streams every world-th dpo shard. All ranks run the same number of forwards (ZeRO-3
    gathers parameters collectively): the counts come from the manifest, and a rank with fewer
    pairs repeats its last batch, whose results are dropped. A pair that cannot be decoded is
    skipped, as the training loader skips it.
    """
    recipe, ranks, device = context.recipe, context.ranks, context.backend.device(context.ranks.local_rank)
    mine = OnePass.of(recipe.manifest_path, "dpo", ranks.rank, ranks.world_size, read_settings(recipe))
    batches = max_across_ranks(-(-mine.samples // micro), device)
    # No shard of its own (fewer shards than ranks): work on rank 0's first shard, results dropped.
    records = mine if mine.shards else OnePass(mine.source, OnePass.of(recipe.manifest_path, "dpo").shards[:1])

    def prepared():
        for record in records:
            pair = processor.parse(json.loads(record["json"]))
            try:
                yield pair, processor(pair, media_members(record, pair))
            except (MediaError, SampleTooLong) as error:
                logger.warning("reference pass: skipping %s: %s", pair.key, error)

    found: dict[str, list[float]] = {}
    stream, last = prepared(), None
    engine.eval()
    with torch.no_grad():
        for _ in range(batches):
            chunk = [item for _, item in zip(range(micro), stream)]
            counted = bool(chunk) and bool(mine.shards)
            chunk = chunk or last  # this rank ran out: repeat, drop the results
            last = chunk
            logps = _pair_logps(engine, processor.collate([processed for _, processed in chunk]), device).float().cpu()
            for row, (pair, _) in enumerate(chunk):
                if not counted:
                    continue
                if pair.key in found:
                    raise StageFailed(f"two preference pairs share the key {pair.key}: give every record a unique id")
                found[pair.key] = [float(logps[row]), float(logps[row + len(chunk)])]
    merged: dict[str, list[float]] = {}
    for part in gather_objects(found):
        duplicated = set(merged) & set(part)
        if duplicated:
            raise StageFailed(f"two preference pairs share the key {sorted(duplicated)[0]}: give every record a unique id")
        merged.update(part)
    return merged


def _reference_inputs(context: StageContext) -> str:
    """What the reference log-probs depend on: the start model and the data, not the schedule."""
    return fingerprint_of({key: value for key, value in context.inputs.items() if key not in ("dpo", "world_size")})


def run(context: StageContext) -> dict:
    recipe, backend, ranks = context.recipe, context.backend, context.ranks
    dpo, device = recipe.dpo, backend.device(ranks.local_rank)
    micro, accumulation, world = recipe.batch_layout(ranks.world_size, "dpo")
    pairs = manifest_samples(recipe.manifest_path, {"dpo": 1.0})
    if pairs == 0:
        raise RecipeError(f"{recipe.source}: the dpo stage found no preference pairs in {recipe.manifest_path}: "
                          f"add a dataset card of format dpo to data.cards")
    total_steps = schedule_length(recipe, "dpo", pairs)

    # Build: start model, policy engine, reference, loader.
    init = _start_model(context)
    tokenizer, clip_tokenizer = load_directory_tokenizers(init)
    settings = engine_settings(dpo, micro, accumulation, total_steps)
    attn = recipe.model.attn_implementation or backend.attn_implementation
    with model_init_context(settings, backend.resolve_dtype(dpo.precision, ranks.local_rank)):
        model = _load(init, attn)
    use_recipe_kernels(model, backend, recipe.model.kernels, recipe.model.attn_implementation)
    # the LLM trains: all its weights, or LoRA adapters on them (dpo.lora)
    lora = set_trained_parts(model, stage_trained_parts(recipe, "dpo"), dpo.lora)
    if recipe.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine, _, scheduler = build_engine(model, backend, settings, ranks.local_rank)
    processor_settings = load_processor_settings(init)
    processor_settings.max_length = recipe.data.max_length
    if dpo.template is not None:  # LLaVA-Hound's Vicuna v1 by default; the model directory keeps the SFT one
        processor_settings.template = dpo.template
    processor_settings.frames = dpo.frames
    processor_settings.frame_scheme = recipe.data.frame_sampling
    processor = PairProcessor(SampleProcessor(model.config, tokenizer, clip_tokenizer, processor_settings,
                                              video_decoder=decoder(recipe.data.decoder)))
    loader = StreamingLoader(recipe.manifest_path, processor,
                             loader_settings(recipe, micro, accumulation, {"dpo": 1.0}),
                             rank=ranks.rank, world_size=world)
    if ranks.is_main:  # the weightless model directory export reads beside this stage's checkpoints
        model.config.save_pretrained(context.directory / MODEL_DIR)
        copy_model_files(init, context.directory / MODEL_DIR)
        if lora is not None:  # the checkpoints hold the adapters: export merges them
            save_lora_config(lora, context.directory / MODEL_DIR)
    parameters, trainable = count_parameters(model)
    if ranks.is_main:
        logger.info("dpo: %d steps of %d pairs (micro %d x accumulation %d x world %d) over %d pairs, beta %g, "
                    "reference %s; %.1fM parameters, %.1fM trainable", total_steps, micro * accumulation * world,
                    micro, accumulation, world, pairs, dpo.beta, dpo.reference, parameters / 1e6, trainable / 1e6)

    if context.dry_run:  # the policy is the start model: it is its own reference for one batch
        batch = next(iter(loader))
        logps = _pair_logps(engine, batch, device)
        half = len(batch.keys)
        loss, _ = dpo_loss(logps[:half], logps[half:], logps[:half].detach(), logps[half:].detach(), dpo.beta)
        engine.backward(loss)
        if ranks.is_main:
            print(f"dry run: dpo loss {float(loss):.4f} on {half} pairs; memory {backend.memory_stats()}", flush=True)
        return DRY_RUN_DONE

    reference, reference_logps, reference_digest = None, {}, ""
    if dpo.reference == "live" and lora is None:  # a second, frozen copy of the start model
        with model_init_context(settings, backend.resolve_dtype(dpo.precision, ranks.local_rank)):
            frozen = _load(init, attn)
            use_recipe_kernels(frozen, backend, recipe.model.kernels, recipe.model.attn_implementation)
            reference = build_frozen_model(frozen, backend, settings, ranks.local_rank)
        reference_digest = _digest(reference)
    elif dpo.reference == "precomputed":
        reference_logps = _stored_reference(context, engine, processor, micro)

    def reference_pair_logps(batch) -> tuple[torch.Tensor, torch.Tensor]:
        if dpo.reference == "live":
            # with LoRA the reference is the policy with its adapters off: the start model, no copy
            with torch.no_grad(), (adapters_disabled(model) if lora is not None else contextlib.nullcontext()):
                if reference is None:  # the policy, in eval mode as the frozen copy and the precomputed pass run
                    engine.eval()
                try:
                    logps = _pair_logps(reference if reference is not None else engine, batch, device)
                finally:
                    engine.train()
            return logps[:len(batch.keys)], logps[len(batch.keys):]
        missing = [key for key in batch.keys if key not in reference_logps]
        if missing:
            raise StageFailed(f"{REFERENCE_LOGPS} has no reference log-probs for {missing[:3]}: it was computed for "
                              f"other shards; delete it to compute it again")
        values = torch.tensor([reference_logps[key] for key in batch.keys], device=device)
        return values[:, 0], values[:, 1]

    # The loop.
    training = TrainingRun(context, engine, scheduler, loader, total_steps)
    first_step = training.start()  # restores engine, scheduler, loader position and RNG with --resume
    engine.train()
    batches = iter(loader)
    for step in range(first_step, total_steps):
        lr = training.lr
        window = training.step_window(batches, accumulation)
        # Every pair of the global batch weighs the same (and, for the SFT term, every chosen answer
        # token), however the global batch is split into micro-batches and ranks.
        per_micro_pairs = training.per_micro_batch([len(b.keys) for b in window], accumulation)
        per_micro_tokens = (training.per_micro_batch([int(answer_tokens(b.inputs["labels"][:len(b.keys)]).sum())
                                                      for b in window], accumulation) if dpo.sft_weight else None)
        step_loss = 0.0
        for batch in window:
            pairs_here = len(batch.keys)
            inputs = {k: v.to(device) for k, v in batch.inputs.items() if k != "labels"}
            labels = batch.inputs["labels"].to(device)
            policy_logps, token_counts = sequence_logps(engine(**inputs).logits, labels)
            reference_chosen, reference_rejected = reference_pair_logps(batch)
            loss, values = dpo_loss(policy_logps[:pairs_here], policy_logps[pairs_here:], reference_chosen,
                                    reference_rejected, dpo.beta, normaliser=per_micro_pairs)
            if dpo.sft_weight:  # NLL per chosen answer token of the global batch
                chosen_nll = -policy_logps[:pairs_here].sum() / per_micro_tokens
                loss = loss + dpo.sft_weight * chosen_nll
                values["sft_nll"] = float(-policy_logps[:pairs_here].detach().sum()
                                          / token_counts[:pairs_here].sum().clamp(min=1))
            if not training.finite(loss, batch.keys, step):
                training.stand_in(batch)  # left out of the step; the next steps read what they always would
                continue
            engine.backward(loss)
            engine.step()  # the optimizer steps on the last micro-batch of the accumulation
            step_loss += float(loss.detach()) / accumulation
            training.interval.add(batch, **values)
        training.end_step(step + 1, step_loss, lr)
    summary = training.finish()
    if dpo.reference == "live" and lora is not None:
        summary["reference"] = "live: the policy with its LoRA adapters disabled"
    if reference is not None:
        if _digest(reference) != reference_digest:
            raise StageFailed("the frozen reference model's parameters changed during training")
        summary["reference"] = f"live, unchanged (sha256 of rank {ranks.rank}'s parameters {reference_digest[:16]})"
    return summary


def _stored_reference(context: StageContext, engine, processor: PairProcessor, micro: int) -> dict:
    """run_dir/dpo/reference_logps.json, computed once per start model and data: a resumed run
    finds it (its policy has moved on), a changed start model or data recomputes it. Rank 0
    decides for all, so ranks never disagree about entering the collective pass."""
    path, expected = context.directory / REFERENCE_LOGPS, _reference_inputs(context)
    valid = context.ranks.is_main and _stored_reference_is_usable(path, expected)
    if not broadcast_from_rank0(valid):
        found = _precompute_reference(context, engine, processor, micro)
        if context.ranks.is_main:
            write_text_atomically(path, json.dumps({"inputs": expected, "sha256": _logps_digest(found), "logps": found}))
            logger.info("dpo: reference log-probs of %d pairs written to %s", len(found), path)
        context.barrier()
    return json.loads(path.read_text())["logps"]


def _logps_digest(logps: dict) -> str:
    return hashlib.sha256(json.dumps(logps, sort_keys=True).encode()).hexdigest()


def _stored_reference_is_usable(path: Path, expected: dict) -> bool:
    """The stored log-probs are for these inputs and intact (their sha256 is stored beside them); a
    damaged file is computed again, with a warning naming it."""
    if not path.is_file():
        return False
    try:
        stored = json.loads(path.read_text())
        intact = stored.get("sha256") == _logps_digest(stored["logps"])
    except (ValueError, KeyError, TypeError) as error:
        logger.warning("%s is damaged (%s): computing the reference log-probs again", path, error)
        return False
    if stored.get("inputs") != expected:
        return False
    if not intact:
        logger.warning("%s is damaged (its log-probs do not match the sha256 stored with them): computing the "
                       "reference log-probs again", path)
    return intact


def _digest(module: torch.nn.Module) -> str:
    """sha256 of this rank's parameter bytes (its partitions under ZeRO-3)."""
    digest = hashlib.sha256()
    for name, parameter in module.named_parameters():
        local = getattr(parameter, "ds_tensor", parameter).detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(local.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
