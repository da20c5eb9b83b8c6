"""Reader for IDX files, the format of MNIST and Fashion-MNIST.

An IDX file is a big-endian header (two zero bytes, a type code, the number of
dimensions, then one 4-byte size per dimension) followed by the raw array.
Files ending in ``.gz`` are decompressed on the fly.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from wartok_cli.errors import WartokError

# Type codes of the IDX header, mapped to big-endian numpy types.
_IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a numpy array."""
    path = Path(path)
    if not path.is_file():
        raise WartokError(f"IDX file not found: {path}. Check the path in the recipe.")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise WartokError(f"Failed to read IDX file {path}: {error}") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise WartokError(
            f"{path} is not an IDX file: its header must start with two zero bytes and a type code."
        )
    dtype = _IDX_TYPES[raw[2]]
    ndim = raw[3]
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise WartokError(f"{path} is truncated: its header promises {ndim} dimensions but the file ends first.")
    shape = struct.unpack(f">{ndim}I", raw[4:header_size])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header_size != expected:
        raise WartokError(
            f"{path} is truncated or corrupt: the header promises {expected} bytes of data "
            f"for shape {shape}, the file holds {len(raw) - header_size}."
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)
    return array.astype(dtype.newbyteorder("="))
