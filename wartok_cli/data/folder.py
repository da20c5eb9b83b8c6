"""Folders of image files: one subfolder per class, or a flat folder of unlabelled images.

Files are listed here and decoded one at a time while the shards are written, so
a large folder never sits in memory decoded. Hidden files and folders (names
starting with '.') and files without an image suffix are ignored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wartok_cli.data.images import IMAGE_SUFFIXES
from wartok_cli.errors import WartokError

SUFFIX_LIST = ", ".join(sorted(IMAGE_SUFFIXES))


@dataclass
class FolderListing:
    """The image files of one folder in sorted order, with class labels when it has class subfolders."""

    root: Path
    files: list[Path]
    labels: np.ndarray | None  # (files,) int64 index into ``classes``, or None for a flat folder
    classes: list[str] | None


def _visible(names: list[str]) -> list[str]:
    return sorted(name for name in names if not name.startswith("."))


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def _images_below(folder: Path) -> list[Path]:
    """Return every image file under ``folder``, at any depth, sorted by relative path."""
    found = []
    for directory, subfolders, names in os.walk(folder):
        subfolders[:] = _visible(subfolders)
        found += [Path(directory) / name for name in _visible(names) if _is_image(Path(directory) / name)]
    return sorted(found, key=lambda path: path.relative_to(folder).parts)


def list_folder(root: Path, field: str) -> FolderListing:
    """List one image folder; ``field`` is the recipe field that names it, for error messages.

    A folder with subfolders has one class per subfolder, sorted by name, with images at any
    depth below it. A folder without subfolders is flat and unlabelled.
    """
    if not root.is_dir():
        raise WartokError(f"data.{field}: image folder not found: {root}. Check the path in the recipe.")
    entries = _visible(os.listdir(root))
    subfolders = [name for name in entries if (root / name).is_dir()]
    loose = [name for name in entries if _is_image(root / name)]
    if subfolders and loose:
        raise WartokError(
            f"data.{field}: {root} contains both image files ({loose[0]}, ...) and subfolders ({subfolders[0]}, ...). "
            "Put every image in a class subfolder, or use a flat folder of images without subfolders."
        )
    if not subfolders:
        if not loose:
            raise WartokError(f"data.{field}: no image files ({SUFFIX_LIST}) found in {root}.")
        return FolderListing(root, [root / name for name in loose], None, None)

    files, labels = [], []
    for label, name in enumerate(subfolders):
        images = _images_below(root / name)
        if not images:
            raise WartokError(
                f"data.{field}: class folder {root / name} contains no image files ({SUFFIX_LIST}). "
                "Add images to it or remove it."
            )
        files += images
        labels += [label] * len(images)
    return FolderListing(root, files, np.asarray(labels, dtype=np.int64), subfolders)


def relabel(listing: FolderListing, classes: list[str] | None, field: str) -> FolderListing:
    """Map a validation folder's labels onto the class list of the training folder (None when flat)."""
    if classes is None and listing.classes is None:
        return listing
    if classes is None or listing.classes is None:
        layouts = ("flat", "class subfolders") if classes is None else ("class subfolders", "flat")
        raise WartokError(
            f"data.{field}: the training folder is {layouts[0]} but {listing.root} is {layouts[1]}. "
            "Give both folders the same layout."
        )
    unknown = sorted(set(listing.classes) - set(classes))
    if unknown:
        raise WartokError(
            f"data.{field}: class folders {', '.join(unknown)} in {listing.root} have no match among the "
            f"training classes ({', '.join(classes)})."
        )
    mapping = np.asarray([classes.index(name) for name in listing.classes], dtype=np.int64)
    return FolderListing(listing.root, listing.files, mapping[listing.labels], list(classes))
