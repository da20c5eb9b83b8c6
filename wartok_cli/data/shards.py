"""Writing WebDataset shards and their manifest.

Shards are written into a temporary sibling folder that is renamed to the final
name only when every shard and the manifest are complete, so an interrupted
``prepare`` leaves no half-written output behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import webdataset as wds
from PIL import Image

from wartok_cli.recipe import Recipe

MANIFEST = "manifest.json"


def fit_image(image: np.ndarray, resolution: int, channels: int, fit: str) -> Image.Image:
    """Convert one uint8 array to a square PIL image of the given side and channel count."""
    picture = Image.fromarray(image if image.ndim == 2 or image.shape[-1] != 1 else image[..., 0])
    picture = picture.convert("L" if channels == 1 else "RGB")
    width, height = picture.size
    if fit == "resize":
        scale = resolution / min(width, height)
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        picture = picture.resize(size, Image.Resampling.BICUBIC)
        width, height = picture.size
    # Centre-crop what is larger than the target, and centre-pad with black what is smaller.
    canvas = Image.new(picture.mode, (resolution, resolution))
    canvas.paste(picture, ((resolution - width) // 2, (resolution - height) // 2))
    return canvas


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_split(
    folder: Path,
    split: str,
    images: np.ndarray,
    labels: Optional[np.ndarray],
    recipe: Recipe,
    on_image: Callable[[], None] = lambda: None,
) -> list[dict]:
    """Write one split as numbered shards; return the manifest entry of each shard."""
    data = recipe.data
    shards = []
    count = len(images)
    for shard_index, start in enumerate(range(0, count, data.samples_per_shard)):
        name = f"{split}-{shard_index:06d}.tar"
        stop = min(start + data.samples_per_shard, count)
        with wds.TarWriter(str(folder / name)) as writer:
            for index in range(start, stop):
                buffer = io.BytesIO()
                fit_image(images[index], data.resolution, data.channels, data.fit).save(buffer, format="PNG")
                sample = {"__key__": f"{split}{index:08d}", "png": buffer.getvalue()}
                if labels is not None:
                    sample["cls"] = int(labels[index])
                writer.write(sample)
                on_image()
        shards.append({"name": name, "count": stop - start, "sha256": _sha256(folder / name)})
    return shards


def write_dataset(
    recipe: Recipe,
    splits: dict[str, tuple[np.ndarray, Optional[np.ndarray]]],
    source: str,
    on_image: Callable[[], None] = lambda: None,
) -> Path:
    """Write every split and the manifest into a temporary folder, then rename it into place."""
    target = recipe.shards_dir
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        manifest = {
            "source": source,
            "resolution": recipe.data.resolution,
            "channels": recipe.data.channels,
            "num_classes": recipe.data.num_classes,
            "seed": recipe.seed,
            "recipe_hash": recipe.hash(),
            "splits": {},
        }
        for split, (images, labels) in splits.items():
            shards = write_split(staging, split, images, labels, recipe, on_image)
            per_class = Counter(int(label) for label in labels) if labels is not None else {}
            manifest["splits"][split] = {
                "count": len(images),
                "per_class": {str(label): per_class[label] for label in sorted(per_class)},
                "shards": shards,
            }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def read_manifest(folder: Path) -> dict:
    """Read the manifest of a shard folder, or explain how to create one."""
    from wartok_cli.errors import WartokError

    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise WartokError(f"No shards found: {path} is missing. Run `wartok prepare RECIPE` first.")
    return json.loads(path.read_text())
