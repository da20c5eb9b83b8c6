"""Worker for test_loop.py under `accelerate launch`: two toy runs with an event on one rank only.

In the first run only rank 0 gets a NaN loss. The NaN is added to the loss as a constant, so the
gradients stay finite and only the loss check on rank 0 detects it. Without the reduction across
processes, rank 1 would step alone and the replicas would drift apart. In the second run only
rank 1 receives a stop request, as from a signal sent to that process alone. Without the
reduction, rank 1 would wait in its checkpoint while rank 0 went on to the next step.

Each rank writes rank-<index>.json into the output folder: its weights after every step of the
first run, the steps whose update was skipped, and the step and message of the second run's stop.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from wartok_cli.errors import WartokError
from wartok_cli.recipe import Recipe
from wartok_cli.train.loop import EMA, Trainer, clip_and_step, make_optimizer, make_scheduler, start_run

NAN_STEP = 1  # 0-based index of the step whose first micro-batch loss is NaN on rank 0
STOP_AFTER = 2  # steps done when rank 1 alone requests a stop


def train(output_dir: Path, name: str, nan_on_rank_0: bool = False, stop_on_rank_1: bool = False) -> dict:
    """Train a linear model for 3 steps on two ranks; return this rank's weights, skipped steps and stop."""
    settings = {"steps": 3, "batch_size": 8, "accumulation_steps": 2, "warmup_steps": 0, "log_every": 1,
                "checkpoint_every": 100}  # fmt: skip
    recipe = Recipe(output_dir=output_dir, pretrain=settings)
    run = start_run(recipe, name, recipe.pretrain)
    accelerator = run.accelerator
    model = nn.Linear(4, 1)
    optimizer = make_optimizer(model.parameters(), run.settings)
    scheduler = make_scheduler(optimizer, run.settings)
    model, optimizer = accelerator.prepare(model, optimizer)
    trainer = Trainer(run, [(model, EMA(accelerator.unwrap_model(model), 0.9))], [scheduler])

    def batches_from(start: int):
        step = start
        while True:
            generator = torch.Generator().manual_seed(1000 * step + accelerator.process_index)
            yield {"x": torch.randn(run.per_process_batch, 4, generator=generator),
                   "y": torch.randn(run.per_process_batch, 1, generator=generator)}  # fmt: skip
            step += 1

    def step(step_index: int, batch: dict) -> dict[str, float]:
        loss = F.mse_loss(model(batch["x"]), batch["y"])
        if nan_on_rank_0 and accelerator.process_index == 0 and step_index == NAN_STEP and run.status.micro_batch == 0:
            loss = loss + float("nan")
        clip_and_step(run, loss, model, optimizer, scheduler)
        return {"loss": loss.item()}

    weights: dict[int, list[float]] = {}
    skipped: list[int] = []

    def after_step(done: int) -> None:
        weights[done] = torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()
        if run.status.skipped:
            skipped.append(done)
        if stop_on_rank_1 and accelerator.process_index == 1 and done == STOP_AFTER:
            trainer.stop_requested = True

    stop = None
    try:
        trainer.fit(step, batches_from, after_step)
    except WartokError as error:
        stop = {"step": trainer.state.step, "message": str(error)}
    return {"weights": weights, "skipped": skipped, "stop": stop}


def main(output_dir: Path) -> None:
    nan_run = train(output_dir, "nan-on-rank-0", nan_on_rank_0=True)
    stop_run = train(output_dir, "stop-on-rank-1", stop_on_rank_1=True)
    rank = int(os.environ["RANK"])
    report = {
        "weights": nan_run["weights"],
        "skipped": nan_run["skipped"],
        "stop": stop_run["stop"],
        "checkpoints": sorted(path.name for path in (output_dir / "stop-on-rank-1" / "checkpoints").iterdir()),
    }
    (output_dir / f"rank-{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
