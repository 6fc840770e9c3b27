"""Shard stage: the recipe's dataset cards -> webdataset tars + manifest.json in run_dir/shard.

    check   every card loads, its annotation file and media root exist (before any stage runs)
    shard   pipeline.data.sharding.run_shard: units of records over ranks and processes, each
            record's media decoded once to prove it is usable, rejects listed with their reason
    result  manifest.json (rank 0), which the training stages and the loader read

The work itself lives in pipeline/data/sharding.py, which tests and benchmarks call directly.
"""

from __future__ import annotations

import logging

from pipeline.data.cards import load_card
from pipeline.data.shard_files import never_drawn, never_drawn_warning
from pipeline.data.sharding import run_shard, settings_fingerprint, source_fingerprint
from pipeline.layout import MANIFEST

logger = logging.getLogger(__name__)

DISTRIBUTED = True  # units of work are spread over ranks


def inputs(recipe, world_size: int) -> dict:
    """The shard section and every card's source fingerprint (card, annotations, media files)."""
    sources = {}
    for path in recipe.data.cards:
        card = load_card(path, recipe.data.variables)
        card.check_paths()
        sources[path] = source_fingerprint(card, recipe.shard.limit_per_card)
    return {"shard": settings_fingerprint(recipe.data.cards, "", recipe.shard, recipe.data.variables),
            "sources": sources}


def run(context) -> dict:
    recipe = context.recipe
    manifest = run_shard(recipe.data.cards, context.directory, recipe.shard, recipe.data.variables,
                         context.ranks.rank, context.ranks.world_size, barrier=context.barrier)
    if not context.ranks.is_main:
        return {}
    summary = {"samples": manifest["counts"], "rejected": len(manifest["rejected"]),
               "manifest": str(context.directory / MANIFEST)}
    if recipe.sft is not None and recipe.data.mixture == "weights":  # what SFT's weights will never draw
        undrawn = never_drawn(context.directory / MANIFEST, recipe.data.weights)
        if undrawn:
            logger.warning("shard: %s", never_drawn_warning(undrawn))
            summary["sharded, never drawn"] = undrawn
    return summary
