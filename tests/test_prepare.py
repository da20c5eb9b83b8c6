"""The prepare stage: shard sizes, seeded order, atomic output, re-runs, --download, and user errors."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
from conftest import describe, invoke
from test_sources import (
    read_manifest,
    run_prepare,
    save_plain,
    write_cifar_archive,
    write_class_folder,
    write_recipe,
)

from wartok_cli.data import cifar, shards
from wartok_cli.data.prepare import prepare
from wartok_cli.data.shards import plan_shards
from wartok_cli.recipe import load_recipe

USER_ERROR = 2
BUNDLED = {"source": "bundled", "max_train_images": 120, "max_val_images": 24, "fit": "pad"}


def shard_sizes(shards_dir: Path, split: str) -> list[int]:
    return [shard["count"] for shard in read_manifest(shards_dir)["splits"][split]["shards"]]


def shard_digests(shards_dir: Path, split: str) -> list[str]:
    return [shard["sha256"] for shard in read_manifest(shards_dir)["splits"][split]["shards"]]


def leftovers(folder: Path) -> list[str]:
    """Return the staging and moved-aside folders that prepare left next to its output."""
    return sorted(path.name for path in folder.iterdir() if ".tmp-" in path.name or ".old-" in path.name)


# Shard sizes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "count, samples_per_shard, expected",
    [
        (5, None, [1] * 5),
        (20, None, [3, 3, 3, 3, 2, 2, 2, 2]),
        (8000, None, [1000] * 8),
        (20000, None, [1000] * 20),
        (10, 4, [4, 4, 2]),
        (8, 8, [8]),
    ],
)
def test_plan_shards_sizes(count, samples_per_shard, expected):
    assert plan_shards(count, samples_per_shard) == expected


def test_automatic_shards_per_split(tmp_path):
    result, shards_dir = run_prepare(tmp_path, BUNDLED)
    assert result.exit_code == 0, describe(result)
    assert shard_sizes(shards_dir, "train") == [15] * 8
    assert shard_sizes(shards_dir, "val") == [3] * 8


def test_explicit_samples_per_shard(tmp_path):
    result, shards_dir = run_prepare(tmp_path, {**BUNDLED, "samples_per_shard": 50})
    assert result.exit_code == 0, describe(result)
    assert shard_sizes(shards_dir, "train") == [50, 50, 20]


# Seeded order and split ---------------------------------------------------------------------


def test_same_seed_same_shards(tmp_path):
    _, first = run_prepare(tmp_path / "first", BUNDLED)
    _, second = run_prepare(tmp_path / "second", BUNDLED)
    assert shard_digests(first, "train") == shard_digests(second, "train")


def test_other_seed_other_order(tmp_path):
    _, first = run_prepare(tmp_path / "first", BUNDLED, seed=0)
    _, second = run_prepare(tmp_path / "second", BUNDLED, seed=1)
    assert shard_digests(first, "train") != shard_digests(second, "train")


def test_val_fraction_split_seeded(tmp_path):
    images = write_class_folder(tmp_path / "images")
    data = {"source": "folder", "path": str(images), "val_fraction": 0.25, "channels": 3, "num_classes": 3}
    _, first = run_prepare(tmp_path / "first", data)
    _, second = run_prepare(tmp_path / "second", data)
    assert shard_digests(first, "val") == shard_digests(second, "val")


# Atomic output, re-runs and --overwrite -----------------------------------------------------


class Interrupt:
    """Stands in for encode_png and raises KeyboardInterrupt at the given call, as Ctrl-C would."""

    def __init__(self, at_call: int) -> None:
        self.at_call = at_call
        self.calls = 0

    def __call__(self, picture):
        self.calls += 1
        if self.calls == self.at_call:
            raise KeyboardInterrupt
        return ENCODE_PNG(picture)


ENCODE_PNG = shards.encode_png


def test_interrupted_leaves_nothing(tmp_path, monkeypatch):
    recipe = load_recipe(write_recipe(tmp_path, BUNDLED))
    monkeypatch.setattr(shards, "encode_png", Interrupt(at_call=130))
    with pytest.raises(KeyboardInterrupt):
        prepare(recipe)
    assert not recipe.shards_dir.exists()
    assert leftovers(recipe.shards_dir.parent) == []


def test_interrupted_overwrite_keeps_old(tmp_path, monkeypatch):
    recipe = load_recipe(write_recipe(tmp_path, BUNDLED))
    prepare(recipe)
    before = (recipe.shards_dir / "manifest.json").read_bytes()
    monkeypatch.setattr(shards, "encode_png", Interrupt(at_call=20))
    with pytest.raises(KeyboardInterrupt):
        prepare(recipe, overwrite=True)
    assert (recipe.shards_dir / "manifest.json").read_bytes() == before
    assert leftovers(recipe.shards_dir.parent) == []


def file_times(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}


def age_files(folder: Path) -> None:
    """Set every file's mtime to a fixed past time, so that any rewrite shows."""
    for path in folder.iterdir():
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))


def test_rerun_keeps_files(tmp_path):
    _, shards_dir = run_prepare(tmp_path, BUNDLED)
    age_files(shards_dir)
    result, _ = run_prepare(tmp_path, BUNDLED)
    assert result.exit_code == 0, describe(result)
    assert set(file_times(shards_dir).values()) == {1_000_000_000}


def test_overwrite_rewrites_files(tmp_path):
    _, shards_dir = run_prepare(tmp_path, BUNDLED)
    age_files(shards_dir)
    result, _ = run_prepare(tmp_path, BUNDLED, "--overwrite")
    assert result.exit_code == 0, describe(result)
    assert 1_000_000_000 not in set(file_times(shards_dir).values())
    assert leftovers(shards_dir.parent) == []


def test_rerun_other_settings_rejected(tmp_path):
    run_prepare(tmp_path, BUNDLED)
    result, _ = run_prepare(tmp_path, {**BUNDLED, "resolution": 32})
    assert result.exit_code == USER_ERROR, describe(result)
    assert "--overwrite" in result.output


def test_rerun_loader_settings_accepted(tmp_path):
    run_prepare(tmp_path, BUNDLED)
    result, _ = run_prepare(tmp_path, {**BUNDLED, "num_workers": 2, "shuffle_buffer": 16})
    assert result.exit_code == 0, describe(result)


# --download ---------------------------------------------------------------------------------


def no_network(*args, **kwargs):
    # Stands in for urllib's urlopen: this machine has no internet, so the real call cannot run.
    raise URLError("[Errno -3] Temporary failure in name resolution")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """Point the user cache at an empty folder and the network call at a failing stand-in."""
    monkeypatch.setenv("WARTOK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cifar, "urlopen", no_network)
    return tmp_path / "cache"


CIFAR = {"source": "cifar10", "resolution": 32, "channels": 3}


def test_download_offline_explains(tmp_path, cache):
    result, _ = run_prepare(tmp_path, CIFAR, "--download")
    assert result.exit_code == USER_ERROR, describe(result)
    assert cifar.URL in result.output
    assert f"copy it to {cache / 'datasets' / cifar.ARCHIVE_NAME}" in result.output


def test_download_offline_leaves_no_part(tmp_path, cache):
    run_prepare(tmp_path, CIFAR, "--download")
    assert list((cache / "datasets").iterdir()) == []


def test_download_wrong_md5_detected(tmp_path, cache):
    archive = write_cifar_archive(tmp_path / "cifar-10-python.tar.gz")
    result, _ = run_prepare(tmp_path, {**CIFAR, "path": str(archive)}, "--download")
    assert result.exit_code == USER_ERROR, describe(result)
    assert f"{archive} has md5" in result.output
    assert cifar.MD5 in result.output


def test_download_wrong_md5_in_cache(tmp_path, cache):
    (cache / "datasets").mkdir(parents=True)
    write_cifar_archive(cache / "datasets" / cifar.ARCHIVE_NAME)
    result, _ = run_prepare(tmp_path, CIFAR, "--download")
    assert result.exit_code == USER_ERROR, describe(result)
    assert "delete it and run the command again" in result.output


def test_cifar_missing_suggests_download(tmp_path, cache):
    result, _ = run_prepare(tmp_path, CIFAR)
    assert result.exit_code == USER_ERROR, describe(result)
    assert "--download" in result.output


def test_download_other_source_rejected(tmp_path):
    result, _ = run_prepare(tmp_path, BUNDLED, "--download")
    assert result.exit_code == USER_ERROR, describe(result)
    assert "--download fetches only the CIFAR-10 archive" in result.output


# Recipe and source errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, message",
    [
        ({"source": "folder", "val_fraction": 0.2}, "data.source 'folder' needs data.path"),
        ({"source": "npz", "path": "x.npz"}, "but neither is set"),
        ({"source": "folder", "path": "images", "val_path": "val", "val_fraction": 0.2}, "but both are set"),
        ({"source": "cifar10", "val_fraction": 0.2}, "data.val_fraction is not read by data.source 'cifar10'"),
        ({"source": "bundled", "path": "images"}, "data.path is not read by data.source 'bundled'"),
        ({"source": "folder", "path": "images", "val_fraction": 1.0}, "data.val_fraction = 1.0"),
    ],
)
def test_recipe_data_errors(tmp_path, data, message):
    result = invoke("recipe", "validate", str(write_recipe(tmp_path, data)))
    assert result.exit_code == USER_ERROR, describe(result)
    assert message in result.output


def test_missing_folder_named(tmp_path):
    result, _ = run_prepare(tmp_path, {"source": "folder", "path": str(tmp_path / "absent"), "val_fraction": 0.2})
    assert result.exit_code == USER_ERROR, describe(result)
    assert f"image folder not found: {tmp_path / 'absent'}" in result.output


def test_mixed_folder_rejected(tmp_path):
    save_plain(tmp_path / "images" / "cat", "c", 2)
    save_plain(tmp_path / "images", "loose", 1)
    result, _ = run_prepare(tmp_path, {"source": "folder", "path": str(tmp_path / "images"), "val_fraction": 0.5})
    assert result.exit_code == USER_ERROR, describe(result)
    assert "contains both image files" in result.output


def test_empty_class_folder_rejected(tmp_path):
    save_plain(tmp_path / "images" / "cat", "c", 2)
    (tmp_path / "images" / "dog").mkdir()
    result, _ = run_prepare(tmp_path, {"source": "folder", "path": str(tmp_path / "images"), "val_fraction": 0.5})
    assert result.exit_code == USER_ERROR, describe(result)
    assert f"class folder {tmp_path / 'images' / 'dog'} contains no image files" in result.output


def test_unknown_val_class_rejected(tmp_path):
    save_plain(tmp_path / "train" / "cat", "c", 2)
    save_plain(tmp_path / "val" / "cow", "v", 2)
    data = {"source": "folder", "path": str(tmp_path / "train"), "val_path": str(tmp_path / "val")}
    result, _ = run_prepare(tmp_path, data)
    assert result.exit_code == USER_ERROR, describe(result)
    assert "class folders cow" in result.output


def test_too_many_classes_rejected(tmp_path):
    images = write_class_folder(tmp_path / "images")
    data = {"source": "folder", "path": str(images), "val_fraction": 0.25, "num_classes": 2}
    result, _ = run_prepare(tmp_path, data)
    assert result.exit_code == USER_ERROR, describe(result)
    assert "Set data.num_classes to at least 3" in result.output


def test_fraction_leaving_empty_val(tmp_path):
    save_plain(tmp_path / "images", "img", 3)
    data = {"source": "folder", "path": str(tmp_path / "images"), "val_fraction": 0.1}
    result, _ = run_prepare(tmp_path, data)
    assert result.exit_code == USER_ERROR, describe(result)
    assert "leaves the val split empty" in result.output


def test_all_damaged_split_rejected(tmp_path):
    (tmp_path / "images").mkdir()
    for index in range(4):
        (tmp_path / "images" / f"broken{index}.png").write_bytes(b"no image")
    data = {"source": "folder", "path": str(tmp_path / "images"), "val_fraction": 0.5}
    result, shards_dir = run_prepare(tmp_path, data)
    assert result.exit_code == USER_ERROR, describe(result)
    assert "could be decoded" in result.output
    assert not shards_dir.exists()


def test_npz_labels_must_match(tmp_path):
    np.savez(tmp_path / "train.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.arange(4))
    np.savez(tmp_path / "val.npz", images=np.zeros((2, 8, 8), np.uint8))
    data = {"source": "npz", "path": str(tmp_path / "train.npz"), "val_path": str(tmp_path / "val.npz")}
    result, _ = run_prepare(tmp_path, data)
    assert result.exit_code == USER_ERROR, describe(result)
    assert "must both have labels" in result.output


def test_cut_spans_sorted_classes(tmp_path):
    # The files are listed class by class, so a cut without the seeded order would keep one class.
    images = write_class_folder(tmp_path / "images")
    data = {"source": "folder", "path": str(images), "val_fraction": 0.25, "max_train_images": 8, "num_classes": 3}
    result, shards_dir = run_prepare(tmp_path, data)
    assert result.exit_code == 0, describe(result)
    assert len(read_manifest(shards_dir)["splits"]["train"]["per_class"]) >= 2
