"""Image sources: each returns uint8 arrays per split, before resizing.

A source returns ``{"train": (images, labels), "val": (images, labels)}`` where
images are (N, H, W) or (N, H, W, C) uint8 and labels are (N,) int64 or None.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from wartok_cli.data.idx import read_idx
from wartok_cli.errors import WartokError
from wartok_cli.recipe import DataConfig

BUNDLED_FILE = Path(__file__).parent / "bundled" / "fashion_mnist_subset.npz"

Split = tuple[np.ndarray, Optional[np.ndarray]]


def load_bundled() -> dict[str, Split]:
    """Load the bundled Fashion-MNIST subset (10,000 training and 2,000 validation images)."""
    with np.load(BUNDLED_FILE) as arrays:
        return {
            "train": (arrays["train_images"], arrays["train_labels"].astype(np.int64)),
            "val": (arrays["val_images"], arrays["val_labels"].astype(np.int64)),
        }


def _idx_split(images_path: Path, labels_path: Optional[Path]) -> Split:
    images = read_idx(images_path)
    if images.ndim not in (3, 4) or images.dtype != np.uint8:
        raise WartokError(
            f"{images_path}: expected uint8 images of shape (N, H, W) or (N, H, W, C), "
            f"got {images.dtype} {images.shape}."
        )
    if labels_path is None:
        return images, None
    labels = read_idx(labels_path).astype(np.int64)
    if labels.shape != (len(images),):
        raise WartokError(
            f"{labels_path}: expected {len(images)} labels to match {images_path}, got shape {labels.shape}."
        )
    return images, labels


def load_source(config: DataConfig) -> dict[str, Split]:
    """Load the train and validation splits that the data section names."""
    if config.source == "bundled":
        splits = load_bundled()
    elif config.source == "idx":
        splits = {
            "train": _idx_split(config.train_images, config.train_labels),
            "val": _idx_split(config.val_images, config.val_labels),
        }
    else:  # pragma: no cover - the recipe model allows only the sources above
        raise WartokError(f"Unknown data source {config.source!r}.")

    limits = {"train": config.max_train_images, "val": config.max_val_images}
    for split, (images, labels) in splits.items():
        limit = limits[split]
        if limit is not None:
            splits[split] = (images[:limit], None if labels is None else labels[:limit])
        if labels is not None and config.num_classes and labels.max(initial=0) >= config.num_classes:
            raise WartokError(
                f"The {split} labels reach {int(labels.max())}, but data.num_classes is {config.num_classes}. "
                f"Set data.num_classes to at least {int(labels.max()) + 1}."
            )
    return splits
