"""The prepare stage: a recipe's image source into WebDataset shards and a manifest."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from wartok_cli.data.shards import MANIFEST, data_hash, read_manifest, write_dataset
from wartok_cli.data.sources import load_source
from wartok_cli.errors import WartokError
from wartok_cli.recipe import Recipe

log = logging.getLogger("wartok")

# Skipped files named one by one in the log; the manifest lists all of them.
LOGGED_SKIPS = 5


def _keep_existing(target: Path, recipe: Recipe) -> None:
    """Accept a complete output only if the recipe's data settings and seed produced it."""
    manifest = read_manifest(target)
    if manifest.get("data_hash") != data_hash(recipe):
        raise WartokError(
            f"{target} contains shards written with other data settings or another seed than this recipe's. "
            "Pass --overwrite to write them again, or set data.shards_dir to another folder."
        )
    log.info("shards already complete in %s; pass --overwrite to write them again", target)


def _log_skipped(skipped: list[dict]) -> None:
    for entry in skipped[:LOGGED_SKIPS]:
        log.warning("skipped %s (%s split): %s", entry["file"], entry["split"], entry["reason"])
    if len(skipped) > LOGGED_SKIPS:
        log.warning("skipped %d more images; %s lists every skipped file", len(skipped) - LOGGED_SKIPS, MANIFEST)


def prepare(recipe: Recipe, overwrite: bool = False, download: bool = False) -> Path:
    """Write the shards of every split and return their folder.

    A complete output written from the same data settings and seed is kept unless ``overwrite``.
    ``download`` fetches the CIFAR-10 archive when the source is 'cifar10' and the file is missing.
    """
    if download and recipe.data.source != "cifar10":
        raise WartokError(
            f"--download fetches only the CIFAR-10 archive, but data.source is {recipe.data.source!r}. "
            "Remove --download, or set data.source to 'cifar10'."
        )
    target = recipe.shards_dir
    if (target / MANIFEST).is_file() and not overwrite:
        _keep_existing(target, recipe)
        return target

    source = load_source(recipe.data, recipe.seed, download=download)
    total = sum(len(split) for split in source.splits.values())
    log.info("writing %d images from the %s into %s", total, source.origin, target)
    columns = [TextColumn("[bold]prepare"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
               TimeRemainingColumn()]  # fmt: skip
    with Progress(*columns, disable=not sys.stdout.isatty()) as bar:
        task = bar.add_task("prepare", total=total)
        manifest = write_dataset(recipe, source, on_image=lambda: bar.advance(task))
    _log_skipped(manifest["skipped"])
    splits = manifest["splits"]
    counts = ", ".join(
        f"{name} {entry['count']} images in {len(entry['shards'])} shards" for name, entry in splits.items()
    )
    log.info("wrote %s (%s) and %s", target, counts, MANIFEST)
    return target
