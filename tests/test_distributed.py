"""Two real CPU processes over gloo, launched with `accelerate launch` as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import launch_two

from wartok_cli.data.loader import make_loader


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> dict:
    """Prepare tiny shards, then pretrain a tokenizer and train a prior on two processes."""
    root = tmp_path_factory.mktemp("distributed")
    stage = {"steps": 6, "batch_size": 8, "log_every": 3, "checkpoint_every": 3, "warmup_steps": 1}
    recipe = {
        "output_dir": str(root / "run"),
        "data": {"fit": "pad", "max_train_images": 256, "max_val_images": 64, "samples_per_shard": 32,
                 "num_workers": 0, "shuffle_buffer": 32},
        "tokenizer": {"base_channels": 8, "channel_mult": [1, 2, 2], "codebook_size": 32, "code_dim": 4},
        "prior": {"width": 32, "depth": 1, "heads": 2},
        "pretrain": stage,
        "train_prior": stage,
        "wartok": stage,
    }  # fmt: skip
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cache = root / "cache"
    prepared = subprocess.run([sys.executable, "-m", "wartok_cli", "prepare", str(path)], capture_output=True,
                              text=True, env=dict(os.environ, WARTOK_CACHE_DIR=str(cache)))  # fmt: skip
    assert prepared.returncode == 0, prepared.stderr
    results = {"root": root, "recipe": path}
    for command in ("pretrain-tokenizer", "train-prior", "train-wartok"):
        results[command] = launch_two([command, str(path)], root, cache)
    return results


@pytest.mark.parametrize("command", ["pretrain-tokenizer", "train-prior", "train-wartok"])
def test_two_processes_stage_completes(two_process_run, command):
    result = two_process_run[command]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stderr


@pytest.mark.parametrize(("command", "run_name"), [("pretrain-tokenizer", "tokenizer"), ("train-prior", "prior"),
                                                   ("train-wartok", "wartok")])  # fmt: skip
def test_two_processes_weights_identical(two_process_run, command, run_name):
    # Every stage gathers a checksum of its weights from both ranks at the end and fails if they differ.
    assert f"weights of {run_name} identical on 2 processes" in two_process_run[command].stderr


def test_two_processes_metrics_written(two_process_run):
    metrics = json.loads((two_process_run["root"] / "run" / "tokenizer" / "metrics.json").read_text())
    assert metrics["validation"]["images"] == 64


def test_eval_pass_two_ranks_two_workers_exact(two_process_run):
    # Simulate the 2 x 2 slot layout of an evaluation pass: every key is read exactly once.
    shards = two_process_run["root"] / "run" / "data"
    keys_per_rank = []
    for rank in range(2):
        loader = make_loader(shards, "train", batch_size=5, channels=1, train=False, rank=rank, world_size=2,
                             num_workers=2)  # fmt: skip
        keys_per_rank.append([key for batch in loader for key in batch["keys"]])
    keys = keys_per_rank[0] + keys_per_rank[1]
    assert all(keys_per_rank)
    assert len(keys) == 256
    assert len(set(keys)) == 256
