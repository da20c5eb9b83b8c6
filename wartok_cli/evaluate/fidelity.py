"""Inception features and FID, KID and Inception Score through torch-fidelity.

wartok extracts features with torch-fidelity's own extractor (``inception-v3-compat``, the
TensorFlow inception-2015-12-05 graph behind published FID values) and passes them to
torch-fidelity's FID, KID and IS functions. It does not call ``calculate_metrics`` because
the reference statistics of a dataset split are cached between runs, and because the
images come from shards, reconstructions and sample files spread over several processes.

Reference statistics are cached in the user cache (``WARTOK_CACHE_DIR`` overrides it),
keyed by the split's manifest entry, which lists every shard's sha256, and by the sha256
of the extractor's feature weights. The cached file also keeps the features themselves
(float32, 8 KiB per image), because KID compares sets of features, not their moments.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import uuid
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch_fidelity.defaults import DEFAULTS
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.utils import create_feature_extractor

from wartok_cli.cache import cache_root
from wartok_cli.data.shards import read_manifest
from wartok_cli.errors import WartokError
from wartok_cli.evaluate import fid_weights

log = logging.getLogger("wartok")

FEATURE_EXTRACTOR = "inception-v3-compat"
FEATURE_LAYER = "2048"  # pool3: torch-fidelity's default layer for FID and KID
FEATURE_DIM = 2048
LOGITS_LAYER = "logits_unbiased"  # torch-fidelity's default layer for the Inception Score
LOGITS_DIM = 1008
# torch-fidelity's default seed for the KID subsets and the IS shuffle, so results match its CLI.
RNG_SEED = DEFAULTS["rng_seed"]
STATISTICS_FORMAT = 1


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """Convert images in [-1, 1], (batch, C, H, W) with C 1 or 3, to uint8 (batch, 3, H, W)."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels


class InceptionExtractor:
    """torch-fidelity's Inception network on one device, returning pool3 features and optionally logits."""

    def __init__(self, weights: Path, device: torch.device, logits: bool = False) -> None:
        # torch-fidelity reads a weights file with torch.load(weights_only=False). The state dict
        # is loaded here with weights_only=True (load_weights) and handed over re-serialized,
        # so no pickle from the user's file runs.
        buffer = io.BytesIO()
        torch.save(fid_weights.load_weights(Path(weights)), buffer)
        buffer.seek(0)
        layers = [FEATURE_LAYER, LOGITS_LAYER] if logits else [FEATURE_LAYER]
        self.model = create_feature_extractor(
            FEATURE_EXTRACTOR, layers, cuda=False, feature_extractor_weights_path=buffer, verbose=False
        ).to(device)
        self.device = device
        self.logits = logits

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return pool3 features (batch, 2048) and logits (batch, 1008) or None, float32 on the CPU.

        ``images`` are uint8 (batch, 3, H, W); the network resizes them to 299 x 299 itself.
        """
        # The network runs in fp32 even inside an autocast region, as published FID values assume.
        with torch.autocast(self.device.type, enabled=False):
            outputs = self.model(images.to(self.device))
        features = outputs[0].float().cpu()
        logits = outputs[1].float().cpu() if self.logits else None
        return features, logits


@dataclass
class FeatureStatistics:
    """Moments of a set of pool3 features, for FID, and optionally the features, for KID."""

    mu: np.ndarray  # (2048,) float64
    sigma: np.ndarray  # (2048, 2048) float64
    count: int | None  # number of images; None when a statistics file does not record it
    features: np.ndarray | None = None  # (count, 2048) float32

    @classmethod
    def from_features(cls, features: np.ndarray) -> FeatureStatistics:
        """Compute the mean and covariance with torch-fidelity's own function."""
        moments = fid_features_to_statistics(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)))
        return cls(
            mu=moments["mu"].astype(np.float64),
            sigma=moments["sigma"].astype(np.float64),
            count=len(features),
            features=np.asarray(features, dtype=np.float32),
        )

    def save(self, path: Path, description: dict) -> None:
        """Write an .npz with ``mu``, ``sigma``, ``count``, ``features`` and a JSON ``description``, atomically."""
        arrays = {"mu": self.mu, "sigma": self.sigma, "description": np.array(json.dumps(description))}
        if self.count is not None:
            arrays["count"] = np.array(self.count, dtype=np.int64)
        if self.features is not None:
            arrays["features"] = self.features
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex}.tmp.npz")
        try:
            np.savez(temporary, **arrays)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)


def load_statistics(path: Path, field: str) -> tuple[FeatureStatistics, dict]:
    """Read a statistics .npz: ``mu`` and ``sigma`` are required, ``features`` and ``count`` optional.

    The layout is that of wartok's cached reference statistics. Files with only ``mu`` and
    ``sigma`` of pool3 features, as other FID tools write them, also load. Returns the
    statistics and the file's ``description``, which is empty when the file has none.

    Raises:
        WartokError: names ``field``, the file and what is wrong with it.
    """
    if not path.is_file():
        raise WartokError(f"{field}: statistics file not found: {path}. Pass an .npz with arrays mu and sigma.")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            contents = {key: arrays[key] for key in arrays.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise WartokError(f"{field}: cannot read {path} as an .npz file: {error}") from error

    missing = [key for key in ("mu", "sigma") if key not in contents]
    if missing:
        raise WartokError(
            f"{field}: {path} has no {' and no '.join(missing)} array (it contains {sorted(contents) or 'nothing'}). "
            "Pass an .npz with mu (2048,) and sigma (2048, 2048) of Inception pool3 features."
        )
    mu, sigma = contents["mu"], contents["sigma"]
    features = contents.get("features")
    problems = []
    if mu.shape != (FEATURE_DIM,):
        problems.append(f"mu has shape {mu.shape}, expected ({FEATURE_DIM},)")
    if sigma.shape != (FEATURE_DIM, FEATURE_DIM):
        problems.append(f"sigma has shape {sigma.shape}, expected ({FEATURE_DIM}, {FEATURE_DIM})")
    if features is not None and (features.ndim != 2 or features.shape[1] != FEATURE_DIM):
        problems.append(f"features has shape {features.shape}, expected (count, {FEATURE_DIM})")
    if problems:
        raise WartokError(f"{field}: {path} is not a statistics file of pool3 features: {'; '.join(problems)}.")

    count = None
    if "count" in contents:
        count = int(contents["count"])
    elif features is not None:
        count = len(features)
    description = json.loads(str(contents["description"])) if "description" in contents else {}
    statistics = FeatureStatistics(
        mu=mu.astype(np.float64),
        sigma=sigma.astype(np.float64),
        count=count,
        features=None if features is None else features.astype(np.float32),
    )
    return statistics, description


def frechet_distance(first: FeatureStatistics, second: FeatureStatistics) -> float:
    """Return the FID between two sets of statistics (torch-fidelity's formula)."""
    metric = fid_statistics_to_metric(
        {"mu": first.mu, "sigma": first.sigma}, {"mu": second.mu, "sigma": second.sigma}, verbose=False
    )
    return float(metric[KEY_METRIC_FID])


def kernel_distance(samples: np.ndarray, reference: np.ndarray, subsets: int, subset_size: int) -> tuple[float, float]:
    """Return KID's mean and standard deviation over random subsets (torch-fidelity's estimator)."""
    metric = kid_features_to_metric(
        torch.from_numpy(samples),
        torch.from_numpy(reference),
        kid_subsets=subsets,
        kid_subset_size=subset_size,
        rng_seed=RNG_SEED,
        verbose=False,
    )
    return float(metric[KEY_METRIC_KID_MEAN]), float(metric[KEY_METRIC_KID_STD])


def inception_score(logits: np.ndarray, splits: int) -> tuple[float, float]:
    """Return the Inception Score's mean and standard deviation over splits (torch-fidelity's estimator)."""
    metric = isc_features_to_metric(torch.from_numpy(logits), splits, shuffle=True, rng_seed=RNG_SEED)
    return float(metric[KEY_METRIC_ISC_MEAN]), float(metric[KEY_METRIC_ISC_STD])


def reference_key(shards_dir: Path, split: str, channels: int, feature_weights_sha256: str) -> str:
    """Return the cache key of a split's reference statistics."""
    entry = json.dumps(read_manifest(shards_dir)["splits"][split], sort_keys=True)
    manifest_hash = hashlib.sha256(entry.encode()).hexdigest()
    text = "/".join(
        [f"format-{STATISTICS_FORMAT}", FEATURE_EXTRACTOR, FEATURE_LAYER, feature_weights_sha256, manifest_hash, split,
         str(channels)]
    )  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def reference_cache_path(key: str) -> Path:
    """Return the path of cached reference statistics."""
    return cache_root() / "fid-reference" / f"{key}.npz"


def gather_rows(
    accelerator: Accelerator, rows: torch.Tensor, keys: Sequence, expected: int | None, subject: str
) -> np.ndarray:
    """Gather every process's rows, order them by key and check that each key occurs once.

    ``rows`` is (count, dim) on this process, ``keys`` names each row (shard keys or sample
    indices). Every process must call this, also with zero rows. The order by key makes
    the result independent of the number of processes, which matters for KID's random
    subsets. ``expected``, when given, is the required number of distinct keys, and
    ``subject`` names the images in error messages.

    Raises:
        WartokError: the number of rows differs from ``expected``, which means the shards do
            not match their manifest.
        RuntimeError: a key occurs twice, which is a bug in the loader.
    """
    if accelerator.num_processes > 1:
        local = rows.to(accelerator.device)
        lengths = accelerator.gather(torch.tensor([len(local)], device=accelerator.device)).cpu().tolist()
        padded = accelerator.gather(accelerator.pad_across_processes(local, dim=0)).cpu()
        width = max(lengths)
        rows = torch.cat([padded[rank * width : rank * width + length] for rank, length in enumerate(lengths)])
        keys = gather_object(list(keys))
    keys = list(keys)
    if len(set(keys)) != len(keys):
        raise RuntimeError(f"{subject}: {len(keys) - len(set(keys))} images were read more than once")
    if expected is not None and len(keys) != expected:
        raise WartokError(
            f"{subject}: read {len(keys)} images, but the manifest lists {expected}. The shards do not match "
            "their manifest; run `wartok prepare RECIPE --overwrite`."
        )
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return rows[order].numpy()
