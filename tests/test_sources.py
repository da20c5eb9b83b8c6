"""Every data source of `wartok prepare`, run through the CLI on files the tests write, and read back.

Sources: the bundled subset, a folder with class subfolders (odd image modes, a corrupt and a
truncated file), a flat folder, IDX files (plain and gzip), a CIFAR-10 python archive in the
original format, and npz files. Each run writes real shards, which the real loader reads back.
"""

from __future__ import annotations

import os
import pickle
import tarfile
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import describe, invoke
from PIL import Image
from test_idx import idx_bytes, write_idx

from wartok_cli.data import cifar
from wartok_cli.data.images import UndecodableImage, open_image, to_channels
from wartok_cli.data.loader import make_loader
from wartok_cli.data.sources import BUNDLED_CLASSES
from wartok_cli.errors import WartokError

RESOLUTION = 16


# Helpers shared with test_prepare.py --------------------------------------------------------


def write_recipe(root: Path, data: dict, seed: int = 0) -> Path:
    """Write a recipe whose data section is ``data`` on top of 16-pixel images; return its path."""
    recipe = {
        "output_dir": str(root / "runs"),
        "seed": seed,
        "data": {"resolution": RESOLUTION, "num_workers": 0, **data},
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_prepare(root: Path, data: dict, *options: str, seed: int = 0):
    """Write a recipe into ``root`` and run `wartok prepare` on it; return (result, shards folder)."""
    result = invoke("prepare", str(write_recipe(root, data, seed)), *options)
    return result, root / "runs" / "data"


def read_manifest(shards_dir: Path) -> dict:
    return yaml.safe_load((shards_dir / "manifest.json").read_text())


def read_split(shards_dir: Path, split: str, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a whole split with the loader: images (N, C, H, W) in [-1, 1] and labels (N,)."""
    loader = make_loader(shards_dir, split, batch_size=16, channels=channels, train=False)
    batches = list(loader)
    return torch.cat([batch["images"] for batch in batches]), torch.cat([batch["labels"] for batch in batches])


def stored_modes(shards_dir: Path, split: str) -> set[tuple[str, tuple[int, int]]]:
    """Return the (mode, size) of every PNG stored in a split's shards, read without the loader."""
    found = set()
    for shard in read_manifest(shards_dir)["splits"][split]["shards"]:
        with tarfile.open(shards_dir / shard["name"]) as archive:
            for member in archive.getmembers():
                if member.name.endswith(".png"):
                    picture = Image.open(BytesIO(archive.extractfile(member).read()))
                    found.add((picture.mode, picture.size))
    return found


def noise(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    shape = (height, width) if channels == 1 else (height, width, channels)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


# Image files of every mode a folder may hold --------------------------------------------------


def save_odd_modes(folder: Path) -> list[str]:
    """Write one file per unusual mode into ``folder``; return their names."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(noise(20, 24))
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    palette = rgb.convert("P")
    palette.save(folder / "palette.png")
    palette.save(folder / "palette-transparent.png", transparency=0)
    Image.fromarray(noise(20, 24, 1).astype(np.uint16) * 257).save(folder / "gray16.png")
    Image.fromarray(noise(20, 24, 1).astype(np.int32) * 257).save(folder / "int32.tif")
    Image.fromarray(noise(20, 24, 4)).save(folder / "rgba.png")
    Image.fromarray(noise(20, 24, 2)).save(folder / "la.png")
    Image.fromarray(noise(20, 24, 1)).save(folder / "gray.png")
    rgb.save(folder / "rgb.webp")
    rgb.save(folder / "rgb.gif")
    rgb.save(folder / "rgb.bmp")
    return sorted(path.name for path in folder.iterdir())


def save_corrupt(folder: Path) -> None:
    """Write a file that is no image and a JPEG cut in half."""
    (folder / "corrupt.png").write_bytes(b"this is not an image\n" * 8)
    buffer = BytesIO()
    Image.fromarray(noise(64, 64, seed=1)).save(buffer, format="JPEG", quality=95)
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def save_plain(folder: Path, prefix: str, count: int, suffix: str = ".png", seed: int = 0) -> None:
    """Write ``count`` RGB images of varied sizes, some landscape and some portrait."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        height, width = (12 + 3 * index, 30) if index % 2 else (28, 10 + 2 * index)
        Image.fromarray(noise(height, width, seed=seed + index)).save(folder / f"{prefix}{index}{suffix}")


# Class folder and expected facts: apple 10 files, bird 6 + 11 odd modes, car 6 + 2 damaged.
CLASS_NAMES = ["apple", "bird", "car"]
CANDIDATES = {"apple": 10, "bird": 17, "car": 8}
DAMAGED = {"corrupt.png", "truncated.jpg"}


def write_class_folder(root: Path) -> Path:
    save_plain(root / "apple", "a", 6)
    Image.fromarray(noise(30, 30)).save(root / "apple" / "UPPER.JPG")
    Image.fromarray(noise(30, 30)).save(root / "apple" / "other.JPEG")
    Image.fromarray(noise(30, 30, 1)).save(root / "apple" / "lower.tiff")
    save_plain(root / "apple" / "nested", "deep", 1)
    save_plain(root / "bird", "b", 6, suffix=".jpeg")
    save_odd_modes(root / "bird")
    save_plain(root / "car", "c", 6)
    save_corrupt(root / "car")
    (root / "car" / "notes.txt").write_text("not an image, ignored")
    Image.fromarray(noise(8, 8)).save(root / "car" / ".hidden.png")
    (root / ".cache").mkdir()
    return root


@pytest.fixture(scope="module")
def class_folder_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("class-folder")
    images = write_class_folder(root / "images")
    data = {"source": "folder", "path": str(images), "val_fraction": 0.25, "channels": 3, "num_classes": 3}
    result, shards_dir = run_prepare(root, data)
    return result, shards_dir


def test_class_folder_exits_zero(class_folder_run):
    result, _ = class_folder_run
    assert result.exit_code == 0, describe(result)


def test_class_folder_classes(class_folder_run):
    _, shards_dir = class_folder_run
    assert read_manifest(shards_dir)["classes"] == CLASS_NAMES


def test_class_folder_skips_damaged(class_folder_run):
    _, shards_dir = class_folder_run
    skipped = read_manifest(shards_dir)["skipped"]
    assert {Path(entry["file"]).name for entry in skipped} == DAMAGED


def test_class_folder_skip_reasons(class_folder_run):
    _, shards_dir = class_folder_run
    reasons = {Path(entry["file"]).name: entry["reason"] for entry in read_manifest(shards_dir)["skipped"]}
    assert "cannot identify image" in reasons["corrupt.png"]
    assert "truncated" in reasons["truncated.jpg"]


def test_class_folder_counts(class_folder_run):
    _, shards_dir = class_folder_run
    splits = read_manifest(shards_dir)["splits"]
    assert splits["train"]["count"] + splits["val"]["count"] == sum(CANDIDATES.values()) - len(DAMAGED)


def test_class_folder_per_class(class_folder_run):
    _, shards_dir = class_folder_run
    splits = read_manifest(shards_dir)["splits"]
    totals = {name: splits["train"]["per_class"].get(str(label), 0) + splits["val"]["per_class"].get(str(label), 0)
              for label, name in enumerate(CLASS_NAMES)}  # fmt: skip
    assert totals == {"apple": 10, "bird": 17, "car": 6}


def test_class_folder_val_has_every_class(class_folder_run):
    _, shards_dir = class_folder_run
    per_class = read_manifest(shards_dir)["splits"]["val"]["per_class"]
    assert sorted(per_class) == ["0", "1", "2"]


def test_class_folder_stored_rgb(class_folder_run):
    _, shards_dir = class_folder_run
    assert stored_modes(shards_dir, "train") == {("RGB", (RESOLUTION, RESOLUTION))}


def test_class_folder_loader_reads_all(class_folder_run):
    _, shards_dir = class_folder_run
    manifest = read_manifest(shards_dir)
    images, labels = read_split(shards_dir, "train", channels=3)
    assert images.shape == (manifest["splits"]["train"]["count"], 3, RESOLUTION, RESOLUTION)
    assert set(labels.tolist()) <= {0, 1, 2}


def test_class_folder_value_range(class_folder_run):
    _, shards_dir = class_folder_run
    images, _ = read_split(shards_dir, "val", channels=3)
    assert float(images.min()) >= -1.0
    assert float(images.max()) <= 1.0


def test_class_folder_separate_val(tmp_path):
    save_plain(tmp_path / "train" / "cat", "c", 4)
    save_plain(tmp_path / "train" / "dog", "d", 4)
    save_plain(tmp_path / "val" / "dog", "v", 3)
    data = {"source": "folder", "path": str(tmp_path / "train"), "val_path": str(tmp_path / "val"), "channels": 3}
    result, shards_dir = run_prepare(tmp_path, data)
    assert result.exit_code == 0, describe(result)
    # The validation folder has only 'dog', which keeps the training folder's label 1.
    assert read_manifest(shards_dir)["splits"]["val"]["per_class"] == {"1": 3}


# Flat folder --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flat_folder_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("flat-folder")
    save_plain(root / "train", "img", 12)
    save_plain(root / "val", "img", 5, suffix=".jpg", seed=50)
    data = {"source": "folder", "path": str(root / "train"), "val_path": str(root / "val"), "channels": 1}
    return run_prepare(root, data)


def test_flat_folder_exits_zero(flat_folder_run):
    result, _ = flat_folder_run
    assert result.exit_code == 0, describe(result)


def test_flat_folder_no_classes(flat_folder_run):
    _, shards_dir = flat_folder_run
    manifest = read_manifest(shards_dir)
    assert manifest["classes"] is None
    assert manifest["splits"]["train"]["per_class"] == {}


@pytest.mark.parametrize("split, count", [("train", 12), ("val", 5)])
def test_flat_folder_counts(flat_folder_run, split, count):
    _, shards_dir = flat_folder_run
    assert read_manifest(shards_dir)["splits"][split]["count"] == count


def test_flat_folder_stored_grayscale(flat_folder_run):
    _, shards_dir = flat_folder_run
    assert stored_modes(shards_dir, "train") == {("L", (RESOLUTION, RESOLUTION))}


def test_flat_folder_loader_unlabelled(flat_folder_run):
    _, shards_dir = flat_folder_run
    images, labels = read_split(shards_dir, "train", channels=1)
    assert images.shape == (12, 1, RESOLUTION, RESOLUTION)
    assert set(labels.tolist()) == {-1}


# Bundled subset -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundled")
    return run_prepare(root, {"source": "bundled", "max_train_images": 300, "max_val_images": 40, "fit": "pad"})


def test_bundled_exits_zero(bundled_run):
    result, _ = bundled_run
    assert result.exit_code == 0, describe(result)


@pytest.mark.parametrize("split, count", [("train", 300), ("val", 40)])
def test_bundled_counts(bundled_run, split, count):
    _, shards_dir = bundled_run
    assert read_manifest(shards_dir)["splits"][split]["count"] == count


def test_bundled_classes(bundled_run):
    _, shards_dir = bundled_run
    assert read_manifest(shards_dir)["classes"] == list(BUNDLED_CLASSES)


def test_bundled_cut_spans_classes(bundled_run):
    # The cut to 40 images is a seeded random subset, not the first images of the file.
    _, shards_dir = bundled_run
    assert len(read_manifest(shards_dir)["splits"]["val"]["per_class"]) >= 5


def test_bundled_loader_shape(bundled_run):
    _, shards_dir = bundled_run
    images, labels = read_split(shards_dir, "val", channels=1)
    assert images.shape == (40, 1, RESOLUTION, RESOLUTION)
    assert int(labels.min()) >= 0
    assert int(labels.max()) <= 9


# IDX files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".idx", ".idx.gz"])
def test_idx_source(tmp_path, suffix):
    rng = np.random.default_rng(3)
    files = {}
    for split, count in (("train", 24), ("val", 9)):
        images = rng.integers(1, 256, size=(count, 12, 12), dtype=np.uint8)
        labels = (np.arange(count) % 4).astype(np.uint8)
        files[f"{split}_images"] = str(write_idx(tmp_path / f"{split}-images{suffix}", idx_bytes(images)))
        files[f"{split}_labels"] = str(write_idx(tmp_path / f"{split}-labels{suffix}", idx_bytes(labels)))
    result, shards_dir = run_prepare(tmp_path, {"source": "idx", "fit": "pad", "num_classes": 4, **files})
    assert result.exit_code == 0, describe(result)
    manifest = read_manifest(shards_dir)
    assert manifest["splits"]["train"]["per_class"] == {"0": 6, "1": 6, "2": 6, "3": 6}
    images, _ = read_split(shards_dir, "val", channels=1)
    assert images.shape == (9, 1, RESOLUTION, RESOLUTION)
    # 'pad' centres the 12-pixel images on black: the two-pixel border stays at -1.
    assert torch.all(images[:, :, :2, :] == -1.0)
    assert torch.all(images[:, :, 2:14, 2:14] > -1.0)


# CIFAR-10 python archive --------------------------------------------------------------------

CIFAR_PER_BATCH = 6
CIFAR_TEST = 8
CIFAR_NAMES = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar_batch(count: int, offset: int) -> dict:
    """Return a batch like the originals: every image red 200, green 100, blue varying by image."""
    blue = (np.arange(count)[:, None] * 20 + offset) % 256
    data = np.concatenate(
        [np.full((count, 1024), 200), np.full((count, 1024), 100), np.repeat(blue, 1024, axis=1)], axis=1
    ).astype(np.uint8)
    return {
        b"batch_label": b"test batch",
        b"labels": [(offset + index) % 10 for index in range(count)],
        b"data": data,
        b"filenames": [f"image_{offset + index}.png".encode() for index in range(count)],
    }


def write_cifar_archive(path: Path, protocol: int = 2, replace: dict | None = None) -> Path:
    """Write a small archive in the layout of cifar-10-python.tar.gz; ``replace`` swaps member payloads."""
    payloads = {f"data_batch_{index}": cifar_batch(CIFAR_PER_BATCH, index * 10) for index in range(1, 6)}
    payloads["test_batch"] = cifar_batch(CIFAR_TEST, 99)
    payloads["batches.meta"] = {b"label_names": [name.encode() for name in CIFAR_NAMES], b"num_vis": 3072}
    with tarfile.open(path, "w:gz") as archive:
        for name, payload in payloads.items():
            raw = (replace or {}).get(name) or pickle.dumps(payload, protocol=protocol)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            archive.addfile(info, BytesIO(raw))
    return path


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_reader_layout(tmp_path, protocol):
    arrays = cifar.read_archive(write_cifar_archive(tmp_path / "cifar.tar.gz", protocol))
    assert arrays.train_images.shape == (5 * CIFAR_PER_BATCH, 32, 32, 3)
    assert arrays.val_images.shape == (CIFAR_TEST, 32, 32, 3)
    # Rows are channel-major, so every pixel must read (200, 100, blue) after the transpose.
    assert arrays.train_images[:, :, :, 0].min() == 200
    assert arrays.train_images[:, :, :, 1].max() == 100


def test_cifar_reader_labels_and_names(tmp_path):
    arrays = cifar.read_archive(write_cifar_archive(tmp_path / "cifar.tar.gz"))
    assert arrays.train_labels[:CIFAR_PER_BATCH].tolist() == [0, 1, 2, 3, 4, 5]
    assert arrays.classes == CIFAR_NAMES


class CallsGetcwd:
    """Pickles as a call of os.getcwd, the shape of a pickle that runs code when loaded."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar_reader_rejects_code(tmp_path):
    evil = pickle.dumps({b"data": CallsGetcwd(), b"labels": []}, protocol=2)
    path = write_cifar_archive(tmp_path / "cifar.tar.gz", replace={"data_batch_3": evil})
    with pytest.raises(WartokError, match="is not allowed") as raised:
        cifar.read_archive(path)
    assert "data_batch_3" in str(raised.value)


def test_cifar_reader_missing_batch(tmp_path):
    path = tmp_path / "cifar.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        raw = pickle.dumps(cifar_batch(2, 0), protocol=2)
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(raw)
        archive.addfile(info, BytesIO(raw))
    with pytest.raises(WartokError, match="data_batch_2 is missing"):
        cifar.read_archive(path)


def test_cifar_reader_damaged_archive(tmp_path):
    path = write_cifar_archive(tmp_path / "cifar.tar.gz")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(WartokError, match="Failed to read the CIFAR-10 archive"):
        cifar.read_archive(path)


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    archive = write_cifar_archive(root / "cifar-10-python.tar.gz")
    return run_prepare(root, {"source": "cifar10", "path": str(archive), "resolution": 32, "channels": 3})


def test_cifar_prepare_exits_zero(cifar_run):
    result, _ = cifar_run
    assert result.exit_code == 0, describe(result)


@pytest.mark.parametrize("split, count", [("train", 5 * CIFAR_PER_BATCH), ("val", CIFAR_TEST)])
def test_cifar_prepare_counts(cifar_run, split, count):
    _, shards_dir = cifar_run
    assert read_manifest(shards_dir)["splits"][split]["count"] == count


def test_cifar_prepare_classes(cifar_run):
    _, shards_dir = cifar_run
    assert read_manifest(shards_dir)["classes"] == CIFAR_NAMES


def test_cifar_prepare_pixels(cifar_run):
    _, shards_dir = cifar_run
    images, _ = read_split(shards_dir, "train", channels=3)
    assert images.shape == (5 * CIFAR_PER_BATCH, 3, 32, 32)
    assert torch.allclose(images[:, 0], torch.tensor(200 / 127.5 - 1))
    assert torch.allclose(images[:, 1], torch.tensor(100 / 127.5 - 1))


# npz files ----------------------------------------------------------------------------------


def write_npz(path: Path, count: int, labelled: bool = True, seed: int = 0, **extra) -> Path:
    arrays = {"images": np.random.default_rng(seed).integers(0, 256, size=(count, 10, 14, 3), dtype=np.uint8)}
    if labelled:
        arrays["labels"] = np.arange(count) % 3
    np.savez(path, **arrays, **extra)
    return path


def test_npz_source_val_file(tmp_path):
    data = {"source": "npz", "path": str(write_npz(tmp_path / "train.npz", 18)),
            "val_path": str(write_npz(tmp_path / "val.npz", 6, seed=1)), "channels": 3}  # fmt: skip
    result, shards_dir = run_prepare(tmp_path, data)
    assert result.exit_code == 0, describe(result)
    assert read_manifest(shards_dir)["splits"]["val"]["per_class"] == {"0": 2, "1": 2, "2": 2}
    images, labels = read_split(shards_dir, "train", channels=3)
    assert images.shape == (18, 3, RESOLUTION, RESOLUTION)
    assert sorted(labels.tolist()) == sorted((np.arange(18) % 3).tolist())


def test_npz_source_fraction_unlabelled(tmp_path):
    data = {"source": "npz", "path": str(write_npz(tmp_path / "all.npz", 20, labelled=False)), "val_fraction": 0.25}
    result, shards_dir = run_prepare(tmp_path, data)
    assert result.exit_code == 0, describe(result)
    splits = read_manifest(shards_dir)["splits"]
    assert (splits["train"]["count"], splits["val"]["count"]) == (15, 5)


def test_npz_source_custom_keys(tmp_path):
    path = tmp_path / "custom.npz"
    np.savez(path, pixels=noise(10, 8, 8, 1).reshape(10, 8, 8), classes=np.arange(10) % 2)
    data = {"source": "npz", "path": str(path), "val_fraction": 0.2, "images_key": "pixels", "labels_key": "classes"}
    result, shards_dir = run_prepare(tmp_path, data)
    assert result.exit_code == 0, describe(result)
    assert read_manifest(shards_dir)["splits"]["val"]["per_class"] == {"0": 1, "1": 1}


def test_npz_missing_key_lists_keys(tmp_path):
    data = {"source": "npz", "path": str(write_npz(tmp_path / "all.npz", 10)), "val_fraction": 0.2,
            "images_key": "pixels"}  # fmt: skip
    result, _ = run_prepare(tmp_path, data)
    assert result.exit_code == 2, describe(result)
    assert "data.images_key" in result.output
    assert "'images'" in result.output


def test_npz_float_images_rejected(tmp_path):
    path = tmp_path / "float.npz"
    np.savez(path, images=np.zeros((4, 8, 8), dtype=np.float32))
    result, _ = run_prepare(tmp_path, {"source": "npz", "path": str(path), "val_fraction": 0.5})
    assert result.exit_code == 2, describe(result)
    assert "expected uint8 images" in result.output


# Image modes, one at a time -----------------------------------------------------------------


def reopened(picture: Image.Image, name: str, folder: Path, **options) -> Image.Image:
    """Save and decode again, so that the test gets the mode a file really has."""
    picture.save(folder / name, **options)
    return open_image(folder / name)


def test_mode_rgba_composited_on_black(tmp_path):
    picture = reopened(Image.new("RGBA", (4, 4), (200, 100, 50, 128)), "rgba.png", tmp_path)
    assert np.abs(np.asarray(to_channels(picture, 3)).astype(int) - [100, 50, 25]).max() <= 1


def test_mode_la_composited_on_black(tmp_path):
    picture = reopened(Image.new("LA", (4, 4), (200, 128)), "la.png", tmp_path)
    assert picture.mode == "LA"
    assert abs(int(np.asarray(to_channels(picture, 1))[0, 0]) - 100) <= 1


def test_mode_palette_transparency(tmp_path):
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 250, 10, 10, 10, 250, 10])
    palette.putdata([1, 2])
    picture = reopened(palette, "palette.png", tmp_path, transparency=1)
    assert picture.mode == "P"
    assert np.asarray(to_channels(picture, 3)).tolist() == [[[0, 0, 0], [10, 250, 10]]]


def test_mode_palette_opaque(tmp_path):
    palette = Image.new("P", (1, 1))
    palette.putpalette([30, 60, 90])
    picture = reopened(palette, "palette.png", tmp_path)
    assert np.asarray(to_channels(picture, 3)).tolist() == [[[30, 60, 90]]]


def test_mode_16bit_scaled(tmp_path):
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    picture = reopened(Image.fromarray(values), "gray16.png", tmp_path)
    assert picture.mode.startswith("I")
    assert np.asarray(to_channels(picture, 1)).tolist() == [[0, 100, 255]]


def test_mode_32bit_scaled(tmp_path):
    values = np.array([[0, 257 * 100, 65535]], dtype=np.int32)
    picture = reopened(Image.fromarray(values), "int32.tif", tmp_path)
    assert picture.mode == "I"
    assert np.asarray(to_channels(picture, 1)).tolist() == [[0, 100, 255]]


def test_mode_cmyk_to_rgb(tmp_path):
    picture = reopened(Image.new("CMYK", (2, 2), (0, 0, 0, 0)), "cmyk.tif", tmp_path)
    assert picture.mode == "CMYK"
    assert np.asarray(to_channels(picture, 3))[0, 0].tolist() == [255, 255, 255]


def test_mode_rgb_to_gray(tmp_path):
    picture = reopened(Image.new("RGB", (2, 2), (255, 0, 0)), "red.png", tmp_path)
    assert np.asarray(to_channels(picture, 1))[0, 0] == 76


def test_mode_gray_to_rgb(tmp_path):
    picture = reopened(Image.new("L", (2, 2), 90), "gray.png", tmp_path)
    assert np.asarray(to_channels(picture, 3))[0, 0].tolist() == [90, 90, 90]


def test_open_truncated_raises(tmp_path):
    save_corrupt(tmp_path)
    with pytest.raises(UndecodableImage, match="truncated"):
        open_image(tmp_path / "truncated.jpg")


def test_open_applies_exif_rotation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (30, 10)).save(tmp_path / "rotated.jpg", exif=exif)
    assert open_image(tmp_path / "rotated.jpg").size == (10, 30)
