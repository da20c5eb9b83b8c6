"""The wAR-Tok stage: tokenizer training with the prior-matching signal.

This module only wires the pieces of ``wartok_cli.wgf`` into the shared loop:
the reconstruction objective stays as in pretraining, lambda * L_wgf is added,
and the auxiliary prior is refitted on the current tokens after every step.
"""

from __future__ import annotations

import copy
import logging
import warnings

import torch

from wartok_cli import wgf
from wartok_cli.errors import WartokError
from wartok_cli.evaluate.reconstruction import codebook_stats
from wartok_cli.export import load_prior, load_tokenizer
from wartok_cli.models import build_tokenizer
from wartok_cli.recipe import Recipe
from wartok_cli.train.common import TokenizerObjective, fixed_batch_metrics, preview_batch, train_batches
from wartok_cli.train.loop import EMA, Trainer, check_in_sync, clip_and_step, make_optimizer, start_run, warmup_cosine
from wartok_cli.train.pretrain import finish_tokenizer_run, preview_tokenizer, tokenizer_config
from wartok_cli.train.prior import build_prior

log = logging.getLogger("wartok")


def build_models(recipe: Recipe, device) -> tuple:
    """Build or load the tokenizer, the target prior and the auxiliary prior that the wartok section names."""
    settings = recipe.wartok
    if settings.init_tokenizer is None:
        tokenizer = build_tokenizer(tokenizer_config(recipe))
    else:
        tokenizer = load_tokenizer(recipe.run_dir(settings.init_tokenizer))
    if settings.target_prior is None:
        target = build_prior(recipe).to(device)
    else:
        target = load_prior(recipe.run_dir(settings.target_prior), device)
    if target.vocab_size != tokenizer.codebook_size or target.seq_len != tokenizer.num_tokens:
        raise WartokError(
            f"The target prior {settings.target_prior} models {target.vocab_size} codes x {target.seq_len} tokens, "
            f"but the tokenizer {settings.init_tokenizer} has {tokenizer.codebook_size} codes x "
            f"{tokenizer.num_tokens} tokens. Train the target prior on this tokenizer's tokens (wartok train-prior)."
        )
    # A copied q_aux makes the contrast start at zero. The contrast grows as the tokenizer's tokens
    # drift away from what the target learned, or as q_aux is fitted on the current tokens.
    aux = build_prior(recipe) if settings.aux_init == "fresh" else copy.deepcopy(target)
    target.requires_grad_(settings.target == "online").train(settings.target == "online")
    return tokenizer.train(), target, aux.requires_grad_(True).train()


def train_wartok(recipe: Recipe) -> dict:
    """Train the tokenizer with reconstruction + lambda * L_wgf; return its validation metrics."""
    settings = recipe.wartok
    run = start_run(recipe, settings.run_name, settings)
    accelerator = run.accelerator
    tokenizer, target, aux = build_models(recipe, run.device)

    optimizer = make_optimizer(tokenizer.parameters(), settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(settings))
    aux_optimizer = make_optimizer(aux.parameters(), settings, lr=settings.aux_lr)
    tokenizer, optimizer, aux, aux_optimizer = accelerator.prepare(tokenizer, optimizer, aux, aux_optimizer)
    target_optimizer = None
    if settings.target == "online":
        target_optimizer = make_optimizer(target.parameters(), settings, lr=settings.target_lr)
        target, target_optimizer = accelerator.prepare(target, target_optimizer)
    elif settings.target == "ema":
        accelerator.register_for_checkpointing(target)  # it changes, so a resumed run needs it
    ema = EMA(accelerator.unwrap_model(tokenizer), settings.ema_decay)
    # The same objective as pretraining; a discriminator exported by the initial tokenizer's run is reused.
    init_dir = None if settings.init_tokenizer is None else recipe.run_dir(settings.init_tokenizer)
    objective = TokenizerObjective(run, tokenizer, optimizer, ema, init_dir)
    trainer = Trainer(run, [(tokenizer, ema)], [scheduler])
    # The first 64 validation images: PSNR in the training logs; the first 8 also make the previews.
    val_images = preview_batch(run, count=64)
    window = torch.zeros(recipe.tokenizer.codebook_size, dtype=torch.float64)  # decayed index counts
    # lambda = 0 is the control: reconstruction training only. The auxiliary prior is neither run nor
    # updated, and the target only measures how predictable the tokens stay.
    control = settings.weight == 0

    def update_priors(indices: torch.Tensor, labels: torch.Tensor) -> float:
        """Refit q_aux on the current tokens, then update the target by its mode; return q_aux's loss."""
        with accelerator.autocast():
            aux_ce = wgf.aux_update(aux, aux_optimizer, indices, labels, settings.aux_steps, accelerator.backward)
            if settings.target == "online":
                wgf.aux_update(target, target_optimizer, indices, labels, 1, accelerator.backward)
        if settings.target == "ema":
            wgf.ema_update(target, accelerator.unwrap_model(aux), settings.target_half_life)
        return aux_ce

    def step(step_index: int, batch: dict) -> dict[str, float]:
        images, labels = batch["images"], batch["labels"]
        # During the first aux_fit_steps steps only q_aux learns: the tokenizer runs without gradients.
        fitting = not control and step_index < settings.aux_fit_steps
        weight = (
            0.0
            if fitting
            else wgf.ramped_weight(step_index, settings.weight, settings.weight_start, settings.weight_ramp)
        )
        with torch.set_grad_enabled(not fitting), accelerator.autocast():
            output = tokenizer(images, temperature=settings.temperature)
            recon, parts = objective.generator_loss(step_index, output, images)
            indices = output.quant.indices
            target_log_probs = wgf.log_probs(target, indices, labels)
        if control:
            clip_and_step(run, recon, tokenizer, optimizer, scheduler)
            parts.update(objective.after_step(step_index, images, output))
            parts.update(fixed_batch_metrics(run, ema.model, val_images, step_index))
            return {"loss": recon.item(), **parts, **token_metrics(indices, target_log_probs)}
        with torch.set_grad_enabled(not fitting), accelerator.autocast():
            aux_log_probs = wgf.log_probs(aux, indices, labels) if settings.contrast == "full" else None
            contrast = wgf.contrast(aux_log_probs, target_log_probs, settings.contrast)
            soft = output.quant.soft_assignment
            if not settings.codebook_gradient:
                codebook = accelerator.unwrap_model(tokenizer).quantizer.codebook.detach()
                soft = wgf.soft_assignment(output.quant.latents, codebook, settings.temperature)
            prior_loss = wgf.wgf_loss(contrast, soft, indices)
        loss = recon + weight * prior_loss
        if fitting and run.status.last_micro_batch:
            # Keep the tokenizer's schedule aligned with the step count. torch warns that no optimizer
            # step came first, which is intended here.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()
        elif not fitting:
            clip_and_step(run, loss, tokenizer, optimizer, scheduler)
        parts.update(objective.after_step(step_index, images, output, tokenizer_updated=not fitting))
        parts.update(fixed_batch_metrics(run, ema.model, val_images, step_index))

        aux_ce = update_priors(indices, labels)
        hard_contrast = contrast.gather(-1, indices[..., None])
        return {
            "loss": loss.item(),
            "recon": recon.item(),
            **parts,
            "l_wgf": prior_loss.item(),
            "lambda": weight,
            "contrast_mean": hard_contrast.mean().item(),
            "contrast_std": hard_contrast.std().item(),
            "aux_ce": aux_ce,
            **token_metrics(indices, target_log_probs),
        }

    def token_metrics(indices: torch.Tensor, target_log_probs: torch.Tensor) -> dict[str, float]:
        """Return the target's cross-entropy on the current tokens and the recent codebook usage."""
        # The target's cross-entropy measures how predictable the current tokens are to the prior.
        target_ce = -target_log_probs.gather(-1, indices[..., None]).mean().item()
        window.mul_(0.98).add_(torch.bincount(indices.flatten().cpu(), minlength=len(window)).double())
        recent = codebook_stats(window)
        return {"target_ce": target_ce, "usage_recent": recent["codebook_usage"],
                "perplexity_recent": recent["perplexity"]}  # fmt: skip

    def after_step(done: int) -> None:
        if done % settings.preview_every == 0 or done == settings.steps:
            preview_tokenizer(run, ema.model, val_images[:8], done)

    trainer.fit(step, train_batches(run), after_step)
    check_in_sync(accelerator, tokenizer, run.name)
    return finish_tokenizer_run(run, ema, objective)
