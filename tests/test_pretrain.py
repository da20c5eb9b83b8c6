"""pretrain-tokenizer on the bundled images: learning, the discriminator and LPIPS wiring, two processes.

The LPIPS file is built from randomly initialised weights, because the real VGG16
backbone cannot be downloaded on the test machine. The runs check the wiring and
the checkpoints, not the quality that real weights would give.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from conftest import describe, invoke, tiny_recipe
from test_distributed import launch_two
from test_losses import random_lpips_state

from wartok_cli.data.loader import make_loader
from wartok_cli.evaluate.reconstruction import evaluate_tokenizer
from wartok_cli.export import load_tokenizer
from wartok_cli.models.discriminator import PatchDiscriminator

FAMILY_OPTIONS = {
    "conv2d": {"family": "conv2d"},
    "vit1d": {"family": "vit1d", "patch_size": 4, "num_latent_tokens": 16, "width": 32, "encoder_depth": 1,
              "decoder_depth": 1, "heads": 2},
}  # fmt: skip
GAN_OPTIONS = {
    "discriminator_weight": 0.1,
    "discriminator_start": 2,
    "discriminator_layers": 2,
    "discriminator_channels": 8,
    "discriminator_adaptive": True,
    "lecam_weight": 0.05,
    "restart_dead_codes_every": 2,
}
GAN_STEPS = 6


def write_recipe(path: Path, shards_dir: Path, **sections) -> Path:
    """Write the tiny recipe on existing shards, with sections extended by the given fields."""
    recipe = tiny_recipe(path.parent / "runs")
    recipe["data"]["shards_dir"] = str(shards_dir)
    for name, fields in sections.items():
        recipe[name] = {**recipe.get(name, {}), **fields}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def read_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "logs" / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


# Learning ---------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=sorted(FAMILY_OPTIONS))
def family_run(request, prepared, tmp_path_factory) -> dict:
    """Pretrain a tiny tokenizer of one family for 30 steps of 16 images."""
    root = tmp_path_factory.mktemp(f"pretrain-{request.param}")
    stage = {"steps": 30, "batch_size": 16, "lr": 2e-3, "warmup_steps": 3, "log_every": 5}
    path = write_recipe(root / "recipe.yaml", prepared.shards_dir, tokenizer=FAMILY_OPTIONS[request.param],
                        pretrain=stage)  # fmt: skip
    result = invoke("pretrain-tokenizer", str(path))
    return {"result": result, "dir": root / "runs" / "tokenizer"}


def test_family_pretrain_exits_zero(family_run):
    assert family_run["result"].exit_code == 0, describe(family_run["result"])


def test_family_reconstruction_loss_falls(family_run):
    rows = read_rows(family_run["dir"])
    early = sum(float(row["mse"]) for row in rows[:2]) / 2
    late = sum(float(row["mse"]) for row in rows[-2:]) / 2
    assert len(rows) == 6
    assert late < 0.8 * early


def test_family_metrics_json_validation(family_run):
    metrics = json.loads((family_run["dir"] / "metrics.json").read_text())["validation"]
    assert metrics["images"] == 64


# Discriminator and LPIPS ------------------------------------------------------------------


@pytest.fixture(scope="module")
def gan_run(prepared, tmp_path_factory) -> dict:
    """Pretrain with LPIPS, the discriminator and dead-code restarts; resume for 2 steps; then run train-wartok."""
    root = tmp_path_factory.mktemp("pretrain-gan")
    lpips_path = root / "lpips_vgg.pth"
    torch.save(random_lpips_state(), lpips_path)  # random weights: the real ones cannot be downloaded here
    reconstruction = {**GAN_OPTIONS, "perceptual_weight": 0.1, "lpips_weights": str(lpips_path)}
    stage = {"steps": GAN_STEPS, "log_every": 1, "checkpoint_every": 3}
    wartok = {"steps": 4, "log_every": 1, "init_tokenizer": "tokenizer", "target_prior": None, "target": "ema"}
    path = write_recipe(root / "recipe.yaml", prepared.shards_dir, reconstruction=reconstruction, pretrain=stage,
                        wartok=wartok)  # fmt: skip
    run_dir = root / "runs" / "tokenizer"
    results = {"dir": run_dir, "recipe": path}
    results["first"] = invoke("pretrain-tokenizer", str(path))
    results["rows"] = read_rows(run_dir)
    results["resumed"] = invoke("pretrain-tokenizer", str(path), "--set", f"pretrain.steps={GAN_STEPS + 2}")
    results["wartok"] = invoke("train-wartok", str(path))
    return results


def test_gan_pretrain_exits_zero(gan_run):
    assert gan_run["first"].exit_code == 0, describe(gan_run["first"])


@pytest.mark.parametrize("column", ["perceptual", "g_adv", "g_weight", "d_loss", "lecam", "codes_restarted"])
def test_gan_metrics_columns(gan_run, column):
    assert column in gan_run["rows"][0]


def test_gan_generator_term_off_before_start(gan_run):
    weights = [float(row["g_weight"]) for row in gan_run["rows"]]
    assert weights[:2] == [0.0, 0.0]
    assert all(weight > 0 for weight in weights[2:])


def test_gan_discriminator_trains_from_start(gan_run):
    losses = [float(row["d_loss"]) for row in gan_run["rows"]]
    assert all(math.isnan(loss) for loss in losses[:2])
    assert all(math.isfinite(loss) for loss in losses[2:])


def test_gan_checkpoint_discriminator_optimizer(gan_run):
    checkpoint = gan_run["dir"] / "checkpoints" / f"step-{GAN_STEPS:07d}"
    state = torch.load(checkpoint / "optimizer_1.bin", map_location="cpu", weights_only=True)
    shapes = [parameter.shape for parameter in PatchDiscriminator(1, 8, 2).parameters()]
    assert [state["state"][index]["exp_avg"].shape for index in range(len(shapes))] == shapes
    assert int(state["state"][0]["step"]) == GAN_STEPS - GAN_OPTIONS["discriminator_start"]


def test_gan_checkpoint_lecam_averages(gan_run):
    checkpoint = gan_run["dir"] / "checkpoints" / f"step-{GAN_STEPS:07d}"
    states = [torch.load(path, weights_only=True) for path in sorted(checkpoint.glob("custom_checkpoint_*.pkl"))]
    lecam = [state for state in states if isinstance(state, dict) and set(state) == {"real", "fake", "updates"}]
    assert [state["updates"] for state in lecam] == [GAN_STEPS - GAN_OPTIONS["discriminator_start"]]


def test_gan_final_discriminator_exported(gan_run):
    assert (gan_run["dir"] / "final" / "discriminator.safetensors").is_file()


def test_gan_resume_exits_zero(gan_run):
    assert gan_run["resumed"].exit_code == 0, describe(gan_run["resumed"])


def test_gan_resume_continues_steps(gan_run):
    steps = [int(row["step"]) for row in read_rows(gan_run["dir"])]
    assert steps == list(range(1, GAN_STEPS + 3))


def test_gan_wartok_exits_zero(gan_run):
    assert gan_run["wartok"].exit_code == 0, describe(gan_run["wartok"])


def test_gan_wartok_reuses_discriminator(gan_run):
    assert "discriminator initialised from" in gan_run["wartok"].output


def test_gan_wartok_discriminator_from_start(gan_run):
    # discriminator_start counts the steps of each stage, so train-wartok also starts it at step 2.
    losses = [float(row["d_loss"]) for row in read_rows(gan_run["recipe"].parent / "runs" / "wartok")]
    assert all(math.isnan(loss) for loss in losses[:2])
    assert all(math.isfinite(loss) for loss in losses[2:])


# Two processes ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> dict:
    """Pretrain with dead-code restarts and the discriminator on two real processes."""
    root = tmp_path_factory.mktemp("pretrain-two")
    recipe = tiny_recipe(root / "runs")
    # Two validation shards, so each process reads one in the evaluation pass.
    recipe["data"]["samples_per_shard"] = 32
    recipe["reconstruction"] = GAN_OPTIONS
    recipe["pretrain"] = {**recipe["pretrain"], "log_every": 1}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    prepared = invoke("prepare", str(path))
    assert prepared.exit_code == 0, describe(prepared)
    result = launch_two(["pretrain-tokenizer", str(path)], root, root / "cache")
    return {"result": result, "dir": root / "runs" / "tokenizer", "shards": root / "runs" / "data"}


def test_two_processes_exit_zero(two_process_run):
    result = two_process_run["result"]
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_processes_restart_codes(two_process_run):
    rows = read_rows(two_process_run["dir"])
    assert "restarted" in two_process_run["result"].stderr
    assert float(rows[-1]["codes_restarted"]) > 0


@pytest.mark.parametrize("name", ["tokenizer", "discriminator"])
def test_two_processes_weights_identical(two_process_run, name):
    # check_in_sync compares checksums of every weight, the codebook included, across both ranks.
    assert f"weights of {name} identical on 2 processes" in two_process_run["result"].stderr


def single_process_metrics(two_process_run) -> dict:
    tokenizer = load_tokenizer(two_process_run["dir"])
    loader = make_loader(two_process_run["shards"], "val", batch_size=4, channels=1, train=False)
    return evaluate_tokenizer(tokenizer, loader, Accelerator(cpu=True))


def test_two_processes_usage_equals_single(two_process_run):
    metrics = json.loads((two_process_run["dir"] / "metrics.json").read_text())["validation"]
    single = single_process_metrics(two_process_run)
    assert metrics["images"] == single["images"]
    assert metrics["codebook_usage"] == single["codebook_usage"]
    assert metrics["perplexity"] == pytest.approx(single["perplexity"], rel=1e-9)
