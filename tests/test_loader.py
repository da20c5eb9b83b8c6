"""The WebDataset loader over the prepared shards: complete evaluation passes and exact resume."""

from __future__ import annotations

import hashlib
import itertools
import tarfile
from collections import Counter
from io import BytesIO

import numpy as np
import pytest
import torch
from conftest import TRAIN_IMAGES, VAL_IMAGES
from PIL import Image

from wartok_cli.data.loader import make_loader, shard_paths
from wartok_cli.errors import WartokError

BATCH_SIZE = 16


def image_digest(image: torch.Tensor) -> str:
    """Return a digest of one decoded image, mapped back from [-1, 1] to its uint8 pixels."""
    pixels = ((image + 1) * 127.5).round().to(torch.uint8)
    return hashlib.sha256(pixels.numpy().tobytes()).hexdigest()


def shard_digests(workspace, split: str) -> Counter:
    """Return the digest of every image in a split, read from the tar files without the loader."""
    digests = Counter()
    for shard in shard_paths(workspace.shards_dir, split):
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                if not member.name.endswith(".png"):
                    continue
                picture = Image.open(BytesIO(archive.extractfile(member).read())).convert("L")
                pixels = np.asarray(picture, dtype=np.uint8)[None]
                digests[hashlib.sha256(pixels.tobytes()).hexdigest()] += 1
    return digests


def eval_digests(workspace, split: str, **options) -> Counter:
    """Return the digest of every image one evaluation pass yields."""
    loader = make_loader(workspace.shards_dir, split, batch_size=BATCH_SIZE, channels=1, train=False, **options)
    return Counter(image_digest(image) for batch in loader for image in batch["images"])


# Evaluation passes --------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_pass_count_matches_manifest(prepared, num_workers):
    digests = eval_digests(prepared, "train", num_workers=num_workers)
    assert sum(digests.values()) == prepared.manifest()["splits"]["train"]["count"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_pass_every_sample_once(prepared, num_workers):
    assert eval_digests(prepared, "train", num_workers=num_workers) == shard_digests(prepared, "train")


def test_eval_pass_val_split(prepared):
    digests = eval_digests(prepared, "val", num_workers=2)
    assert sum(digests.values()) == VAL_IMAGES


def test_eval_ranks_cover_split(prepared):
    combined = Counter()
    for rank in range(2):
        combined += eval_digests(prepared, "train", rank=rank, world_size=2, num_workers=2)
    assert combined == shard_digests(prepared, "train")


def test_eval_ranks_disjoint(prepared):
    first = eval_digests(prepared, "train", rank=0, world_size=2)
    second = eval_digests(prepared, "train", rank=1, world_size=2)
    assert set(first).isdisjoint(second)


def test_eval_labels_in_range(prepared):
    loader = make_loader(prepared.shards_dir, "val", batch_size=BATCH_SIZE, channels=1, train=False)
    labels = torch.cat([batch["labels"] for batch in loader])
    assert int(labels.min()) >= 0
    assert int(labels.max()) < 10


def test_eval_last_batch_partial(prepared):
    loader = make_loader(prepared.shards_dir, "val", batch_size=24, channels=1, train=False)
    sizes = [len(batch["images"]) for batch in loader]
    assert sizes == [24, 24, 16]


def test_images_in_unit_range(prepared):
    loader = make_loader(prepared.shards_dir, "val", batch_size=BATCH_SIZE, channels=1, train=False)
    images = next(iter(loader))["images"]
    assert images.min() >= -1.0
    assert images.max() <= 1.0


def test_unknown_split_raises(prepared):
    with pytest.raises(WartokError, match="no 'test' split"):
        shard_paths(prepared.shards_dir, "test")


def test_missing_manifest_raises(tmp_path):
    with pytest.raises(WartokError, match="Run `wartok prepare"):
        shard_paths(tmp_path, "train")


# Training streams and resume ----------------------------------------------------------------


def train_batches(workspace, start_batch: int, count: int, **options) -> list[dict]:
    """Return ``count`` batches of a training stream that starts after ``start_batch`` batches."""
    loader = make_loader(
        workspace.shards_dir, "train", batch_size=BATCH_SIZE, channels=1, train=True, seed=7,
        shuffle_buffer=32, start_batch=start_batch, **options,
    )
    return list(itertools.islice(loader, count))


def mismatched_batches(expected: list[dict], actual: list[dict]) -> list[int]:
    return [
        index
        for index, (left, right) in enumerate(zip(expected, actual))
        if not (torch.equal(left["images"], right["images"]) and torch.equal(left["labels"], right["labels"]))
    ]


# One epoch is 16 batches (8 per worker with two workers), so 6 batches from 13 cross an epoch boundary.
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("start", [3, 13])
def test_resume_matches_uninterrupted(prepared, num_workers, start):
    count = 6
    uninterrupted = train_batches(prepared, 0, start + count, num_workers=num_workers)[start:]
    resumed = train_batches(prepared, start, count, num_workers=num_workers)
    assert mismatched_batches(uninterrupted, resumed) == []


def test_resume_with_flip_matches(prepared):
    uninterrupted = train_batches(prepared, 0, 5, num_workers=0, flip=True)[3:]
    resumed = train_batches(prepared, 3, 2, num_workers=0, flip=True)
    assert mismatched_batches(uninterrupted, resumed) == []


def test_train_stream_full_batches(prepared):
    batches = train_batches(prepared, 0, 20, num_workers=2)
    assert {len(batch["images"]) for batch in batches} == {BATCH_SIZE}


def test_train_epoch_sees_every_image(prepared):
    batches = train_batches(prepared, 0, TRAIN_IMAGES // BATCH_SIZE, num_workers=0)
    digests = Counter(image_digest(image) for batch in batches for image in batch["images"])
    assert digests == shard_digests(prepared, "train")


def test_train_stream_is_shuffled(prepared):
    shuffled = torch.cat([batch["images"] for batch in train_batches(prepared, 0, 4, num_workers=0)])
    loader = make_loader(prepared.shards_dir, "train", batch_size=BATCH_SIZE, channels=1, train=False)
    in_order = torch.cat([batch["images"] for batch in itertools.islice(loader, 4)])
    assert not torch.equal(shuffled, in_order)


def test_train_stream_seeded(prepared):
    first = train_batches(prepared, 0, 3, num_workers=0)
    second = train_batches(prepared, 0, 3, num_workers=0)
    assert mismatched_batches(first, second) == []
