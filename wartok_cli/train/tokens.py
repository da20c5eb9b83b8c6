"""Token extraction: encode a split's shards with a frozen tokenizer, cached on disk.

The cache lives in the platformdirs user cache and is keyed by the tokenizer
weights' sha256, the shard manifest, the split and the augmentation, so it is
rebuilt whenever any of them changes and reused otherwise.

On several processes each rank encodes its share of the shards, the shares are
gathered on every rank and sorted by sample key, so the cache file contains the
same arrays as a single-process extraction. The main process writes it through
a temporary name, and the other ranks wait and read it.

NOTE: the tokens are bitwise equal across process counts only at the same number
of CPU threads per process, because convolution results on the CPU change in the
last bits with the thread count and a near-tie between two codes can flip.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from torch import nn

from wartok_cli.cache import cache_root
from wartok_cli.data.loader import ShardStream, shard_paths
from wartok_cli.data.shards import read_manifest

log = logging.getLogger("wartok")

AUGMENTATIONS = ("none", "flip")
FLIP_SUFFIX = "/flip"  # appended to the key of a mirrored image; "/" sorts it right after its original




def cache_key(tokenizer_hash: str, shards_dir: Path, split: str, augmentation: str = "none") -> str:
    """Return the cache key of one split's tokens."""
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {augmentation!r}")
    manifest = json.dumps(read_manifest(shards_dir)["splits"][split], sort_keys=True)
    text = f"{tokenizer_hash}/{hashlib.sha256(manifest.encode()).hexdigest()}/{split}"
    if augmentation != "none":
        # Keys of caches written before augmentation existed stay valid for "none".
        text += f"/{augmentation}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cache_path(tokenizer_hash: str, shards_dir: Path, split: str, augmentation: str = "none") -> Path:
    """Return the cache file of one split's tokens."""
    return cache_root() / "tokens" / f"{cache_key(tokenizer_hash, shards_dir, split, augmentation)}.npz"


def _shard_batches(shards: list[Path], batch_size: int, channels: int) -> Iterator[dict]:
    """Yield evaluation batches shard by shard; a shard's last batch may be short."""
    for shard in shards:
        yield from ShardStream([shard], batch_size=batch_size, channels=channels, train=False)


@torch.no_grad()
def encode_split(
    tokenizer: nn.Module,
    shards_dir: Path,
    split: str,
    channels: int,
    accelerator: Accelerator,
    flip: bool = False,
    batch_size: int = 256,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Encode this process's share of a split; return keys, tokens (n, length) int64 and labels (n,).

    With ``flip`` every image is encoded twice, as is and mirrored left to right;
    the mirrored sequence's key ends in FLIP_SUFFIX.
    """
    shards = shard_paths(shards_dir, split)[accelerator.process_index :: accelerator.num_processes]
    # Batches start afresh at every shard, so each batch contains the same images whatever the number of
    # processes: convolutions are not bitwise batch-invariant, and a near-tie could flip a token.
    keys: list[str] = []
    tokens, labels = [], []
    for batch in _shard_batches(shards, batch_size, channels):
        images = batch["images"].to(accelerator.device)
        # Encoding runs in fp32 even when training uses autocast: the cache key does not cover the
        # precision, so the cached tokens must not depend on it.
        tokens.append(tokenizer.encode(images).indices.cpu())
        labels.append(batch["labels"])
        keys.extend(batch["keys"])
        if flip:
            tokens.append(tokenizer.encode(images.flip(-1)).indices.cpu())
            labels.append(batch["labels"])
            keys.extend(key + FLIP_SUFFIX for key in batch["keys"])
    if not tokens:  # a rank whose share of the shards is empty
        return [], np.zeros((0, tokenizer.num_tokens), dtype=np.int64), np.zeros(0, dtype=np.int64)
    return keys, torch.cat(tokens).numpy(), torch.cat(labels).numpy()


def _gather_sorted(
    accelerator: Accelerator, keys: list[str], tokens: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gather every rank's share and sort it by key; return keys, tokens and labels as arrays."""
    if accelerator.num_processes > 1:
        shares = gather_object([(keys, tokens, labels)])
        keys = [key for share in shares for key in share[0]]
        tokens = np.concatenate([share[1] for share in shares])
        labels = np.concatenate([share[2] for share in shares])
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return np.array(keys)[order], tokens[order], labels[order]


def load_tokens(
    tokenizer: nn.Module,
    tokenizer_hash: str,
    shards_dir: Path,
    split: str,
    channels: int,
    accelerator: Accelerator,
    flip: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (tokens, labels) of a split from the cache, encoding and caching them when missing.

    Every process must call this, because a missing cache is encoded by all of them together.
    """
    augmentation = "flip" if flip else "none"
    path = cache_path(tokenizer_hash, shards_dir, split, augmentation)
    # The main process decides, so all ranks take the same branch even if the file appears meanwhile.
    decision = [path.is_file()]
    if accelerator.num_processes > 1:
        broadcast_object_list(decision)
    if decision[0]:
        log.debug("reusing cached %s tokens (augmentation %s) from %s", split, augmentation, path)
    else:
        keys, tokens, labels = encode_split(tokenizer, shards_dir, split, channels, accelerator, flip=flip)
        keys, tokens, labels = _gather_sorted(accelerator, keys, tokens, labels)
        if accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{path.name}.tmp")  # not *.npz, so it never looks like a cache file
            with open(temporary, "wb") as handle:
                np.savez(handle, tokens=tokens.astype(np.int32), labels=labels.astype(np.int64), keys=keys)
            temporary.replace(path)
        log.info(
            "encoded %d %s token sequences (augmentation %s) on %d process(es); cached at %s",
            len(tokens),
            split,
            augmentation,
            accelerator.num_processes,
            path,
        )
    accelerator.wait_for_everyone()
    with np.load(path) as arrays:
        return torch.from_numpy(arrays["tokens"].astype(np.int64)), torch.from_numpy(arrays["labels"])
