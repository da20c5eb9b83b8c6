"""`wartok sample`: reproducible streams, the key/value cache, labels, output files and reruns."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import CODEBOOK_SIZE, RESOLUTION, TOKENS_PER_IMAGE, describe, invoke, tiny_recipe
from PIL import Image
from test_prior import launch_two

import wartok_cli
from wartok_cli.errors import WartokError
from wartok_cli.models import ARPrior
from wartok_cli.sample import (
    ARRAYS_FILE,
    GRID_FILE,
    SETTINGS_FILE,
    guidance_scales,
    next_tokens,
    sample_labels,
    sample_tokens,
    sample_uniforms,
)

NUM_SAMPLES = 20
NUM_CLASSES = 10
SAMPLING = {"num_samples": NUM_SAMPLES, "cfg_scale": 1.5, "cfg_schedule": "linear", "top_k": 16, "top_p": 0.95,
            "temperature": 0.9, "preview": 12}  # fmt: skip


# Drawing tokens -----------------------------------------------------------------------------


def test_uniforms_independent_of_batch():
    together = sample_uniforms(3, [4, 9, 2], 16)
    alone = sample_uniforms(3, [9], 16)
    assert torch.equal(together[1], alone[0])


def test_uniforms_differ_between_samples():
    streams = sample_uniforms(3, [0, 1], 16)
    assert not torch.equal(streams[0], streams[1])


def test_next_tokens_inverse_cdf():
    logits = torch.log(torch.tensor([[0.5, 0.0, 0.25, 0.25]])).expand(4, 4)
    tokens = next_tokens(logits, torch.tensor([0.0, 0.49, 0.6, 0.99]), 1.0, None, 1.0)
    assert tokens.tolist() == [0, 0, 2, 3]


def test_next_tokens_top_k_support():
    logits = torch.randn(1, CODEBOOK_SIZE).expand(200, CODEBOOK_SIZE)
    tokens = next_tokens(logits, torch.rand(200, generator=torch.Generator().manual_seed(0)), 1.0, 3, 1.0)
    assert set(tokens.tolist()) <= set(logits[0].topk(3).indices.tolist())


def test_next_tokens_top_p_support():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    uniforms = torch.linspace(0, 0.999, 50)
    tokens = next_tokens(probs.log().expand(50, 4), uniforms, 1.0, None, 0.75)
    assert set(tokens.tolist()) == {0, 1}


def test_guidance_linear_endpoints():
    scales = guidance_scales(3.0, "linear", 5)
    assert scales[0] == 1.0
    assert scales[-1] == 3.0


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_kv_cache_same_tokens(positions):
    torch.manual_seed(0)
    prior = ARPrior(CODEBOOK_SIZE, 24, NUM_CLASSES, width=32, depth=2, heads=2, positions=positions)
    labels = torch.tensor([0, 3, 7, 9, 1, 2])
    uniforms = sample_uniforms(0, list(range(6)), 24)
    settings = {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "cfg_scale": 2.0, "cfg_schedule": "linear"}
    cached = sample_tokens(prior, labels, uniforms, use_kv_cache=True, **settings)
    recomputed = sample_tokens(prior, labels, uniforms, use_kv_cache=False, **settings)
    assert torch.equal(cached, recomputed)


def test_kv_cache_same_tokens_trained(pipeline):
    prior = wartok_cli.load_prior(pipeline.output_dir / "prior")
    labels = torch.arange(NUM_CLASSES)
    uniforms = sample_uniforms(5, list(range(NUM_CLASSES)), prior.seq_len)
    cached = sample_tokens(prior, labels, uniforms, cfg_scale=3.0, top_k=8)
    recomputed = sample_tokens(prior, labels, uniforms, cfg_scale=3.0, top_k=8, use_kv_cache=False)
    assert torch.equal(cached, recomputed)


def test_labels_balanced_histogram():
    labels = sample_labels("balanced", 30, NUM_CLASSES, [])
    assert np.bincount(labels).tolist() == [3] * NUM_CLASSES


def test_labels_given_classes_cycle():
    assert sample_labels("classes", 5, NUM_CLASSES, [2, 7]) == [2, 7, 2, 7, 2]


def test_labels_unknown_class_rejected():
    with pytest.raises(WartokError, match=r"classes \[12\]"):
        sample_labels("classes", 5, NUM_CLASSES, [2, 12])


# The command --------------------------------------------------------------------------------


def sample_recipe(root: Path, pipeline, **sample) -> Path:
    """Write a recipe sampling from the session's prior; its tokenizer comes from the prior's metrics.json."""
    recipe = tiny_recipe(root / "runs")
    recipe["data"]["shards_dir"] = str(pipeline.shards_dir)
    recipe["sample"] = {"prior": str(pipeline.output_dir / "prior"), **SAMPLING, **sample}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def sample_files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.png")) if path.name != GRID_FILE}


@pytest.fixture(scope="module")
def sampled(pipeline, tmp_path_factory):
    """Sample the same settings three times: default folder and batch 7, batch 4, and two processes with batch 3."""
    root = tmp_path_factory.mktemp("sample")
    path = sample_recipe(root, pipeline, batch_size=7)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the launched processes run one thread each, and decoding numerics depend on it
    try:
        default = invoke("sample", str(path))
        small_batches = invoke("sample", str(path), "--set", "sample.batch_size=4", "--set", "sample.name=batch4")
    finally:
        torch.set_num_threads(threads)
    two = launch_two(["sample", str(path), "--set", "sample.batch_size=3", "--set", "sample.name=two"], root,
                     root / "cache")  # fmt: skip
    samples = root / "runs" / "samples"
    folders = [folder for folder in samples.iterdir() if folder.name.startswith("prior-")]
    return {
        "results": {"default": default, "batch4": small_batches, "two": two},
        "default": folders[0] if len(folders) == 1 else None,
        "batch4": samples / "batch4",
        "two": samples / "two",
        "recipe": path,
        "folders": folders,
    }


def test_sample_commands_exit_zero(sampled):
    results = sampled["results"]
    assert results["default"].exit_code == 0, describe(results["default"])
    assert results["batch4"].exit_code == 0, describe(results["batch4"])
    assert results["two"].returncode == 0, results["two"].stderr[-3000:]


def test_default_folder_named_by_prior(sampled):
    assert [folder.name[: len("prior-")] for folder in sampled["folders"]] == ["prior-"]


def test_png_count(sampled):
    assert len(sample_files(sampled["default"])) == NUM_SAMPLES


def test_png_names_index_and_class(sampled):
    names = sorted(sample_files(sampled["default"]))
    assert names[:2] == ["000000-class0.png", "000001-class1.png"]
    assert names[-1] == "000019-class9.png"


def test_same_files_other_batch_size(sampled):
    assert sample_files(sampled["batch4"]) == sample_files(sampled["default"])


def test_same_files_two_processes(sampled):
    assert sample_files(sampled["two"]) == sample_files(sampled["default"])


def test_two_processes_report(sampled):
    assert "on 2 process(es)" in sampled["results"]["two"].stderr


def test_npz_arrays(sampled):
    with np.load(sampled["default"] / ARRAYS_FILE) as arrays:
        assert arrays["images"].shape == (NUM_SAMPLES, RESOLUTION, RESOLUTION, 1)
        assert arrays["images"].dtype == np.uint8
        assert arrays["tokens"].shape == (NUM_SAMPLES, TOKENS_PER_IMAGE)
        assert arrays["labels"].shape == (NUM_SAMPLES,)


def test_npz_balanced_histogram(sampled):
    with np.load(sampled["default"] / ARRAYS_FILE) as arrays:
        histogram = np.bincount(arrays["labels"], minlength=NUM_CLASSES)
    assert histogram.tolist() == [NUM_SAMPLES // NUM_CLASSES] * NUM_CLASSES


def test_npz_settings_metadata(sampled):
    with np.load(sampled["default"] / ARRAYS_FILE) as arrays:
        settings = json.loads(str(arrays["settings"]))
    expected = {key: SAMPLING[key] for key in ("cfg_scale", "cfg_schedule", "top_k", "top_p", "temperature")}
    assert {key: settings[key] for key in expected} == expected
    assert settings["seed"] == 0


def test_npz_matches_pngs(sampled):
    folder = sampled["default"]
    with np.load(folder / ARRAYS_FILE) as arrays:
        images, tokens = arrays["images"], arrays["tokens"]
    first = min(folder.glob("000003-*.png"))
    with Image.open(first) as picture:
        assert np.array_equal(np.asarray(picture), images[3, ..., 0])
        assert [int(token) for token in picture.text["wartok-tokens"].split()] == tokens[3].tolist()


def test_npz_same_two_processes(sampled):
    with np.load(sampled["default"] / ARRAYS_FILE) as one, np.load(sampled["two"] / ARRAYS_FILE) as two:
        for name in ("images", "labels", "tokens", "settings"):
            assert np.array_equal(one[name], two[name]), name


def test_samples_distinct(sampled):
    with np.load(sampled["default"] / ARRAYS_FILE) as arrays:
        assert len({tuple(row) for row in arrays["tokens"].tolist()}) == NUM_SAMPLES


def test_tokens_decode_to_images(sampled, pipeline):
    # Each PNG is the tokenizer's decoding of its stored tokens, up to rounding.
    tokenizer = wartok_cli.load_tokenizer(pipeline.output_dir / "tokenizer")
    with np.load(sampled["default"] / ARRAYS_FILE) as arrays:
        tokens, images = torch.from_numpy(arrays["tokens"][:1]), arrays["images"][:1]
    with torch.no_grad():
        decoded = ((tokenizer.decode_indices(tokens).clamp(-1, 1) + 1) * 127.5).round()
    assert np.abs(decoded.permute(0, 2, 3, 1).numpy() - images).max() <= 1


def test_grid_written(sampled):
    with Image.open(sampled["default"] / GRID_FILE) as grid:
        width, height = grid.size
    columns, rows = NUM_CLASSES, math.ceil(SAMPLING["preview"] / NUM_CLASSES)
    assert (width, height) == (columns * (RESOLUTION + 2), rows * (RESOLUTION + 2))


def test_settings_json_records_sources(sampled, pipeline):
    record = json.loads((sampled["default"] / SETTINGS_FILE).read_text())
    assert record["tokenizer"] == str(pipeline.output_dir / "tokenizer")


def test_other_settings_same_name_rejected(sampled):
    result = invoke("sample", str(sampled["recipe"]), "--set", "sample.name=batch4", "--set", "sample.temperature=0.5")
    assert result.exit_code == 2, describe(result)
    assert "temperature: 0.9 in the folder, 0.5 now" in result.output


def test_missing_prior_user_error(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "runs"), sort_keys=False))
    result = invoke("sample", str(path))
    assert result.exit_code == 2, describe(result)
    assert f"No prior found at {tmp_path / 'runs' / 'prior'}" in result.output


def test_balanced_count_not_multiple_rejected(sampled):
    result = invoke("sample", str(sampled["recipe"]), "--set", "sample.num_samples=15")
    assert result.exit_code == 2, describe(result)
    assert "not a multiple of 10" in result.output


@pytest.fixture(scope="module")
def rerun(sampled):
    """Delete three finished PNGs and the .npz of the batch-4 folder, record the rest, and sample again."""
    folder = sampled["batch4"]
    before = sample_files(folder)
    removed = sorted(before)[5:8]
    for name in removed:
        (folder / name).unlink()
    (folder / ARRAYS_FILE).unlink()
    kept_mtimes = {name: (folder / name).stat().st_mtime_ns for name in before if name not in removed}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as when the folder was first written
    try:
        result = invoke("sample", str(sampled["recipe"]), "--set", "sample.batch_size=4", "--set", "sample.name=batch4")
    finally:
        torch.set_num_threads(threads)
    return {"result": result, "folder": folder, "before": before, "removed": removed, "kept": kept_mtimes}


def test_rerun_exits_zero(rerun):
    assert rerun["result"].exit_code == 0, describe(rerun["result"])


def test_rerun_skips_finished(rerun):
    assert f"skipping {NUM_SAMPLES - 3} finished samples" in rerun["result"].output


def test_rerun_keeps_finished_files(rerun):
    folder = rerun["folder"]
    changed = [name for name, mtime in rerun["kept"].items() if (folder / name).stat().st_mtime_ns != mtime]
    assert changed == []


def test_rerun_restores_same_files(rerun):
    assert sample_files(rerun["folder"]) == rerun["before"]


def test_rerun_rewrites_npz(rerun):
    assert (rerun["folder"] / ARRAYS_FILE).is_file()
