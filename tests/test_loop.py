"""The shared training loop: non-finite steps, gradient accumulation, schedule, EMA half-life, signals, TensorBoard.

Most tests train a linear model through the real Trainer for a few steps. The signal and
mixed-precision tests run the real CLI in a subprocess, and the cross-process test launches
two real CPU processes with Accelerate.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from accelerate.utils import is_tensorboard_available
from conftest import free_port, tiny_recipe
from torch import nn

from wartok_cli.errors import WartokError
from wartok_cli.recipe import Recipe, TrainConfig, load_recipe
from wartok_cli.train.loop import EMA, Run, Trainer, clip_and_step, make_optimizer, make_scheduler, start_run

TESTS = Path(__file__).resolve().parent
FEATURES = 4
SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1")  # 2 shared cores: one thread per process avoids thrashing


pytestmark = pytest.mark.usefixtures("one_thread")


def toy_run(folder: Path, **settings) -> Run:
    """Start a run named 'toy' whose pretrain settings are 4 steps of batch 8, updated by settings."""
    defaults = {"steps": 4, "batch_size": 8, "warmup_steps": 0, "log_every": 1, "checkpoint_every": 100}
    recipe = Recipe(output_dir=folder, pretrain={**defaults, **settings})
    return start_run(recipe, "toy", recipe.pretrain)


def train_toy(run: Run, loss_hook=None, optimizer_factory=None) -> dict:
    """Train a linear model on seeded random batches through the Trainer; return what each step left.

    loss_hook(step_index, loss, model) may replace a micro-batch's loss, for example by a NaN.
    The result contains weights and EMA weights after each step (keyed by steps done), the
    learning rate each step used, the micro-batch sizes the step function saw, and the steps
    whose update was skipped.
    """
    accelerator = run.accelerator
    torch.manual_seed(0)
    model = nn.Linear(FEATURES, 1)
    optimizer = (optimizer_factory or (lambda params: make_optimizer(params, run.settings)))(model.parameters())
    scheduler = make_scheduler(optimizer, run.settings)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = EMA(accelerator.unwrap_model(model), run.settings.ema_decay)
    trainer = Trainer(run, [(model, ema)], [scheduler])
    result = {"weights": {}, "ema": {}, "lr": {}, "micro_batch_sizes": [], "skipped": [], "trainer": trainer}

    def batches_from(start: int):
        step = start
        while True:
            generator = torch.Generator().manual_seed(step)
            yield {"x": torch.randn(run.per_process_batch, FEATURES, generator=generator),
                   "y": torch.randn(run.per_process_batch, 1, generator=generator)}  # fmt: skip
            step += 1

    def step(step_index: int, batch: dict) -> dict[str, float]:
        result["lr"][step_index] = optimizer.param_groups[0]["lr"]
        result["micro_batch_sizes"].append(len(batch["x"]))
        loss = F.mse_loss(model(batch["x"]), batch["y"])
        if loss_hook is not None:
            loss = loss_hook(step_index, loss, model)
        clip_and_step(run, loss, model, optimizer, scheduler)
        return {"loss": loss.item()}

    def after_step(done: int) -> None:
        result["weights"][done] = flat_weights(model)
        result["ema"][done] = flat_weights(ema.model)
        if run.status.skipped:
            result["skipped"].append(done)

    result["weights"][0] = flat_weights(model)
    trainer.fit(step, batches_from, after_step)
    result["final_lr"] = scheduler.get_last_lr()[0]
    return result


def flat_weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([parameter.detach().flatten().clone() for parameter in model.parameters()])


def nan_loss_at(*step_indices: int):
    """Return a loss hook that adds NaN at the given steps; the gradient stays finite, only the loss is not."""

    def hook(step_index, loss, model):
        return loss + float("nan") if step_index in step_indices else loss

    return hook


def infinite_gradient_at(step_index: int):
    """Return a loss hook whose added term is 0 in value but has a non-finite gradient (sqrt at 0)."""

    def hook(index, loss, model):
        if index != step_index:
            return loss
        return loss + sum((p - p.detach()).abs().sqrt().sum() for p in model.parameters())

    return hook


# Non-finite steps ---------------------------------------------------------------------------


def test_nan_loss_step_keeps_weights(tmp_path):
    result = train_toy(toy_run(tmp_path), nan_loss_at(1))
    assert torch.equal(result["weights"][2], result["weights"][1])


def test_nan_loss_step_keeps_ema(tmp_path):
    result = train_toy(toy_run(tmp_path), nan_loss_at(1))
    assert torch.equal(result["ema"][2], result["ema"][1])


def test_nan_loss_training_continues(tmp_path):
    result = train_toy(toy_run(tmp_path), nan_loss_at(1))
    assert result["skipped"] == [2]
    assert not torch.equal(result["weights"][3], result["weights"][2])


def test_nan_loss_warning_names_step(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="wartok"):
        train_toy(toy_run(tmp_path), nan_loss_at(1))
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "toy step 2:" in warnings[0]
    assert "not finite" in warnings[0]


def test_infinite_gradient_step_skipped(tmp_path):
    result = train_toy(toy_run(tmp_path, grad_clip=None), infinite_gradient_at(2))
    assert result["skipped"] == [3]
    assert torch.equal(result["weights"][3], result["weights"][2])


def test_skip_limit_stops_with_error(tmp_path):
    run = toy_run(tmp_path, steps=8, max_skipped_steps=3)
    with pytest.raises(WartokError) as raised:
        train_toy(run, nan_loss_at(*range(2, 8)))
    message = str(raised.value)
    assert "Stopped at step 5" in message
    assert "pretrain.max_skipped_steps = 3" in message
    assert "(3 to 5;" in message


def test_skip_limit_writes_checkpoint(tmp_path):
    run = toy_run(tmp_path, steps=8, max_skipped_steps=3)
    with pytest.raises(WartokError):
        train_toy(run, nan_loss_at(*range(2, 8)))
    names = sorted(path.name for path in (run.dir / "checkpoints").iterdir())
    assert names == ["step-0000005"]


def test_skip_streak_resets_after_good_step(tmp_path):
    # Two separate NaN steps with max_skipped_steps 2 never make two in a row.
    result = train_toy(toy_run(tmp_path, steps=6, max_skipped_steps=2), nan_loss_at(1, 3))
    assert result["skipped"] == [2, 4]


# Gradient accumulation ----------------------------------------------------------------------


def sgd(parameters):
    # Plain SGD: the update is the gradient itself, so any error in accumulation shows in the weights
    # (AdamW's normalisation would hide a wrong gradient scale).
    return torch.optim.SGD(parameters, lr=0.1)


def test_accumulation_matches_full_batch(tmp_path):
    full = train_toy(toy_run(tmp_path / "full", grad_clip=None), optimizer_factory=sgd)
    accumulated = train_toy(toy_run(tmp_path / "accumulated", grad_clip=None, accumulation_steps=2),
                            optimizer_factory=sgd)  # fmt: skip
    assert not torch.equal(full["weights"][4], full["weights"][0])
    torch.testing.assert_close(accumulated["weights"][4], full["weights"][4], rtol=0, atol=1e-6)


def test_accumulation_micro_batch_size(tmp_path):
    result = train_toy(toy_run(tmp_path, accumulation_steps=2), optimizer_factory=sgd)
    assert result["micro_batch_sizes"] == [4] * 8


def test_accumulation_with_clipping_matches(tmp_path):
    # A small grad_clip makes clipping act on every step: the norm must be that of the whole batch.
    full = train_toy(toy_run(tmp_path / "full", grad_clip=0.01), optimizer_factory=sgd)
    accumulated = train_toy(toy_run(tmp_path / "accumulated", grad_clip=0.01, accumulation_steps=4),
                            optimizer_factory=sgd)  # fmt: skip
    torch.testing.assert_close(accumulated["weights"][4], full["weights"][4], rtol=0, atol=1e-6)


def test_accumulation_nan_micro_batch_skips(tmp_path):
    def nan_in_second_micro_batch(step_index, loss, model):
        return loss + float("nan") if step_index == 1 and run.status.micro_batch == 1 else loss

    run = toy_run(tmp_path, accumulation_steps=2)
    result = train_toy(run, nan_in_second_micro_batch)
    assert result["skipped"] == [2]
    assert torch.equal(result["weights"][2], result["weights"][1])


def test_accumulation_must_divide_batch():
    with pytest.raises(WartokError) as raised:
        load_recipe(None, ["pretrain.batch_size=10", "pretrain.accumulation_steps=3"])
    assert "pretrain: batch_size (10) must be a multiple of accumulation_steps (3)" in str(raised.value)


# Learning-rate schedule ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def schedule(tmp_path_factory) -> dict:
    """Train 10 steps: lr 1e-3, 4 warm-up steps, cosine decay to 0.1 x lr."""
    run = toy_run(tmp_path_factory.mktemp("schedule"), steps=10, lr=1e-3, warmup_steps=4, min_lr_ratio=0.1)
    return train_toy(run)


def test_schedule_warmup_starts_low(schedule):
    assert schedule["lr"][0] == pytest.approx(1e-3 / 4)


def test_schedule_warmup_reaches_peak(schedule):
    assert schedule["lr"][3] == pytest.approx(1e-3)


def test_schedule_cosine_midpoint(schedule):
    # Step 7 is halfway through the 6 decay steps: the factor is 0.1 + 0.9 * 0.5.
    assert schedule["lr"][7] == pytest.approx(0.55e-3)


def test_schedule_ends_at_min_lr(schedule):
    assert schedule["final_lr"] == pytest.approx(1e-4)


def test_schedule_decreases_after_warmup(schedule):
    decay = [schedule["lr"][index] for index in range(4, 10)]
    assert decay == sorted(decay, reverse=True)


# EMA half-life ------------------------------------------------------------------------------


def test_half_life_sets_decay():
    assert TrainConfig(ema_half_life=20).ema_decay ** 20 == pytest.approx(0.5)


def test_half_life_overrides_decay():
    settings = TrainConfig(ema_decay=0.9, ema_half_life=10)
    assert settings.ema_decay == pytest.approx(0.5**0.1)


def test_half_life_resolved_round_trip():
    recipe = Recipe(pretrain={"ema_half_life": 7})
    assert Recipe.model_validate(yaml.safe_load(recipe.to_yaml())) == recipe


def test_half_life_invalid_names_field():
    with pytest.raises(WartokError) as raised:
        load_recipe(None, ["wartok.ema_half_life=0"])
    assert "wartok.ema_half_life = 0" in str(raised.value)


def test_half_life_halves_distance():
    # Past the warm-up, the EMA closes half its distance to fixed weights every half-life.
    model = nn.Linear(FEATURES, 1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    ema = EMA(model, TrainConfig(ema_half_life=25).ema_decay)
    ema.updates = 10**9
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(1.0)
    for _ in range(25):
        ema.update(model)
    torch.testing.assert_close(flat_weights(ema.model), torch.full((FEATURES + 1,), 0.5), rtol=0, atol=1e-6)


# TensorBoard --------------------------------------------------------------------------------


@pytest.mark.skipif(not is_tensorboard_available(), reason="tensorboard is not installed")
def test_tensorboard_events_written(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = toy_run(tmp_path)
    train_toy(run)
    events = EventAccumulator(str(run.dir / "logs" / "tensorboard"))
    events.Reload()
    assert {"loss", "lr", "grad_norm"} <= set(events.Tags()["scalars"])
    assert [event.step for event in events.Scalars("loss")] == [1, 2, 3, 4]


@pytest.mark.skipif(bool(is_tensorboard_available()), reason="tensorboard is installed")
def test_tensorboard_absent_skipped(tmp_path, caplog):
    with caplog.at_level(logging.DEBUG, logger="wartok"):
        run = toy_run(tmp_path)
        train_toy(run)
    assert not (run.dir / "logs" / "tensorboard").exists()
    assert any("tensorboard is not installed" in record.getMessage() for record in caplog.records)


# The CLI in a subprocess --------------------------------------------------------------------


def write_recipe(folder: Path, shards_dir: Path, **pretrain) -> Path:
    """Write the tiny recipe, reading the session's shards, with pretrain settings updated."""
    recipe = tiny_recipe(folder / "runs")
    recipe["data"]["shards_dir"] = str(shards_dir)
    recipe["pretrain"].update(pretrain)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def wartok_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "wartok_cli", *args]


def test_sigterm_checkpoint_then_resume(prepared, tmp_path):
    path = write_recipe(tmp_path, prepared.shards_dir, steps=60, checkpoint_every=5, log_every=5, keep_checkpoints=50)
    checkpoints = tmp_path / "runs" / "tokenizer" / "checkpoints"
    log_path = tmp_path / "first-run.log"
    with open(log_path, "w") as log_file:  # a file, because an unread pipe could fill up and block the run
        process = subprocess.Popen(wartok_command("pretrain-tokenizer", str(path)), env=SUBPROCESS_ENV,
                                   stdout=log_file, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 120
        while not (checkpoints / "step-0000005").is_dir() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    stderr = log_path.read_text()

    # The CLI reports the stop as a WartokError: exit status 2, a message, no traceback.
    assert process.returncode == 2, stderr[-3000:]
    assert "Stopped at step" in stderr
    assert "by SIGTERM" in stderr
    assert "Run the same command again to resume" in stderr
    assert "Traceback" not in stderr
    stopped_at = max(int(path.name.removeprefix("step-")) for path in checkpoints.iterdir())
    assert 5 <= stopped_at < 60

    resumed = subprocess.run(wartok_command("pretrain-tokenizer", str(path)), env=SUBPROCESS_ENV, check=False,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step-{stopped_at:07d} at step {stopped_at}" in resumed.stderr
    assert (checkpoints / "step-0000060").is_dir()
    with open(tmp_path / "runs" / "tokenizer" / "logs" / "metrics.csv", newline="") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle)]
    assert steps == list(range(5, 61, 5))


def test_sigint_process_group_with_workers(prepared, tmp_path):
    # Ctrl-C signals the whole process group, DataLoader workers included: the run still stops once, cleanly.
    path = write_recipe(tmp_path, prepared.shards_dir, steps=400, checkpoint_every=5, log_every=5)
    checkpoints = tmp_path / "runs" / "tokenizer" / "checkpoints"
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(wartok_command("pretrain-tokenizer", str(path), "--set", "data.num_workers=2"),
                                   env=SUBPROCESS_ENV, stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 120
        while not (checkpoints / "step-0000005").is_dir() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=120)
    output = log_path.read_text()
    assert process.returncode == 2, output[-3000:]
    assert output.count("received SIGINT") == 1, output[-3000:]
    assert "by SIGINT" in output
    assert "Traceback" not in output


def test_bf16_accumulation_run_completes(prepared, tmp_path):
    path = write_recipe(tmp_path, prepared.shards_dir, steps=4, log_every=2, mixed_precision="bf16",
                        accumulation_steps=2)  # fmt: skip
    completed = subprocess.run(wartok_command("pretrain-tokenizer", str(path)), env=SUBPROCESS_ENV, check=False,
                               capture_output=True, text=True, timeout=300)  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "mixed precision bf16, 2 micro-batch(es) of 4" in completed.stderr
    with open(tmp_path / "runs" / "tokenizer" / "logs" / "metrics.csv", newline="") as handle:
        losses = [float(row["loss"]) for row in csv.DictReader(handle)]
    assert len(losses) == 2
    assert all(math.isfinite(loss) for loss in losses), losses


# Two real processes -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_on_one_rank(tmp_path_factory) -> dict[int, dict]:
    """Launch tests/loop_worker.py on two gloo CPU processes; return each rank's report of its two runs."""
    folder = tmp_path_factory.mktemp("two-ranks")
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
        str(TESTS / "loop_worker.py"), str(folder),
    ]  # fmt: skip
    env = dict(SUBPROCESS_ENV, ACCELERATE_USE_CPU="1")
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return {rank: json.loads((folder / f"rank-{rank}.json").read_text()) for rank in (0, 1)}


@pytest.mark.parametrize("rank", [0, 1])
def test_two_ranks_both_skip(nan_on_one_rank, rank):
    assert nan_on_one_rank[rank]["skipped"] == [2]


@pytest.mark.parametrize("rank", [0, 1])
def test_two_ranks_skip_keeps_weights(nan_on_one_rank, rank):
    weights = nan_on_one_rank[rank]["weights"]
    assert weights["2"] == weights["1"]
    assert weights["3"] != weights["2"]


def test_two_ranks_weights_identical(nan_on_one_rank):
    assert nan_on_one_rank[0]["weights"] == nan_on_one_rank[1]["weights"]


@pytest.mark.parametrize("rank", [0, 1])
def test_two_ranks_stop_together(nan_on_one_rank, rank):
    # Only rank 1 requested the stop, after step 2; both ranks checkpoint there and stop.
    stop = nan_on_one_rank[rank]["stop"]
    assert stop is not None
    assert stop["step"] == 2
    assert "Stopped at step 2 of 3" in stop["message"]


def test_two_ranks_stop_checkpoint(nan_on_one_rank):
    assert nan_on_one_rank[0]["checkpoints"] == ["step-0000002"]
