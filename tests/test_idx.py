"""read_idx on IDX files written here: round trips, plain and gzip, and damaged files."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from wartok_cli.data.idx import read_idx
from wartok_cli.errors import WartokError

TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode an array as IDX: two zero bytes, type code, rank, big-endian sizes, big-endian data."""
    header = bytes([0, 0, TYPE_CODES[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, payload: bytes) -> Path:
    """Write IDX bytes, gzip-compressed when the name ends in .gz."""
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)
    return path


def sample_images() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", ["images.idx", "images.idx.gz"])
def test_uint8_round_trip(tmp_path, name):
    images = sample_images()
    path = write_idx(tmp_path / name, idx_bytes(images))
    assert np.array_equal(read_idx(path), images)


@pytest.mark.parametrize("name", ["images.idx", "images.idx.gz"])
def test_uint8_keeps_shape(tmp_path, name):
    path = write_idx(tmp_path / name, idx_bytes(sample_images()))
    assert read_idx(path).shape == (5, 7, 3)


@pytest.mark.parametrize("dtype", [np.int32, np.float32])
def test_wide_types_round_trip(tmp_path, dtype):
    values = (np.arange(24).reshape(2, 3, 4) * 1000 - 7000).astype(dtype)
    path = write_idx(tmp_path / "values.idx", idx_bytes(values))
    assert np.array_equal(read_idx(path), values)


@pytest.mark.parametrize("dtype", [np.int32, np.float32])
def test_wide_types_native_order(tmp_path, dtype):
    values = np.arange(6, dtype=dtype)
    path = write_idx(tmp_path / "values.idx", idx_bytes(values))
    assert read_idx(path).dtype.isnative


def test_labels_round_trip(tmp_path):
    labels = np.array([3, 1, 4, 1, 5, 9], dtype=np.uint8)
    path = write_idx(tmp_path / "labels.idx.gz", idx_bytes(labels))
    assert np.array_equal(read_idx(path), labels)


@pytest.mark.parametrize("name", ["images.idx", "images.idx.gz"])
def test_truncated_data_names_path(tmp_path, name):
    path = write_idx(tmp_path / name, idx_bytes(sample_images())[:-10])
    with pytest.raises(WartokError, match="truncated") as raised:
        read_idx(path)
    assert str(path) in str(raised.value)


def test_truncated_gzip_stream_names_path(tmp_path):
    path = write_idx(tmp_path / "images.idx.gz", idx_bytes(sample_images()))
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(WartokError) as raised:
        read_idx(path)
    assert str(path) in str(raised.value)


def test_truncated_header_names_path(tmp_path):
    path = write_idx(tmp_path / "images.idx", idx_bytes(sample_images())[:9])
    with pytest.raises(WartokError) as raised:
        read_idx(path)
    assert str(path) in str(raised.value)


def test_trailing_bytes_rejected(tmp_path):
    path = write_idx(tmp_path / "images.idx", idx_bytes(sample_images()) + b"\x00\x00")
    with pytest.raises(WartokError, match="truncated or corrupt"):
        read_idx(path)


def test_bad_magic_names_path(tmp_path):
    path = write_idx(tmp_path / "photo.png", b"\x89PNG\r\n\x1a\n" + bytes(32))
    with pytest.raises(WartokError, match="is not an IDX file") as raised:
        read_idx(path)
    assert str(path) in str(raised.value)


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "absent.idx"
    with pytest.raises(WartokError, match="not found") as raised:
        read_idx(path)
    assert str(path) in str(raised.value)
