"""The prepare stage: a recipe's image source into WebDataset shards and a manifest."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from wartok_cli.data.shards import MANIFEST, write_dataset
from wartok_cli.data.sources import load_source
from wartok_cli.recipe import Recipe

log = logging.getLogger("wartok")


def prepare(recipe: Recipe, overwrite: bool = False) -> Path:
    """Write the shards of every split; a complete output is kept unless ``overwrite``."""
    target = recipe.shards_dir
    if (target / MANIFEST).is_file() and not overwrite:
        log.info("shards already complete in %s; pass --overwrite to write them again", target)
        return target
    splits = load_source(recipe.data)
    total = sum(len(images) for images, _ in splits.values())
    source = "bundled Fashion-MNIST subset" if recipe.data.source == "bundled" else f"IDX files ({recipe.data.train_images})"
    log.info("writing %d images from the %s into %s", total, source, target)
    columns = [TextColumn("[bold]prepare"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
               TimeRemainingColumn()]
    with Progress(*columns, disable=not sys.stdout.isatty()) as bar:
        task = bar.add_task("prepare", total=total)
        write_dataset(recipe, splits, source, on_image=lambda: bar.advance(task))
    counts = ", ".join(f"{split} {len(images)}" for split, (images, _) in splits.items())
    log.info("wrote %s (%s images) and %s", target, counts, MANIFEST)
    return target
