"""The WebDataset loader shared by every training stage.

Each process and each DataLoader worker reads its own "slot" of the shard list.
Training streams are infinite and a pure function of (seed, epoch, slot), so
every process runs the same number of steps and a resumed run can skip exactly
the batches it already consumed without decoding them. Evaluation streams visit
every sample once across all processes and workers.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from wartok_cli.data.shards import read_manifest
from wartok_cli.errors import WartokError


def _read_samples(shard: Path) -> Iterator[dict]:
    """Yield the raw samples of one shard; a corrupt shard raises an error that names it."""
    key = "(start of shard)"
    try:
        for sample in tarfile_samples([{"url": str(shard)}]):
            key = sample["__key__"]
            yield sample
    except WartokError:
        raise
    except Exception as error:
        raise WartokError(f"Corrupt shard {shard} after sample {key}: {error}. Run `wartok prepare` again.") from error


def _decode(sample: dict, channels: int, flip: bool) -> tuple[torch.Tensor, int, str]:
    """Decode one sample to a float image in [-1, 1], (C, H, W), its label (-1 if none) and its key."""
    try:
        picture = Image.open(io.BytesIO(sample["png"]))
        picture = picture.convert("L" if channels == 1 else "RGB")
    except Exception as error:
        raise WartokError(f"Corrupt image {sample['__key__']} in shard {sample.get('__url__')}: {error}") from error
    array = np.asarray(picture, dtype=np.float32)
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    image = torch.from_numpy(array / 127.5 - 1.0)
    if flip:
        image = image.flip(-1)
    label = int(sample["cls"]) if "cls" in sample else -1
    return image, label, sample["__key__"]


def _collate(decoded: list[tuple[torch.Tensor, int, str]]) -> dict:
    """Stack decoded samples into a batch: images (batch, C, H, W), labels (batch,), keys (a list)."""
    images = torch.stack([image for image, _, _ in decoded])
    labels = torch.tensor([label for _, label, _ in decoded], dtype=torch.long)
    return {"images": images, "labels": labels, "keys": [key for _, _, key in decoded]}


class ShardStream(IterableDataset):
    """Batches from a list of shards, split over processes and workers by slot.

    ``start_batch`` is the number of batches this process already consumed; a
    training stream skips them before decoding so that a resumed run continues
    at the exact data position.
    """

    def __init__(
        self,
        shards: list[Path],
        *,
        batch_size: int,
        channels: int,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        flip: bool = False,
        start_batch: int = 0,
    ) -> None:
        super().__init__()
        if not shards:
            raise WartokError("No shards to read. Run `wartok prepare RECIPE` first.")
        self.shards = list(shards)
        self.batch_size = batch_size
        self.channels = channels
        self.train = train
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = max(1, num_workers)
        self.shuffle_buffer = shuffle_buffer
        self.flip = flip
        self.start_batch = start_batch

    def _worker(self) -> int:
        info = get_worker_info()
        return info.id if info is not None else 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.train:
            yield from self._train_batches()
        else:
            yield from self._eval_batches()

    def _eval_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        slots = self.world_size * self.num_workers
        slot = self.rank * self.num_workers + self._worker()
        batch = []
        for shard in self.shards[slot::slots]:
            for sample in _read_samples(shard):
                batch.append(_decode(sample, self.channels, flip=False))
                if len(batch) == self.batch_size:
                    yield _collate(batch)
                    batch = []
        if batch:
            yield _collate(batch)

    def _train_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        # The DataLoader takes batches from workers in turn, so batch i came from worker i % workers.
        # Rotating the logical slots by start_batch keeps that order after a resume.
        workers = self.num_workers
        logical = (self._worker() + self.start_batch) % workers
        to_skip = self.start_batch // workers + (1 if logical < self.start_batch % workers else 0)
        slot = self.rank * workers + logical
        raw = []
        for sample in self._train_samples(slot, self.world_size * workers):
            raw.append(sample)
            if len(raw) < self.batch_size:
                continue
            if to_skip:
                to_skip -= 1
            else:
                yield _collate([_decode(item, self.channels, flip=item["__flip__"]) for item in raw])
            raw = []

    def _train_samples(self, slot: int, slots: int) -> Iterator[dict]:
        """Yield an endless shuffled stream of raw samples for one slot, epoch after epoch."""
        epoch = 0
        while True:
            order = list(self.shards)
            random.Random(f"{self.seed}/shards/{epoch}").shuffle(order)
            mine = order[slot::slots] or [order[slot % len(order)]]
            rng = random.Random(f"{self.seed}/samples/{epoch}/{slot}")
            flip_rng = random.Random(f"{self.seed}/flip/{epoch}/{slot}")
            buffer = []
            for shard in mine:
                for sample in _read_samples(shard):
                    # The flip is drawn as the sample is read, so skipped batches draw theirs too
                    # and a resumed stream flips the same images as an uninterrupted one.
                    sample["__flip__"] = self.flip and flip_rng.random() < 0.5
                    if len(buffer) < self.shuffle_buffer:
                        buffer.append(sample)
                        continue
                    index = rng.randrange(len(buffer))
                    buffer[index], sample = sample, buffer[index]
                    yield sample
            rng.shuffle(buffer)
            yield from buffer
            epoch += 1


def shard_paths(shards_dir: Path, split: str) -> list[Path]:
    """Return the shard files of one split, as listed in the manifest."""
    manifest = read_manifest(shards_dir)
    if split not in manifest["splits"]:
        raise WartokError(f"{shards_dir}: the manifest has no '{split}' split. Run `wartok prepare` again.")
    return [Path(shards_dir) / shard["name"] for shard in manifest["splits"][split]["shards"]]


def make_loader(
    shards_dir: Path,
    split: str,
    *,
    batch_size: int,
    channels: int,
    train: bool,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    flip: bool = False,
    start_batch: int = 0,
    max_workers: Optional[int] = None,
) -> DataLoader:
    """Build a DataLoader over one split's shards; ``batch_size`` is per process."""
    shards = shard_paths(shards_dir, split)
    if max_workers is not None:
        num_workers = min(num_workers, max_workers)
    if not train:
        # An evaluation slot without a shard would only start an idle worker.
        num_workers = min(num_workers, max(0, len(shards) // world_size))
    stream = ShardStream(
        shards,
        batch_size=batch_size,
        channels=channels,
        train=train,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        shuffle_buffer=shuffle_buffer,
        flip=flip,
        start_batch=start_batch,
    )
    return DataLoader(stream, batch_size=None, num_workers=num_workers, persistent_workers=False)
