"""Shared fixtures: a tiny recipe on the bundled images, run through the real CLI once per session.

The stages run in-process through typer's CliRunner, so the whole chain costs seconds
instead of one interpreter start per command. Sizes are tiny: 16-pixel images,
an 8 x 8 token grid, a 32-code codebook and a one-block prior.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from wartok_cli.app import app

TRAIN_IMAGES = 256
VAL_IMAGES = 64
SAMPLES_PER_SHARD = 64
RESOLUTION = 16
CODEBOOK_SIZE = 32
TOKENS_PER_IMAGE = 64  # (16 / 2) ** 2: one downsampling level
STEPS = 6
LOG_EVERY = 3
TRAINING_COMMANDS = ("pretrain-tokenizer", "train-prior", "train-wartok")


def stage_settings() -> dict:
    """Return the settings shared by the three training stages: 6 steps of batch 8."""
    return {
        "steps": STEPS,
        "batch_size": 8,
        "warmup_steps": 2,
        "log_every": LOG_EVERY,
        "checkpoint_every": 100,
        "preview_every": 100,
    }


def tiny_recipe(output_dir: Path) -> dict:
    """Return a recipe that trains every stage in a few seconds on the CPU."""
    return {
        "output_dir": str(output_dir),
        "seed": 0,
        "data": {
            "source": "bundled",
            "resolution": RESOLUTION,
            "fit": "pad",
            "max_train_images": TRAIN_IMAGES,
            "max_val_images": VAL_IMAGES,
            "samples_per_shard": SAMPLES_PER_SHARD,
            "num_workers": 0,
            "shuffle_buffer": 64,
        },
        "tokenizer": {
            "base_channels": 8,
            "channel_mult": [1, 2],
            "num_res_blocks": 1,
            "codebook_size": CODEBOOK_SIZE,
            "code_dim": 4,
        },
        "prior": {"width": 32, "depth": 1, "heads": 2},
        "pretrain": stage_settings(),
        "train_prior": {**stage_settings(), "eval_batches": 2},
        "wartok": stage_settings(),
    }


def invoke(*args: str):
    """Run the wartok CLI in-process and return click's Result.

    The CLI points the 'wartok' logger at the runner's captured stderr, which is
    closed afterwards, so the logger's previous state is restored on return.
    """
    logger = logging.getLogger("wartok")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    try:
        return CliRunner().invoke(app, list(args))
    finally:
        logger.handlers[:] = saved[0]
        logger.propagate = saved[1]
        logger.setLevel(saved[2])


def describe(result) -> str:
    """Return a command's exit code, output and exception, for assertion messages."""
    return f"exit code {result.exit_code}\noutput:\n{result.output}\nexception: {result.exception!r}"


@dataclass
class Workspace:
    """A recipe file, its output folder and the token cache folder of the session."""

    recipe_path: Path
    output_dir: Path
    cache_dir: Path
    results: dict = field(default_factory=dict)

    @property
    def shards_dir(self) -> Path:
        return self.output_dir / "data"

    def manifest(self) -> dict:
        return json.loads((self.shards_dir / "manifest.json").read_text())


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Workspace:
    """Write the tiny recipe into a session folder."""
    root = tmp_path_factory.mktemp("pipeline")
    recipe_path = root / "tiny.yaml"
    recipe_path.write_text(yaml.safe_dump(tiny_recipe(root / "runs"), sort_keys=False))
    return Workspace(recipe_path=recipe_path, output_dir=root / "runs", cache_dir=root / "cache")


@pytest.fixture(scope="session")
def prepared(workspace: Workspace) -> Workspace:
    """Run `wartok prepare` on the tiny recipe; tests that need only shards stop here."""
    workspace.results["prepare"] = invoke("prepare", str(workspace.recipe_path))
    return workspace


@pytest.fixture(scope="session")
def pipeline(prepared: Workspace) -> Workspace:
    """Run the three training stages in order, with the token cache in the session folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WARTOK_CACHE_DIR", str(prepared.cache_dir))
        for command in TRAINING_COMMANDS:
            prepared.results[command] = invoke(command, str(prepared.recipe_path))
    return prepared


ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


def free_port() -> int:
    """Return a TCP port on the loopback address that is free at the time of the call."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two(args: list[str], cwd: Path, cache: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `wartok ARGS` on two CPU processes over gloo, one thread each.

    `--multi_gpu` with ACCELERATE_USE_CPU=1 gives two real ranks; `--cpu --num_processes 2` would start one.
    """
    env = dict(os.environ, ACCELERATE_USE_CPU="1", WARTOK_CACHE_DIR=str(cache), OMP_NUM_THREADS="1")
    for _ in range(3):
        command = ACCELERATE + [
            "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
            "-m", "wartok_cli", *args,
        ]  # fmt: skip
        result = subprocess.run(command, check=False, cwd=cwd, env=env, capture_output=True, text=True,
                                timeout=timeout)  # fmt: skip
        # The port was free when chosen but another process may bind it before the launch does.
        if result.returncode == 0 or "address already in use" not in result.stderr.lower():
            return result
    return result


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's in-process training on one thread, as the subprocesses do; restore the count afterwards.

    The machines have 2 shared cores, and several torch threads per process thrash them.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
