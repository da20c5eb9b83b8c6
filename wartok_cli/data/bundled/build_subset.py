"""Build the bundled Fashion-MNIST subset from the full IDX files.

Run once by a maintainer, not at install time:

    python -m wartok_cli.data.bundled.build_subset /usr/share/datasets/fashion-mnist

On Debian the full set (60,000 training and 10,000 test images) is the package
``dataset-fashion-mnist``. The subset takes the first images of each class in
file order, so it is class-balanced and rebuilds byte for byte.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from wartok_cli.data.idx import read_idx

TRAIN_PER_CLASS = 1000
VAL_PER_CLASS = 200
OUTPUT = Path(__file__).with_name("fashion_mnist_subset.npz")


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Return the sorted indices of the first ``per_class`` images of every class."""
    chosen = [np.flatnonzero(labels == label)[:per_class] for label in np.unique(labels)]
    return np.sort(np.concatenate(chosen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="folder with the four Fashion-MNIST .gz files")
    args = parser.parse_args()

    train_images = read_idx(args.folder / "train-images-idx3-ubyte.gz")
    train_labels = read_idx(args.folder / "train-labels-idx1-ubyte.gz")
    test_images = read_idx(args.folder / "t10k-images-idx3-ubyte.gz")
    test_labels = read_idx(args.folder / "t10k-labels-idx1-ubyte.gz")

    train_index = first_per_class(train_labels, TRAIN_PER_CLASS)
    val_index = first_per_class(test_labels, VAL_PER_CLASS)
    np.savez_compressed(
        OUTPUT,
        train_images=train_images[train_index],
        train_labels=train_labels[train_index],
        val_images=test_images[val_index],
        val_labels=test_labels[val_index],
    )
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size / 1e6:.1f} MB): "
          f"{len(train_index)} training and {len(val_index)} validation images")


if __name__ == "__main__":
    main()
