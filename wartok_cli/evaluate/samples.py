"""Generated samples for gFID, KID and IS: the .npz file that `wartok sample` writes.

`wartok sample` writes ``<output_dir>/samples/<name>/samples.npz``. The file contains uint8
images as (N, H, W, C), C 1 or 3, under ``images`` (``arr_0``, the name numpy gives an
unnamed array, is accepted too), plus labels, tokens and the sampling ``settings`` as a
JSON string. Grayscale images may also be stored as (N, H, W).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wartok_cli.errors import WartokError

FIELD = "evaluate.samples"
IMAGE_KEYS = ("images", "arr_0")


@dataclass
class SampleSet:
    """Sample images in memory, with the file they came from."""

    path: Path
    sha256: str
    images: np.ndarray  # (N, H, W, C) uint8
    settings: dict | None = None  # the sampling settings that `wartok sample` records

    def __len__(self) -> int:
        return len(self.images)

    def describe(self) -> dict:
        """Return the path, sha256, count and image shape, for the report."""
        _, height, width, channels = self.images.shape
        return {"path": str(self.path), "sha256": self.sha256, "count": len(self), "height": height,
                "width": width, "channels": channels, "settings": self.settings}  # fmt: skip

    def batch(self, indices: list[int]) -> torch.Tensor:
        """Return the images at ``indices`` as uint8 (batch, 3, H, W), grayscale repeated to 3 channels."""
        pixels = torch.from_numpy(np.ascontiguousarray(self.images[indices])).permute(0, 3, 1, 2)
        return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels


def find_samples_file(path: Path) -> Path:
    """Return the .npz at ``path``, or the only .npz in the folder ``path`` or in its subfolders.

    The subfolders are searched one level deep, so the folder <output_dir>/samples of
    `wartok sample` works when it contains one set of samples.
    """
    if path.is_file():
        return path
    if path.is_dir():
        candidates = sorted(path.glob("*.npz")) or sorted(path.glob("*/*.npz"))
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            raise WartokError(
                f"{FIELD}: the folder {path} contains no .npz file. Run `wartok sample RECIPE` first, or set "
                f"{FIELD} to the .npz of the samples."
            )
        names = ", ".join(str(candidate.relative_to(path)) for candidate in candidates)
        raise WartokError(
            f"{FIELD}: the folder {path} contains several .npz files ({names}). Set {FIELD} to one of them, "
            f"for example {candidates[0]}."
        )
    raise WartokError(
        f"{FIELD}: no samples at {path}. Run `wartok sample RECIPE` first, set {FIELD} to the .npz of the samples, "
        "or remove gfid, kid and inception_score from evaluate.metrics."
    )


def load_samples(path: Path) -> SampleSet:
    """Load and check the sample images of an .npz file or samples folder.

    Raises:
        WartokError: names the file and the problem (no image array, wrong dtype or shape).
    """
    file = find_samples_file(Path(path))
    try:
        with np.load(file, allow_pickle=False) as arrays:
            key = next((name for name in IMAGE_KEYS if name in arrays.files), None)
            if key is None:
                raise WartokError(
                    f"{FIELD}: {file} has no images array (it contains {sorted(arrays.files) or 'nothing'}). "
                    "Expected uint8 images (N, H, W, C) under the name 'images'."
                )
            images = arrays[key]
            settings = _settings(arrays)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise WartokError(f"{FIELD}: cannot read {file} as an .npz file: {error}") from error

    if images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8:
        raise WartokError(
            f"{FIELD}: the images in {file} are {images.dtype}, expected uint8 in 0..255. "
            "Convert them with np.clip(np.round(x), 0, 255).astype(np.uint8)."
        )
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise WartokError(
            f"{FIELD}: the images in {file} have shape {images.shape}, expected (N, H, W, C) with C 1 or 3."
        )
    if len(images) == 0:
        raise WartokError(f"{FIELD}: {file} contains no images.")
    return SampleSet(path=file, sha256=_sha256(file), images=images, settings=settings)


def _settings(arrays) -> dict | None:
    """Return the JSON ``settings`` string of a samples file as a dict, or None when absent or not JSON."""
    if "settings" not in arrays.files:
        return None
    try:
        settings = json.loads(str(arrays["settings"][()]))
    except (ValueError, IndexError):  # an object array (needs pickle), not 0-d, or not JSON
        return None
    return settings if isinstance(settings, dict) else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
