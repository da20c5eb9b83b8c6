"""The prepare command and the three training commands, run through the CLI on the bundled images, and their outputs."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import (
    CODEBOOK_SIZE,
    LOG_EVERY,
    RESOLUTION,
    SAMPLES_PER_SHARD,
    STEPS,
    TOKENS_PER_IMAGE,
    TRAIN_IMAGES,
    VAL_IMAGES,
    describe,
    invoke,
)
from safetensors.torch import load_file

import wartok_cli
from wartok_cli.data.loader import make_loader
from wartok_cli.recipe import load_recipe

SPLIT_COUNTS = {"train": TRAIN_IMAGES, "val": VAL_IMAGES}
TOKENIZER_RUNS = ("tokenizer", "wartok")


def first_val_batch(workspace, batch_size: int = 8) -> torch.Tensor:
    """Return the first validation images, (batch, 1, 16, 16) in [-1, 1]."""
    loader = make_loader(workspace.shards_dir, "val", batch_size=batch_size, channels=1, train=False)
    return next(iter(loader))["images"]


# prepare ------------------------------------------------------------------------------------


def test_prepare_exits_zero(prepared):
    result = prepared.results["prepare"]
    assert result.exit_code == 0, describe(result)


@pytest.mark.parametrize("split", sorted(SPLIT_COUNTS))
def test_manifest_split_counts(prepared, split):
    manifest = prepared.manifest()
    assert manifest["splits"][split]["count"] == SPLIT_COUNTS[split]


@pytest.mark.parametrize("split", sorted(SPLIT_COUNTS))
def test_manifest_per_class_totals(prepared, split):
    per_class = prepared.manifest()["splits"][split]["per_class"]
    assert sum(per_class.values()) == SPLIT_COUNTS[split]


@pytest.mark.parametrize("split", sorted(SPLIT_COUNTS))
def test_manifest_shard_counts(prepared, split):
    shards = prepared.manifest()["splits"][split]["shards"]
    assert [shard["count"] for shard in shards] == [SAMPLES_PER_SHARD] * (SPLIT_COUNTS[split] // SAMPLES_PER_SHARD)


@pytest.mark.parametrize("split", sorted(SPLIT_COUNTS))
def test_manifest_shards_exist(prepared, split):
    shards = prepared.manifest()["splits"][split]["shards"]
    missing = [shard["name"] for shard in shards if not (prepared.shards_dir / shard["name"]).is_file()]
    assert missing == []


def test_manifest_records_resolution(prepared):
    assert prepared.manifest()["resolution"] == RESOLUTION


def test_prepare_leaves_no_staging(prepared):
    leftovers = [path.name for path in prepared.output_dir.iterdir() if ".tmp-" in path.name]
    assert leftovers == []


def test_prepare_rerun_keeps_shards(prepared):
    before = (prepared.shards_dir / "manifest.json").stat().st_mtime_ns
    result = invoke("prepare", str(prepared.recipe_path))
    assert result.exit_code == 0, describe(result)
    assert (prepared.shards_dir / "manifest.json").stat().st_mtime_ns == before


# Training stages ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["pretrain-tokenizer", "train-prior", "train-wartok"])
def test_stage_exits_zero(pipeline, command):
    result = pipeline.results[command]
    assert result.exit_code == 0, describe(result)


@pytest.mark.parametrize(
    "relative",
    [
        "tokenizer/final/tokenizer.safetensors",
        "tokenizer/final/tokenizer.json",
        "tokenizer/metrics.json",
        "tokenizer/recipe.resolved.yaml",
        "tokenizer/logs/metrics.csv",
        "prior/final/prior.safetensors",
        "prior/final/prior.json",
        "prior/metrics.json",
        "prior/recipe.resolved.yaml",
        "prior/logs/metrics.csv",
        "wartok/final/tokenizer.safetensors",
        "wartok/final/tokenizer.json",
        "wartok/metrics.json",
        "wartok/logs/metrics.csv",
    ],
)
def test_stage_output_exists(pipeline, relative):
    assert (pipeline.output_dir / relative).is_file()


@pytest.mark.parametrize("run", ["tokenizer", "prior", "wartok"])
def test_final_checkpoint_complete(pipeline, run):
    names = sorted(path.name for path in (pipeline.output_dir / run / "checkpoints").iterdir())
    assert names == [f"step-{STEPS:07d}"]


@pytest.mark.parametrize("run", ["tokenizer", "prior", "wartok"])
def test_resolved_recipe_round_trip(pipeline, run):
    resolved = load_recipe(pipeline.output_dir / run / "recipe.resolved.yaml")
    assert resolved == load_recipe(pipeline.recipe_path)


@pytest.mark.parametrize("run", ["tokenizer", "prior", "wartok"])
def test_metrics_csv_rows(pipeline, run):
    with open(pipeline.output_dir / run / "logs" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["step"]) for row in rows] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))


@pytest.mark.parametrize("run", ["tokenizer", "prior", "wartok"])
def test_metrics_csv_loss_finite(pipeline, run):
    with open(pipeline.output_dir / run / "logs" / "metrics.csv", newline="") as handle:
        losses = [float(row["loss"]) for row in csv.DictReader(handle)]
    assert all(math.isfinite(loss) for loss in losses), losses


def test_wartok_csv_has_wgf_columns(pipeline):
    with open(pipeline.output_dir / "wartok" / "logs" / "metrics.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert {"l_wgf", "aux_ce", "target_ce", "contrast_mean"} <= set(header), header


@pytest.mark.parametrize("run", TOKENIZER_RUNS)
def test_metrics_csv_logs_fixed_batch_psnr(pipeline, run):
    with open(pipeline.output_dir / run / "logs" / "metrics.csv", newline="") as handle:
        values = [float(row["val_psnr"]) for row in csv.DictReader(handle)]
    assert len(values) == STEPS // LOG_EVERY
    assert all(math.isfinite(value) and value > 0 for value in values), values


def test_fixed_batch_psnr_matches_evaluation(pipeline):
    from accelerate import Accelerator

    from wartok_cli.evaluate.reconstruction import evaluate_tokenizer, fixed_batch_psnr
    from wartok_cli.export import load_tokenizer

    tokenizer = load_tokenizer(pipeline.output_dir / "wartok")
    images = first_val_batch(pipeline, batch_size=VAL_IMAGES)
    accelerator = Accelerator(cpu=True)
    full = evaluate_tokenizer(tokenizer, [{"images": images}], accelerator)
    assert full["images"] == VAL_IMAGES
    assert fixed_batch_psnr(tokenizer, images, accelerator) == pytest.approx(full["psnr"], rel=1e-6)


@pytest.mark.parametrize("run", TOKENIZER_RUNS)
def test_tokenizer_metrics_count_val(pipeline, run):
    metrics = json.loads((pipeline.output_dir / run / "metrics.json").read_text())
    assert metrics["validation"]["images"] == VAL_IMAGES


@pytest.mark.parametrize("run", TOKENIZER_RUNS)
def test_tokenizer_metrics_psnr_finite(pipeline, run):
    metrics = json.loads((pipeline.output_dir / run / "metrics.json").read_text())
    assert math.isfinite(metrics["validation"]["psnr"])


def test_prior_metrics_validation_gloss(pipeline):
    metrics = json.loads((pipeline.output_dir / "prior" / "metrics.json").read_text())
    gloss = metrics["validation"]["gloss"]
    assert math.isfinite(gloss)
    assert gloss > 0


def test_prior_metrics_uniform_baseline(pipeline):
    metrics = json.loads((pipeline.output_dir / "prior" / "metrics.json").read_text())
    assert metrics["uniform_baseline"] == pytest.approx(math.log(CODEBOOK_SIZE))


def test_token_cache_in_cache_dir(pipeline):
    cached = sorted(path.name for path in (pipeline.cache_dir / "tokens").glob("*.npz"))
    assert len(cached) == 2, cached


def test_wartok_changed_tokenizer_weights(pipeline):
    pretrained = load_file(str(pipeline.output_dir / "tokenizer" / "final" / "tokenizer.safetensors"))
    aligned = load_file(str(pipeline.output_dir / "wartok" / "final" / "tokenizer.safetensors"))
    changed = [name for name in pretrained if not torch.equal(pretrained[name], aligned[name])]
    assert changed, "train-wartok exported the pretrained weights unchanged"


# Exported models ----------------------------------------------------------------------------


@pytest.mark.parametrize("run", TOKENIZER_RUNS)
def test_exported_tokenizer_index_shape(pipeline, run):
    tokenizer = wartok_cli.load_tokenizer(pipeline.output_dir / run)
    images = first_val_batch(pipeline)
    with torch.no_grad():
        indices = tokenizer.encode(images).indices
    assert indices.shape == (len(images), TOKENS_PER_IMAGE)
    assert indices.dtype == torch.int64
    assert int(indices.min()) >= 0
    assert int(indices.max()) < CODEBOOK_SIZE


@pytest.mark.parametrize("run", TOKENIZER_RUNS)
def test_exported_tokenizer_decode_shape(pipeline, run):
    tokenizer = wartok_cli.load_tokenizer(pipeline.output_dir / run / "final")
    images = first_val_batch(pipeline)
    with torch.no_grad():
        decoded = tokenizer.decode_indices(tokenizer.encode(images).indices)
    assert decoded.shape == images.shape


def test_exported_tokenizer_from_safetensors(pipeline):
    path = pipeline.output_dir / "wartok" / "final" / "tokenizer.safetensors"
    tokenizer = wartok_cli.load_tokenizer(path)
    assert tokenizer.codebook_size == CODEBOOK_SIZE


def test_exported_prior_scores_tokens(pipeline):
    tokenizer = wartok_cli.load_tokenizer(pipeline.output_dir / "tokenizer")
    prior = wartok_cli.load_prior(pipeline.output_dir / "prior")
    with torch.no_grad():
        tokens = tokenizer.encode(first_val_batch(pipeline)).indices
        loss = prior.loss(tokens)
    assert math.isfinite(loss.item())


# The console entry point --------------------------------------------------------------------


def test_module_help_lists_commands():
    completed = subprocess.run(
        [sys.executable, "-m", "wartok_cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    for command in ("prepare", "pretrain-tokenizer", "train-prior", "train-wartok"):
        assert command in completed.stdout, command


def test_module_prepare_subprocess(prepared):
    completed = subprocess.run(
        [sys.executable, "-m", "wartok_cli", "prepare", str(prepared.recipe_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert "already complete" in completed.stderr
