"""CIFAR-10 in its "python version" archive, read from disk or fetched once into the user cache.

``cifar-10-python.tar.gz`` contains ``cifar-10-batches-py/`` with five training
batches (``data_batch_1`` to ``data_batch_5``), ``test_batch`` and
``batches.meta``. Each batch is a pickle of a dict: ``b"data"`` is an (N, 3072)
uint8 array, one row per image in channel-major order (1024 red, 1024 green,
1024 blue values, each a 32 x 32 raster), and ``b"labels"`` a list of N ints.

A pickle can run any callable it names, so the batches are read by an
unpickler that resolves only the few names a numpy array needs.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import logging
import os
import pickle
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.error import URLError
from urllib.request import urlopen

import numpy as np

from wartok_cli.cache import cache_root
from wartok_cli.errors import WartokError

log = logging.getLogger("wartok")

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
TRAIN_BATCHES = tuple(f"data_batch_{index}" for index in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
# The label names of batches.meta, used when an archive lacks that file.
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SIDE = 32
DOWNLOAD_TIMEOUT_S = 60


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 pickles of protocol 2 or lower store bytes as _codecs.encode(text, "latin1").
    if encoding.lower().replace("-", "") != "latin1":
        raise pickle.UnpicklingError(f"codec {encoding!r} is not allowed in a CIFAR-10 batch")
    return codecs.encode(text, "latin1")


def _plain_dtype(*args: Any) -> np.dtype:
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError("object arrays are not allowed in a CIFAR-10 batch")
    return dtype


# Every global a CIFAR-10 batch may name: numpy's array reconstructors (under their numpy 1 and
# numpy 2 module names, and the protocol 5 variant), ndarray, dtype, and the latin-1 codec.
_RECONSTRUCT = np.empty(0).__reduce__()[0]
_FROMBUFFER = np.empty(0).__reduce_ex__(5)[0]
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _plain_dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in ``_ALLOWED_GLOBALS``."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch") from None


def load_batch(raw: bytes, where: str) -> Any:
    """Unpickle one batch; byte strings of Python 2 pickles stay bytes, as in the original files."""
    try:
        return _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise WartokError(f"{where} is not a valid CIFAR-10 batch: {error}") from error


@dataclass
class CifarArrays:
    """The decoded archive: images (N, 32, 32, 3) uint8 and labels (N,) int64 per split."""

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    classes: list[str]


def _batch_arrays(batch: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (images (N, 32, 32, 3), labels (N,)) of one unpickled batch."""
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise WartokError(f"{where}: expected a dict with b'data' and b'labels', as in CIFAR-10 batches.")
    data = batch[b"data"]
    data = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray)) else np.asarray(data)
    if data.dtype != np.uint8 or data.size % (3 * SIDE * SIDE):
        raise WartokError(f"{where}: b'data' must be uint8 with 3072 values per image, got {data.dtype} {data.shape}.")
    count = data.size // (3 * SIDE * SIDE)
    labels = np.asarray(batch[b"labels"])
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
        raise WartokError(f"{where}: expected {count} integer labels, got {labels.dtype} {labels.shape}.")
    # Rows are channel-major (CHW); the shard writer wants HWC.
    images = data.reshape(count, 3, SIDE, SIDE).transpose(0, 2, 3, 1)
    return images, labels.astype(np.int64)


def read_archive(path: Path) -> CifarArrays:
    """Read every batch of a CIFAR-10 python archive."""
    needed = set(TRAIN_BATCHES) | {TEST_BATCH, META}
    batches: dict[str, Any] = {}
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                name = PurePosixPath(member.name).name
                if member.isfile() and name in needed:
                    # Read the whole member first, so that a damaged archive is reported as such.
                    raw = archive.extractfile(member).read()
                    batches[name] = load_batch(raw, f"{path}:{member.name}")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise WartokError(
            f"Failed to read the CIFAR-10 archive {path}: {error}. Fetch it again, or check data.path."
        ) from error
    missing = [name for name in (*TRAIN_BATCHES, TEST_BATCH) if name not in batches]
    if missing:
        raise WartokError(
            f"{path} is not a CIFAR-10 python archive: cifar-10-batches-py/{missing[0]} is missing "
            f"({len(missing)} of the 6 batches are). The expected file is {ARCHIVE_NAME}."
        )

    train = [_batch_arrays(batches[name], f"{path}:{name}") for name in TRAIN_BATCHES]
    val_images, val_labels = _batch_arrays(batches[TEST_BATCH], f"{path}:{TEST_BATCH}")
    classes = list(CLASSES)
    meta = batches.get(META)
    if isinstance(meta, dict) and isinstance(meta.get(b"label_names"), list):
        classes = [name.decode() if isinstance(name, bytes) else str(name) for name in meta[b"label_names"]]
    return CifarArrays(
        train_images=np.concatenate([images for images, _ in train]),
        train_labels=np.concatenate([labels for _, labels in train]),
        val_images=val_images,
        val_labels=val_labels,
        classes=classes,
    )


def cached_archive_path() -> Path:
    """Return where --download puts the archive: ``$WARTOK_CACHE_DIR/datasets`` or the user cache."""
    return cache_root() / "datasets" / ARCHIVE_NAME


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _by_hand(target: Path) -> str:
    return (
        f"Without network access, download {URL} on another machine and copy it to {target}, "
        "or set data.path to where the file is."
    )


def download_archive(target: Path) -> None:
    """Fetch the archive into ``target`` through a temporary file, checking its md5."""
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    partial = Path(temporary)
    log.info("downloading %s into %s", URL, target)
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with os.fdopen(descriptor, "wb") as output, urlopen(URL, timeout=DOWNLOAD_TIMEOUT_S) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                output.write(block)
    except (URLError, OSError) as error:
        partial.unlink(missing_ok=True)
        reason = getattr(error, "reason", error)
        raise WartokError(f"Failed to download {URL}: {reason}. {_by_hand(target)}") from error
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if digest.hexdigest() != MD5:
        partial.unlink(missing_ok=True)
        raise WartokError(
            f"The file downloaded from {URL} has md5 {digest.hexdigest()}, expected {MD5}, so it was discarded. "
            f"Run the command again, or download the file by hand and copy it to {target}."
        )
    partial.rename(target)
    log.info("downloaded %s (md5 %s)", target, MD5)


def locate_archive(path: Path | None, download: bool) -> Path:
    """Return the archive to read: ``data.path``, else the cached copy; fetch it first if ``download``.

    With ``download`` an existing file must have the official md5; a file named by ``data.path``
    is read as it is otherwise, so that a copy in the same format can stand in for the original.
    """
    target = path if path is not None else cached_archive_path()
    if download and target.is_file():
        actual = _md5(target)
        if actual != MD5:
            raise WartokError(
                f"{target} has md5 {actual}, but {ARCHIVE_NAME} from {URL} has md5 {MD5}. "
                "The file is damaged or a different one: delete it and run the command again with --download."
            )
        return target
    if download:
        download_archive(target)
        return target
    if target.is_file():
        return target
    if path is not None:
        raise WartokError(
            f"data.path: CIFAR-10 archive not found: {path}. Check the path, or run "
            "`wartok prepare RECIPE --download` to fetch it there."
        )
    raise WartokError(
        f"The CIFAR-10 archive is not in the cache ({target}). Run `wartok prepare RECIPE --download` "
        f"to fetch it, or set data.path to a local copy of {ARCHIVE_NAME}."
    )
