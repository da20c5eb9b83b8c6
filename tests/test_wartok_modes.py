"""train-wartok's target modes and auxiliary-prior starts, each run through the CLI on tiny models."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from conftest import describe, invoke

from wartok_cli.export import load_tokenizer

MODES = {
    "frozen-copy": [],
    "ema-fit": ["wartok.target=ema", "wartok.target_half_life=5", "wartok.aux_init=fit", "wartok.aux_fit_steps=3"],
    "online-fresh": ["wartok.target=online", "wartok.aux_init=fresh"],
    "target-only": ["wartok.contrast=target_only", "wartok.weight=0.1"],
    "encoder-only": ["wartok.codebook_gradient=false"],
    "from-scratch": ["wartok.target=online", "wartok.init_tokenizer=null", "wartok.target_prior=null"],
    # lambda = 0 ignores the auxiliary prior, its fit steps included.
    "control": ["wartok.weight=0", "wartok.aux_init=fit", "wartok.aux_fit_steps=3"],
}


@pytest.fixture(scope="module")
def mode_runs(pipeline, monkeypatch_module):
    runs = {}
    for name, overrides in MODES.items():
        sets = [argument for override in overrides for argument in ("--set", override)]
        run_dir = pipeline.output_dir / f"mode-{name}"
        # Each mode writes its own output folder, which reuses the session's shards and runs.
        folder_sets = ["--set", f"data.shards_dir={pipeline.shards_dir}",
                       "--set", f"wartok.init_tokenizer={pipeline.output_dir / 'tokenizer'}",
                       "--set", f"wartok.target_prior={pipeline.output_dir / 'prior'}",
                       "--set", f"output_dir={run_dir}"]  # fmt: skip
        result = invoke("train-wartok", str(pipeline.recipe_path), *folder_sets, *sets)
        runs[name] = (result, run_dir / "wartok")
    return runs


@pytest.fixture(scope="module")
def monkeypatch_module(pipeline):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WARTOK_CACHE_DIR", str(pipeline.cache_dir))
        yield patch


@pytest.mark.parametrize("mode", MODES)
def test_mode_completes(mode_runs, mode):
    result, _ = mode_runs[mode]
    assert result.exit_code == 0, describe(result)


@pytest.mark.parametrize("mode", MODES)
def test_mode_exports_tokenizer(mode_runs, mode):
    _, run_dir = mode_runs[mode]
    assert load_tokenizer(run_dir).codebook_size == 32


def test_fit_steps_log_zero_lambda(mode_runs):
    _, run_dir = mode_runs["ema-fit"]
    rows = list(csv.DictReader(open(run_dir / "logs" / "metrics.csv")))
    by_step = {int(row["step"]): row for row in rows}
    # Step 3 is the last of the three fit steps: lambda is 0 and q_aux trained on the tokens.
    assert float(by_step[3]["lambda"]) == 0.0
    assert math.isfinite(float(by_step[3]["aux_ce"]))
    assert float(by_step[6]["lambda"]) == 1.0


def test_copied_aux_contrast_starts_zero(mode_runs):
    _, run_dir = mode_runs["frozen-copy"]
    first = next(csv.DictReader(open(run_dir / "logs" / "metrics.csv")))
    # After 3 steps q_aux has moved a little from its copy of the target, so the contrast is small.
    assert abs(float(first["contrast_mean"])) < 0.5


def test_control_runs_no_auxiliary_prior(mode_runs):
    _, run_dir = mode_runs["control"]
    header = next(csv.reader(open(run_dir / "logs" / "metrics.csv")))
    assert {"target_ce", "val_psnr", "usage_recent"} <= set(header), header
    assert not {"aux_ce", "l_wgf", "contrast_mean"} & set(header), header


def test_control_trains_from_the_first_step(pipeline, mode_runs):
    _, run_dir = mode_runs["control"]
    start = load_tokenizer(pipeline.output_dir / "tokenizer").state_dict()
    trained = load_tokenizer(run_dir).state_dict()
    changed = [name for name in start if not torch.equal(start[name], trained[name])]
    assert changed, "the lambda = 0 run left every tokenizer weight unchanged"


def test_frozen_target_without_prior_rejected(pipeline):
    result = invoke("recipe", "validate", str(pipeline.recipe_path), "--set", "wartok.target_prior=null")
    assert result.exit_code == 2
    assert "target 'frozen' needs target_prior" in result.output


def test_fit_without_steps_rejected(pipeline):
    result = invoke("recipe", "validate", str(pipeline.recipe_path), "--set", "wartok.aux_init=fit")
    assert result.exit_code == 2
    assert "aux_fit_steps" in result.output
