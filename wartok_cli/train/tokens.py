"""Token extraction: encode a split's shards with a frozen tokenizer, cached on disk.

The cache lives in the platformdirs user cache and is keyed by the tokenizer
weights' sha256, the shard manifest and the split, so it is rebuilt whenever
any of them changes and reused otherwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import platformdirs
import torch
from accelerate import Accelerator
from torch import nn

from wartok_cli.data.loader import make_loader
from wartok_cli.data.shards import read_manifest

log = logging.getLogger("wartok")


def cache_root() -> Path:
    """Return the folder of wartok's caches (override with WARTOK_CACHE_DIR)."""
    import os

    return Path(os.environ.get("WARTOK_CACHE_DIR") or platformdirs.user_cache_dir("wartok"))


def cache_key(tokenizer_hash: str, shards_dir: Path, split: str) -> str:
    """Return the cache key of one split's tokens."""
    manifest = json.dumps(read_manifest(shards_dir)["splits"][split], sort_keys=True)
    text = f"{tokenizer_hash}/{hashlib.sha256(manifest.encode()).hexdigest()}/{split}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@torch.no_grad()
def encode_split(
    tokenizer: nn.Module, shards_dir: Path, split: str, channels: int, accelerator: Accelerator, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Encode every image of a split; return tokens (N, length) int64 and labels (N,)."""
    # NOTE: extraction runs on the main process only; other processes wait and read the cache.
    loader = make_loader(shards_dir, split, batch_size=batch_size, channels=channels, train=False)
    tokens, labels = [], []
    for batch in loader:
        with accelerator.autocast():
            quant = tokenizer.encode(batch["images"].to(accelerator.device))
        tokens.append(quant.indices.cpu())
        labels.append(batch["labels"])
    return torch.cat(tokens).numpy(), torch.cat(labels).numpy()


def load_tokens(
    tokenizer: nn.Module, tokenizer_hash: str, shards_dir: Path, split: str, channels: int, accelerator: Accelerator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (tokens, labels) of a split from the cache, encoding and caching them when missing."""
    path = cache_root() / "tokens" / f"{cache_key(tokenizer_hash, shards_dir, split)}.npz"
    if accelerator.is_main_process and not path.is_file():
        tokens, labels = encode_split(tokenizer, shards_dir, split, channels, accelerator)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.stem}.tmp.npz")
        np.savez(temporary, tokens=tokens.astype(np.int32), labels=labels.astype(np.int64))
        temporary.replace(path)
        log.info("encoded %d %s images to tokens; cached at %s", len(tokens), split, path)
    else:
        log.debug("reusing cached %s tokens from %s", split, path)
    accelerator.wait_for_everyone()
    with np.load(path) as arrays:
        return torch.from_numpy(arrays["tokens"].astype(np.int64)), torch.from_numpy(arrays["labels"])
