"""Resume: an interrupted run, resumed from its checkpoint, ends exactly where an uninterrupted one does.

An interruption is simulated on a finished run: the checkpoints after step 2, final/ and the
metrics are deleted, so the folder looks as if the run had been killed right after its
checkpoint at step 2. Running the same command again resumes there. On the CPU with fixed
seeds both paths must give bitwise equal weights and optimizer states, because the
checkpoint restores the random states, the step and the data position.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import describe, invoke, tiny_recipe
from safetensors.torch import load_file
from torch import nn

from wartok_cli.errors import WartokError
from wartok_cli.recipe import Recipe
from wartok_cli.train.common import train_batches
from wartok_cli.train.loop import EMA, Trainer, clip_and_step, make_optimizer, make_scheduler, start_run

STEPS = 6
RESUME_STEP = 2
STAGE = {"steps": STEPS, "batch_size": 8, "warmup_steps": 2, "log_every": 1, "checkpoint_every": RESUME_STEP,
         "keep_checkpoints": 10, "preview_every": 100}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def write_recipe(folder: Path, shards_dir: Path, num_workers: int = 0) -> Path:
    """Write the tiny recipe with resumable stage settings, reading the session's shards."""
    recipe = tiny_recipe(folder / "runs")
    recipe["data"].update(shards_dir=str(shards_dir), num_workers=num_workers)
    for section in ("pretrain", "train_prior", "wartok"):
        recipe[section] = {**recipe[section], **STAGE}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def interrupt_after_checkpoint(run_dir: Path, keep_step: int) -> None:
    """Make a finished run folder look killed right after its checkpoint at keep_step."""
    for checkpoint in (run_dir / "checkpoints").iterdir():
        if int(checkpoint.name.removeprefix("step-")) > keep_step:
            shutil.rmtree(checkpoint)
    shutil.rmtree(run_dir / "final")
    (run_dir / "metrics.json").unlink()


def snapshot(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Return the exported weights and every weight and optimizer file of the last checkpoint."""
    last = run_dir / "checkpoints" / f"step-{STEPS:07d}"
    files = {"final": load_file(str(next((run_dir / "final").glob("*.safetensors"))))}
    for path in sorted(last.glob("model*.safetensors")):
        files[path.name] = load_file(str(path))
    for path in sorted(last.glob("optimizer*.bin")):
        files[path.name] = flatten(torch.load(path, weights_only=True))
    return files


def flatten(state, prefix: str = "") -> dict[str, object]:
    """Flatten an optimizer state dict into name -> tensor or plain value (a number, None, a string)."""
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return {prefix: state}
    flat = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}/{key}"))
    return flat


def differing(before: dict, after: dict) -> list[str]:
    """Return the names of files and tensors that are missing on one side or not bitwise equal."""
    names = []
    for file in sorted(set(before) | set(after)):
        if file not in before or file not in after:
            names.append(file)
            continue
        for key in sorted(set(before[file]) | set(after[file])):
            if key not in before[file] or key not in after[file] or not same(before[file][key], after[file][key]):
                names.append(f"{file}:{key}")
    return names


def same(left, right) -> bool:
    if isinstance(left, torch.Tensor) and isinstance(right, torch.Tensor):
        return left.dtype == right.dtype and torch.equal(left, right)
    return type(left) is type(right) and left == right


def run_and_resume(command: str, recipe_path: Path, run_dir: Path) -> tuple[dict, dict, str, str]:
    """Run a stage, snapshot it, interrupt it after step 2, resume; return both snapshots and both metric logs."""
    first = invoke(command, str(recipe_path))
    assert first.exit_code == 0, describe(first)
    uninterrupted = snapshot(run_dir)
    uninterrupted_csv = (run_dir / "logs" / "metrics.csv").read_text()
    interrupt_after_checkpoint(run_dir, RESUME_STEP)
    second = invoke(command, str(recipe_path))
    assert second.exit_code == 0, describe(second)
    assert f"at step {RESUME_STEP}" in second.output
    return uninterrupted, snapshot(run_dir), uninterrupted_csv, (run_dir / "logs" / "metrics.csv").read_text()


# Pretraining, with and without DataLoader workers --------------------------------------------


@pytest.fixture(scope="module", params=[0, 2], ids=["workers0", "workers2"])
def pretrain_resumed(request, prepared, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"resume-pretrain-{request.param}")
    recipe_path = write_recipe(folder, prepared.shards_dir, num_workers=request.param)
    return run_and_resume("pretrain-tokenizer", recipe_path, folder / "runs" / "tokenizer")


def test_pretrain_resume_bitwise(pretrain_resumed):
    uninterrupted, resumed, _, _ = pretrain_resumed
    assert {"final", "model.safetensors", "optimizer.bin"} <= set(uninterrupted)
    assert differing(uninterrupted, resumed) == []


def test_pretrain_resume_metrics_identical(pretrain_resumed):
    # Rows the interrupted run logged after its checkpoint are dropped, then logged again.
    _, _, uninterrupted_csv, resumed_csv = pretrain_resumed
    assert resumed_csv == uninterrupted_csv


# wAR-Tok: a second model and optimizer (the auxiliary prior) --------------------------------


@pytest.fixture(scope="module")
def wartok_resumed(prepared, tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume-wartok")
    recipe_path = write_recipe(folder, prepared.shards_dir)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WARTOK_CACHE_DIR", str(folder / "cache"))
        for command in ("pretrain-tokenizer", "train-prior"):
            result = invoke(command, str(recipe_path))
            assert result.exit_code == 0, describe(result)
        return run_and_resume("train-wartok", recipe_path, folder / "runs" / "wartok")


def test_wartok_resume_bitwise(wartok_resumed):
    uninterrupted, resumed, _, _ = wartok_resumed
    # model.safetensors is the tokenizer, model_1.safetensors the auxiliary prior; likewise the optimizers.
    assert {"final", "model.safetensors", "model_1.safetensors", "optimizer_1.bin"} <= set(uninterrupted)
    assert differing(uninterrupted, resumed) == []


# What a resume restores, seen from inside the Trainer -----------------------------------------


def record_training(run, stop_at: int | None = None) -> dict:
    """Train a linear model on real shard batches; record per step the batch keys and learning rate.

    With stop_at, the run stops after that step as a signal would make it: checkpoint, then WartokError.
    """
    accelerator = run.accelerator
    torch.manual_seed(0)
    model = nn.Linear(16 * 16, 1)
    optimizer = make_optimizer(model.parameters(), run.settings)
    scheduler = make_scheduler(optimizer, run.settings)
    model, optimizer = accelerator.prepare(model, optimizer)
    trainer = Trainer(run, [(model, EMA(accelerator.unwrap_model(model), 0.9))], [scheduler])
    record = {"keys": {}, "lr": {}, "first_step": None, "samples_seen_at_start": None}

    def step(step_index: int, batch: dict) -> dict[str, float]:
        if record["first_step"] is None:
            record["first_step"] = step_index
            record["samples_seen_at_start"] = trainer.state.samples_seen
        record["keys"][step_index] = list(batch["keys"])
        record["lr"][step_index] = optimizer.param_groups[0]["lr"]
        loss = F.mse_loss(model(batch["images"].flatten(1)), batch["labels"].float()[:, None])
        clip_and_step(run, loss, model, optimizer, scheduler)
        return {"loss": loss.item()}

    def after_step(done: int) -> None:
        if done == stop_at:
            trainer.stop_requested = True

    try:
        trainer.fit(step, train_batches(run), after_step)
    finally:
        record["samples_seen"] = trainer.state.samples_seen
    return record


@pytest.fixture(scope="module", params=[0, 2], ids=["workers0", "workers2"])
def trainer_resumed(request, prepared, tmp_path_factory) -> dict:
    """Train 6 steps straight, and 6 steps stopped after step 3 and resumed, with the same settings."""
    folder = tmp_path_factory.mktemp(f"resume-trainer-{request.param}")
    data = {"source": "bundled", "shards_dir": str(prepared.shards_dir), "num_workers": request.param,
            "shuffle_buffer": 64}  # fmt: skip
    settings = {"steps": 6, "batch_size": 8, "warmup_steps": 2, "checkpoint_every": 100, "log_every": 1}

    def start(name: str):
        recipe = Recipe(output_dir=folder, data=data, pretrain=settings)
        return start_run(recipe, name, recipe.pretrain)

    straight = record_training(start("straight"))
    with pytest.raises(WartokError):
        record_training(start("stopped"), stop_at=3)
    # A half-written checkpoint of a later step must be ignored.
    (folder / "stopped" / "checkpoints" / ".tmp-step-0000005").mkdir()
    resumed = record_training(start("stopped"))
    return {"straight": straight, "resumed": resumed}


def test_resume_restores_step(trainer_resumed):
    assert trainer_resumed["resumed"]["first_step"] == 3


def test_resume_restores_samples_seen(trainer_resumed):
    assert trainer_resumed["resumed"]["samples_seen_at_start"] == 3 * 8
    assert trainer_resumed["resumed"]["samples_seen"] == 6 * 8


def test_resume_restores_learning_rate(trainer_resumed):
    straight, resumed = trainer_resumed["straight"], trainer_resumed["resumed"]
    assert [resumed["lr"][index] for index in range(3, 6)] == [straight["lr"][index] for index in range(3, 6)]


def test_resume_restores_data_position(trainer_resumed):
    # The batches after the resume are exactly those the uninterrupted run saw at steps 3 to 5.
    straight, resumed = trainer_resumed["straight"], trainer_resumed["resumed"]
    assert [resumed["keys"][index] for index in range(3, 6)] == [straight["keys"][index] for index in range(3, 6)]
