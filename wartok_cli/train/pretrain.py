"""Stage 1 of the baseline: train the tokenizer for reconstruction only.

The objective is ``TokenizerObjective``: pixel, perceptual and VQ losses, and
optionally a PatchGAN discriminator and dead-code restarts, as the recipe's
reconstruction section sets them.
"""

from __future__ import annotations

import json
import logging

import torch

from wartok_cli.evaluate.reconstruction import evaluate_tokenizer
from wartok_cli.export import save_model
from wartok_cli.models import build_tokenizer
from wartok_cli.recipe import Recipe
from wartok_cli.train.common import (
    TokenizerObjective,
    eval_batches,
    fixed_batch_metrics,
    preview_batch,
    save_grid,
    train_batches,
)
from wartok_cli.train.loop import (
    EMA,
    Run,
    Trainer,
    check_in_sync,
    clip_and_step,
    make_optimizer,
    start_run,
    warmup_cosine,
    write_atomic,
)

log = logging.getLogger("wartok")

RUN_NAME = "tokenizer"


def tokenizer_config(recipe: Recipe) -> dict:
    """Return the tokenizer's architecture config from the recipe: the chosen family's arguments only."""
    config = recipe.tokenizer.model_options()
    config.update(resolution=recipe.data.resolution, channels=recipe.data.channels)
    return config


def finish_tokenizer_run(run: Run, ema: EMA, objective: TokenizerObjective | None = None) -> dict:
    """Evaluate the EMA tokenizer on the validation split, export it (and the discriminator), write metrics.json."""
    if objective is not None:
        objective.finish()
    metrics = evaluate_tokenizer(ema.model, eval_batches(run), run.accelerator)
    if run.accelerator.is_main_process:
        save_model(run.final_dir, "tokenizer", ema.model)
        write_atomic(run.dir / "metrics.json", json.dumps({"validation": metrics}, indent=2))
    log.info(
        "%s validation: PSNR %.2f dB, MSE %.5f, codebook usage %.1f%%, perplexity %.1f",
        run.name,
        metrics["psnr"],
        metrics["mse"],
        100 * metrics["codebook_usage"],
        metrics["perplexity"],
    )
    run.accelerator.wait_for_everyone()
    return metrics


def preview_tokenizer(run: Run, tokenizer, images: torch.Tensor, step: int) -> None:
    """Save a grid of inputs (top row) and reconstructions (bottom row)."""
    if not run.accelerator.is_main_process:
        return
    with torch.no_grad():
        reconstruction = tokenizer(images).reconstruction
    save_grid(run.dir / "images" / f"reconstruction-{step:07d}.png", images, reconstruction)


def pretrain_tokenizer(recipe: Recipe) -> dict:
    """Train the tokenizer for reconstruction; return its validation metrics."""
    run = start_run(recipe, RUN_NAME, recipe.pretrain)
    accelerator = run.accelerator
    tokenizer = build_tokenizer(tokenizer_config(recipe))
    optimizer = make_optimizer(tokenizer.parameters(), run.settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(run.settings))
    tokenizer, optimizer = accelerator.prepare(tokenizer, optimizer)
    ema = EMA(accelerator.unwrap_model(tokenizer), run.settings.ema_decay)
    objective = TokenizerObjective(run, tokenizer, optimizer, ema)
    trainer = Trainer(run, [(tokenizer, ema)], [scheduler])
    # The first 64 validation images: PSNR in the training logs; the first 8 also make the previews.
    val_images = preview_batch(run, count=64)

    def step(step_index: int, batch: dict) -> dict[str, float]:
        images = batch["images"]
        with accelerator.autocast():
            output = tokenizer(images)
            loss, parts = objective.generator_loss(step_index, output, images)
        clip_and_step(run, loss, tokenizer, optimizer, scheduler)
        parts.update(objective.after_step(step_index, images, output))
        parts.update(fixed_batch_metrics(run, ema.model, val_images, step_index))
        return {"loss": loss.item(), **parts}

    def after_step(done: int) -> None:
        if done % run.settings.preview_every == 0 or done == run.settings.steps:
            preview_tokenizer(run, ema.model, val_images[:8], done)

    trainer.fit(step, train_batches(run), after_step)
    check_in_sync(accelerator, tokenizer, run.name)
    return finish_tokenizer_run(run, ema, objective)
