"""Writing WebDataset shards and their manifest.

Shards are written into a temporary sibling folder that is renamed to the final
name only when every shard and the manifest are complete, so an interrupted
``prepare`` leaves no half-written output behind. Shard bytes depend only on
the images and the recipe (tar entries carry a fixed mtime), so preparing the
same data twice gives the same sha256 for every shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import webdataset as wds
from PIL import Image

from wartok_cli.data.images import UndecodableImage, fit_image, to_channels
from wartok_cli.data.sources import Source, Split
from wartok_cli.errors import WartokError
from wartok_cli.recipe import DataConfig, Recipe

MANIFEST = "manifest.json"
# Automatic sharding (data.samples_per_shard null): the loader gives every (process, worker)
# slot a strided share of the shard list, so at least 8 shards keep up to 8 slots busy.
AUTO_MIN_SHARDS = 8
AUTO_MAX_SAMPLES_PER_SHARD = 1000
# Data fields that only the loader reads: changing them leaves the shards valid.
LOADER_FIELDS = frozenset({"shards_dir", "num_workers", "shuffle_buffer"})


def plan_shards(count: int, samples_per_shard: int | None) -> list[int]:
    """Return the number of candidate images of each shard of a split of ``count`` images."""
    if samples_per_shard is not None:
        full, rest = divmod(count, samples_per_shard)
        return [samples_per_shard] * full + ([rest] if rest else [])
    shards = max(min(AUTO_MIN_SHARDS, count), math.ceil(count / AUTO_MAX_SAMPLES_PER_SHARD))
    base, extra = divmod(count, shards)
    return [base + 1] * extra + [base] * (shards - extra)


def data_hash(recipe: Recipe) -> str:
    """Return a short sha256 of everything that decides the shards' content: the data fields and the seed."""
    fields = recipe.data.model_dump(mode="json", exclude=set(LOADER_FIELDS))
    text = json.dumps({"data": fields, "seed": recipe.seed}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode_png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sample(split: Split, position: int, name: str, data: DataConfig) -> dict:
    """Decode, convert and fit one image into a WebDataset sample; raises UndecodableImage."""
    picture = to_channels(split.load(position), data.channels)
    sample = {"__key__": f"{name}{position:08d}", "png": encode_png(fit_image(picture, data.resolution, data.fit))}
    label = split.label(position)
    if label is not None:
        sample["cls"] = label
    return sample


def write_split(
    folder: Path,
    name: str,
    split: Split,
    data: DataConfig,
    on_image: Callable[[], None] = lambda: None,
) -> tuple[dict, list[dict]]:
    """Write one split as numbered shards, one image at a time.

    Returns the split's manifest entry and the images skipped because they could not be
    decoded. ``on_image`` runs after every candidate image, written or skipped.
    """
    shards, skipped, per_class = [], [], Counter()
    start = 0
    for size in plan_shards(len(split), data.samples_per_shard):
        shard = f"{name}-{len(shards):06d}.tar"
        written = 0
        with wds.TarWriter(str(folder / shard), mtime=0) as writer:
            for position in range(start, start + size):
                try:
                    sample = _sample(split, position, name, data)
                except UndecodableImage as error:
                    skipped.append({"split": name, "file": split.name(position), "reason": str(error)})
                else:
                    writer.write(sample)
                    written += 1
                    if "cls" in sample:
                        per_class[sample["cls"]] += 1
                on_image()
        start += size
        if written:
            shards.append({"name": shard, "count": written, "sha256": _sha256(folder / shard)})
        else:
            (folder / shard).unlink()

    count = sum(shard["count"] for shard in shards)
    if not count:
        raise WartokError(
            f"None of the {len(split)} {name} images could be decoded; the first, "
            f"{skipped[0]['file']}, failed with {skipped[0]['reason']}"
        )
    entry = {
        "count": count,
        "skipped": len(skipped),
        "per_class": {str(label): per_class[label] for label in sorted(per_class)},
        "shards": shards,
    }
    return entry, skipped


def write_dataset(recipe: Recipe, source: Source, on_image: Callable[[], None] = lambda: None) -> dict:
    """Write every split and the manifest into a temporary folder, then rename it into place.

    A previous output at the same place is replaced only after the new one is complete.
    Returns the manifest.
    """
    target = recipe.shards_dir
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        manifest = {
            "source": source.kind,
            "origin": source.origin,
            "resolution": recipe.data.resolution,
            "channels": recipe.data.channels,
            "fit": recipe.data.fit,
            "num_classes": recipe.data.num_classes,
            "classes": source.classes,
            "seed": recipe.seed,
            "recipe_hash": recipe.hash(),
            "data_hash": data_hash(recipe),
            "splits": {},
            "skipped": [],
        }
        for name, split in source.splits.items():
            entry, skipped = write_split(staging, name, split, recipe.data, on_image)
            manifest["splits"][name] = entry
            manifest["skipped"] += skipped
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _replace(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an old ``target`` is moved aside first and deleted last."""
    if not target.exists():
        staging.rename(target)
        return
    old = staging.with_name(staging.name.replace(".tmp-", ".old-", 1))
    target.rename(old)
    try:
        staging.rename(target)
    except BaseException:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(folder: Path) -> dict:
    """Read the manifest of a shard folder, or explain how to create one."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise WartokError(f"No shards found: {path} is missing. Run `wartok prepare RECIPE` first.")
    return json.loads(path.read_text())
