"""Stage 2: train an AR prior on a frozen tokenizer's tokens.

Training batches are drawn at random from the cached token arrays with a
generator seeded by (seed, step, process), so a resumed run draws exactly the
batches an uninterrupted run would have.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from wartok_cli.export import load_tokenizer, save_model, weights_hash
from wartok_cli.models import ARPrior
from wartok_cli.recipe import Recipe
from wartok_cli.train.loop import (
    EMA,
    Trainer,
    check_in_sync,
    clip_and_step,
    derived_seed,
    make_optimizer,
    start_run,
    warmup_cosine,
    write_atomic,
)
from wartok_cli.train.tokens import load_tokens

log = logging.getLogger("wartok")

METRIC_BATCH_SIZE = 256  # sequences per batch when scoring cached tokens


def build_prior(recipe: Recipe) -> ARPrior:
    """Build an AR prior sized for the recipe's tokenizer (vocabulary and sequence length)."""
    return ARPrior(
        vocab_size=recipe.tokenizer.codebook_size,
        seq_len=recipe.tokens_per_image,
        num_classes=recipe.data.num_classes,
        **recipe.prior.model_options(),
    )


@torch.no_grad()
def prior_metrics(
    prior,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    device,
    batch_size: int = METRIC_BATCH_SIZE,
    max_batches: int | None = None,
    accelerator: Accelerator | None = None,
) -> dict[str, float]:
    """Return next-token cross-entropy (gLoss, in nats and bits per token) and top-1 accuracy over the tokens.

    With an accelerator on several processes, rank r scores batches r, r + world, ...
    and the sums are added across ranks, so every rank returns the same values.
    """
    was_training = prior.training
    prior.eval()
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    starts = list(range(0, len(tokens), batch_size))[:max_batches]
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct predictions, tokens
    for start in starts[rank::world]:
        batch = tokens[start : start + batch_size].to(device)
        logits = prior(batch, labels[start : start + batch_size].to(device)).float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.reshape(-1), reduction="sum")
        sums += torch.stack(
            [loss.double(), (logits.argmax(-1) == batch).sum().double(), sums.new_tensor(batch.numel())]
        )
    if world > 1:
        sums = accelerator.reduce(sums, reduction="sum")
    prior.train(was_training)
    total_loss, total_correct, total_tokens = sums.tolist()
    loss = total_loss / max(1.0, total_tokens)
    return {
        "gloss": loss,
        "bits_per_token": loss / math.log(2),
        "top1_accuracy": total_correct / max(1.0, total_tokens),
    }


def prior_run_name(recipe: Recipe) -> str:
    """Return the run folder name of train-prior for the recipe's tokenizer."""
    settings = recipe.train_prior
    if settings.run_name:
        return settings.run_name
    if settings.tokenizer == "tokenizer":
        return "prior"
    return f"prior-{Path(settings.tokenizer).name}"


def train_prior(recipe: Recipe) -> dict:
    """Encode the shards with the tokenizer, train the prior, export it; return its metrics."""
    settings = recipe.train_prior
    run = start_run(recipe, prior_run_name(recipe), settings)
    accelerator = run.accelerator
    tokenizer_dir = recipe.run_dir(settings.tokenizer)
    tokenizer = load_tokenizer(tokenizer_dir, run.device)
    digest = weights_hash(tokenizer_dir, "tokenizer")
    channels = recipe.data.channels
    train_tokens, train_labels = load_tokens(
        tokenizer, digest, recipe.shards_dir, "train", channels, accelerator, flip=settings.flip_augment
    )
    val_tokens, val_labels = load_tokens(tokenizer, digest, recipe.shards_dir, "val", channels, accelerator)
    del tokenizer
    log.info(
        "tokens: %d training and %d validation sequences of length %d",
        len(train_tokens),
        len(val_tokens),
        train_tokens.shape[1],
    )

    prior = build_prior(recipe)
    optimizer = make_optimizer(prior.parameters(), settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(settings))
    prior, optimizer = accelerator.prepare(prior, optimizer)
    ema = EMA(accelerator.unwrap_model(prior), settings.ema_decay)
    trainer = Trainer(run, [(prior, ema)], [scheduler])

    def score(tokens: torch.Tensor, labels: torch.Tensor, max_batches: int | None) -> dict[str, float]:
        with accelerator.autocast():
            return prior_metrics(
                ema.model, tokens, labels, run.device, max_batches=max_batches, accelerator=accelerator
            )

    def batches_from(start_step: int):
        step = start_step
        while True:
            generator = torch.Generator().manual_seed(derived_seed(recipe.seed, step, accelerator.process_index))
            index = torch.randint(len(train_tokens), (run.per_process_batch,), generator=generator)
            yield {"tokens": train_tokens[index].to(run.device), "labels": train_labels[index].to(run.device)}
            step += 1

    def step(step_index: int, batch: dict) -> dict[str, float]:
        with accelerator.autocast():
            logits = prior(batch["tokens"], batch["labels"])
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch["tokens"].reshape(-1))
        clip_and_step(run, loss, prior, optimizer, scheduler)
        metrics = {"loss": loss.item()}
        done = step_index + 1
        # The trainer writes a row exactly at these steps, so every row has the same columns. The
        # trainer updates the EMA after the last micro-batch returns, so this scores the previous step's EMA.
        if run.status.last_micro_batch and (done % settings.log_every == 0 or done == settings.steps):
            for split, tokens, labels in (("train", train_tokens, train_labels), ("val", val_tokens, val_labels)):
                for name, value in score(tokens, labels, settings.eval_batches).items():
                    metrics[f"{split}_{name}"] = value
        return metrics

    trainer.fit(step, batches_from)
    check_in_sync(accelerator, prior, run.name)
    result = {
        "train": score(train_tokens, train_labels, settings.eval_batches),
        "validation": score(val_tokens, val_labels, None),
        "uniform_baseline": math.log(recipe.tokenizer.codebook_size),
        "tokenizer": str(tokenizer_dir),
        "tokenizer_sha256": digest,
        "train_sequences": len(train_tokens),
        "validation_sequences": len(val_tokens),
        "flip_augment": settings.flip_augment,
    }
    if accelerator.is_main_process:
        save_model(run.final_dir, "prior", ema.model)
        write_atomic(run.dir / "metrics.json", json.dumps(result, indent=2))
    log.info(
        "%s validation gLoss %.4f nats/token (%.3f bits), top-1 %.1f%%; uniform baseline %.3f",
        run.name,
        result["validation"]["gloss"],
        result["validation"]["bits_per_token"],
        100 * result["validation"]["top1_accuracy"],
        result["uniform_baseline"],
    )
    accelerator.wait_for_everyone()
    return result
