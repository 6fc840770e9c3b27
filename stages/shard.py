"""Shard stage: the recipe's dataset cards -> webdataset tars + manifest.json in run_dir/shard.

    check   every card loads, its annotation file and media root exist (before any stage runs)
    shard   pipeline.data.sharding.run_shard: units of records over ranks and processes, each
            record's media decoded to prove it is usable, a video with every decoder the
            recipe's training may read it with (data.decoder; "auto": PyAV and decord, as an
            Ascend and a GPU node would), rejects listed with their reason
    result  manifest.json (rank 0), which the training stages and the loader read

The work itself lives in pipeline/data/sharding.py, which tests and benchmarks call directly.
"""

from __future__ import annotations

import logging

from pipeline.data.cards import load_card
from pipeline.data.media import validation_decoders
from pipeline.data.shard_files import mixture_weights, never_drawn, never_drawn_warning
from pipeline.data.sharding import run_shard, settings_fingerprint, source_fingerprint
from pipeline.layout import MANIFEST
from pipeline.recipe import RecipeError

logger = logging.getLogger(__name__)

DISTRIBUTED = True  # units of work are spread over ranks


def inputs(recipe, world_size: int) -> dict:
    """The shard section and every card's source fingerprint (card, annotations, media files)."""
    sources = {}
    for path in recipe.data.cards:
        card = load_card(path, recipe.data.variables)
        card.check_paths()
        sources[path] = source_fingerprint(card, recipe.shard.limit_per_card)
    found = {"shard": settings_fingerprint(recipe.data.cards, "", recipe.shard, recipe.data.variables),
             "sources": sources}
    try:
        decoders = validation_decoders(recipe.data.decoder)
    except ValueError as error:  # decord asked for and not installed on the host that shards
        raise RecipeError(f"{recipe.source}: data.decoder: {error}; the shard stage checks videos with it") from None
    if decoders != ["pyav"]:  # what proves a video usable is part of what the shards are
        found["decoders"] = decoders
    return found


def run(context) -> dict:
    recipe = context.recipe
    decoders = validation_decoders(recipe.data.decoder)
    if recipe.data.decoder == "auto" and "decord" not in decoders and context.ranks.is_main:
        logger.warning("shard: data.decoder is auto but decord is not installed here: videos are checked with "
                       "PyAV only, and a GPU node's decord may still refuse some (pip install decord to check both)")
    manifest = run_shard(recipe.data.cards, context.directory, recipe.shard, recipe.data.variables,
                         context.ranks.rank, context.ranks.world_size, barrier=context.barrier, decoders=decoders)
    if not context.ranks.is_main:
        return {}
    summary = {"samples": manifest["counts"], "rejected": len(manifest["rejected"]),
               "manifest": str(context.directory / MANIFEST)}
    if recipe.sft is not None:  # what SFT's mixture will never draw
        manifest_path = context.directory / MANIFEST
        undrawn = never_drawn(manifest_path, mixture_weights(manifest_path, recipe.data.mixture, recipe.data.weights))
        if undrawn:
            logger.warning("shard: %s", never_drawn_warning(undrawn))
            summary["sharded, never drawn"] = undrawn
    return summary
