"""Image sources: the candidate images of the train and validation splits, in a seeded order.

A source lists its images without decoding them. The shard writer loads one
image at a time through ``Split.load``, so an image folder is decoded lazily and
an array source is never copied. Sources:

- ``bundled``: the Fashion-MNIST subset shipped with wartok;
- ``idx``: MNIST-format IDX files (plain or gzip);
- ``folder``: image files, one subfolder per class or a flat folder;
- ``npz``: a numpy ``.npz`` file with an image array and optional labels;
- ``cifar10``: the CIFAR-10 python archive (see ``cifar.py``).

Every split is put in an order drawn from the recipe's seed before
``max_train_images`` and ``max_val_images`` cut it, so a cut keeps a random
subset instead of, for example, the first class of a sorted folder.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from wartok_cli.data import cifar
from wartok_cli.data.folder import FolderListing, list_folder, relabel
from wartok_cli.data.idx import read_idx
from wartok_cli.data.images import array_to_image, open_image
from wartok_cli.errors import WartokError
from wartok_cli.recipe import DataConfig

log = logging.getLogger("wartok")

BUNDLED_FILE = Path(__file__).parent / "bundled" / "fashion_mnist_subset.npz"
BUNDLED_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

# Independent random streams drawn from the recipe's seed.
_FRACTION_STREAM = 0
_ORDER_STREAMS = {"train": 1, "val": 2}


@dataclass(frozen=True)
class Split:
    """One split: items of a source (array rows or files) and the order in which the shards hold them."""

    load_item: Callable[[int], Image.Image]  # item index -> decoded image; may raise UndecodableImage
    name_item: Callable[[int], str]  # item index -> the file (and row) it comes from
    labels: np.ndarray | None  # (items,) int64 label of every item, or None when unlabelled
    order: np.ndarray  # item indices, in shard order

    def __len__(self) -> int:
        return len(self.order)

    def load(self, position: int) -> Image.Image:
        return self.load_item(int(self.order[position]))

    def name(self, position: int) -> str:
        return self.name_item(int(self.order[position]))

    def label(self, position: int) -> int | None:
        return None if self.labels is None else int(self.labels[self.order[position]])

    def ordered_labels(self) -> np.ndarray | None:
        """Return the labels in shard order, or None when unlabelled."""
        return None if self.labels is None else self.labels[self.order]

    def take(self, positions: np.ndarray) -> Split:
        """Return the split restricted to, and reordered by, ``positions``."""
        return replace(self, order=self.order[np.asarray(positions, dtype=np.int64)])


@dataclass
class Source:
    """A loaded source: its kind, where it came from, its splits and its class names where known."""

    kind: str
    origin: str
    splits: dict[str, Split]
    classes: list[str] | None = None


def _check_array(images: np.ndarray, labels: np.ndarray | None, origin: str) -> None:
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] > 4):
        raise WartokError(
            f"{origin}: expected uint8 images of shape (N, H, W) or (N, H, W, C) with C from 1 to 4, "
            f"got {images.dtype} {images.shape}."
        )
    if labels is None:
        return
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise WartokError(f"{origin}: expected {len(images)} integer labels, got {labels.dtype} {labels.shape}.")
    if labels.min(initial=0) < 0:
        raise WartokError(f"{origin}: labels must be 0 or more, found {int(labels.min())}.")


def array_split(images: np.ndarray, labels: np.ndarray | None, origin: str) -> Split:
    """Wrap an image array (N, H, W[, C]) uint8 and its labels (N,) as a split."""
    _check_array(images, labels, origin)
    return Split(
        load_item=lambda index: array_to_image(images[index]),
        name_item=lambda index: f"{origin}[{index}]",
        labels=None if labels is None else labels.astype(np.int64),
        order=np.arange(len(images)),
    )


def file_split(listing: FolderListing, draft_side: int | None) -> Split:
    """Wrap the files of a folder listing as a split; each file is decoded when it is loaded."""
    files = listing.files
    return Split(
        load_item=lambda index: open_image(files[index], draft_side),
        name_item=lambda index: str(files[index]),
        labels=listing.labels,
        order=np.arange(len(files)),
    )


def load_bundled() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Load the bundled Fashion-MNIST subset (10,000 training and 2,000 validation images) as arrays."""
    with np.load(BUNDLED_FILE) as arrays:
        return {
            "train": (arrays["train_images"], arrays["train_labels"].astype(np.int64)),
            "val": (arrays["val_images"], arrays["val_labels"].astype(np.int64)),
        }


def _bundled_source() -> Source:
    arrays = load_bundled()
    splits = {
        name: array_split(images, labels, f"{BUNDLED_FILE.name}:{name}") for name, (images, labels) in arrays.items()
    }
    return Source("bundled", "bundled Fashion-MNIST subset", splits, list(BUNDLED_CLASSES))


def _idx_split(images_path: Path, labels_path: Path | None) -> Split:
    images = read_idx(images_path)
    labels = None if labels_path is None else read_idx(labels_path)
    if labels is not None and labels.shape != (len(images),):
        raise WartokError(
            f"{labels_path}: expected {len(images)} labels to match {images_path}, got shape {labels.shape}."
        )
    return array_split(images, labels, str(images_path))


def _idx_source(config: DataConfig) -> Source:
    splits = {
        "train": _idx_split(config.train_images, config.train_labels),
        "val": _idx_split(config.val_images, config.val_labels),
    }
    return Source("idx", f"IDX files {config.train_images} and {config.val_images}", splits)


def _folder_source(config: DataConfig) -> Source:
    # JPEGs may decode at a reduced scale only when they are resized afterwards anyway.
    draft_side = config.resolution if config.fit == "resize" else None
    train = list_folder(config.path, "path")
    splits = {"train": file_split(train, draft_side)}
    origin = f"image folder {config.path}"
    if config.val_path is not None:
        val = relabel(list_folder(config.val_path, "val_path"), train.classes, "val_path")
        splits["val"] = file_split(val, draft_side)
        origin += f" and {config.val_path}"
    return Source("folder", origin, splits, train.classes)


def _read_npz(path: Path, field: str, config: DataConfig) -> Split:
    """Read the image array and the optional label array of one npz file."""
    if not path.is_file():
        raise WartokError(f"data.{field}: npz file not found: {path}. Check the path in the recipe.")
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise WartokError(f"data.{field}: failed to read {path} as npz: {error}") from error
    if not isinstance(arrays, np.lib.npyio.NpzFile):
        raise WartokError(f"data.{field}: {path} contains a single array, not an npz archive. Save it with np.savez.")
    with arrays:
        keys = list(arrays.files)
        if config.images_key not in keys:
            raise WartokError(
                f"data.images_key: {path} has no array named {config.images_key!r}; it contains {keys}. "
                "Set data.images_key to the name of the image array."
            )
        has_labels = config.labels_key is not None and config.labels_key in keys
        if config.labels_key is not None and not has_labels:
            log.info("%s has no array named %r, so its images are unlabelled", path, config.labels_key)
        try:
            images = arrays[config.images_key]
            labels = arrays[config.labels_key] if has_labels else None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise WartokError(f"data.{field}: failed to read the arrays of {path}: {error}") from error
    return array_split(images, labels, f"{path}:{config.images_key}")


def _npz_source(config: DataConfig) -> Source:
    splits = {"train": _read_npz(config.path, "path", config)}
    origin = f"npz file {config.path}"
    if config.val_path is not None:
        splits["val"] = _read_npz(config.val_path, "val_path", config)
        if (splits["val"].labels is None) != (splits["train"].labels is None):
            raise WartokError(
                f"data.val_path: {config.val_path} and {config.path} must both have labels "
                f"(array {config.labels_key!r}) or both have none."
            )
        origin += f" and {config.val_path}"
    return Source("npz", origin, splits)


def _cifar10_source(config: DataConfig, download: bool) -> Source:
    archive = cifar.locate_archive(config.path, download)
    arrays = cifar.read_archive(archive)
    splits = {
        "train": array_split(arrays.train_images, arrays.train_labels, f"{archive}:data_batch"),
        "val": array_split(arrays.val_images, arrays.val_labels, f"{archive}:{cifar.TEST_BATCH}"),
    }
    return Source("cifar10", f"CIFAR-10 archive {archive}", splits, arrays.classes)


def split_by_fraction(pool: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Split a pool into (train, val) with ``fraction`` of every class in val, drawn from the seed."""
    rng = np.random.default_rng([seed, _FRACTION_STREAM])
    labels = pool.ordered_labels()
    if labels is None:
        groups = [np.arange(len(pool))]
    else:
        groups = [np.flatnonzero(labels == value) for value in np.unique(labels)]
    is_val = np.zeros(len(pool), dtype=bool)
    for group in groups:
        count = int(np.floor(fraction * len(group) + 0.5))
        is_val[rng.permutation(group)[:count]] = True
    return pool.take(np.flatnonzero(~is_val)), pool.take(np.flatnonzero(is_val))


def _shuffled(split: Split, seed: int, name: str) -> Split:
    return split.take(np.random.default_rng([seed, _ORDER_STREAMS[name]]).permutation(len(split)))


def _check_labels(source: Source, config: DataConfig) -> None:
    if not config.num_classes:
        return
    if source.classes is not None and len(source.classes) > config.num_classes:
        raise WartokError(
            f"The {source.origin} has {len(source.classes)} classes, but data.num_classes is {config.num_classes}. "
            f"Set data.num_classes to at least {len(source.classes)}."
        )
    for name, split in source.splits.items():
        labels = split.ordered_labels()
        if labels is not None and labels.max(initial=0) >= config.num_classes:
            raise WartokError(
                f"The {name} labels reach {int(labels.max())}, but data.num_classes is {config.num_classes}. "
                f"Set data.num_classes to at least {int(labels.max()) + 1}."
            )


def load_source(config: DataConfig, seed: int, download: bool = False) -> Source:
    """Load the source that the data section names, split, ordered by ``seed`` and cut to the limits."""
    if config.source == "bundled":
        source = _bundled_source()
    elif config.source == "idx":
        source = _idx_source(config)
    elif config.source == "folder":
        source = _folder_source(config)
    elif config.source == "npz":
        source = _npz_source(config)
    elif config.source == "cifar10":
        source = _cifar10_source(config, download)
    else:  # pragma: no cover - the recipe model allows only the sources above
        raise WartokError(f"Unknown data source {config.source!r}.")

    if "val" not in source.splits:
        train, val = split_by_fraction(source.splits["train"], config.val_fraction, seed)
        for name, split in (("train", train), ("val", val)):
            if not len(split):
                raise WartokError(
                    f"data.val_fraction {config.val_fraction} of {len(source.splits['train'])} images leaves "
                    f"the {name} split empty. Change data.val_fraction, or name a validation source in data.val_path."
                )
        source.splits = {"train": train, "val": val}

    limits = {"train": config.max_train_images, "val": config.max_val_images}
    for name in ("train", "val"):
        split = _shuffled(source.splits[name], seed, name)
        if limits[name] is not None:
            split = split.take(np.arange(min(limits[name], len(split))))
        if not len(split):
            raise WartokError(f"The {name} split of the {source.origin} has no images.")
        source.splits[name] = split
    _check_labels(source, config)
    return source
