"""Plumbing shared by the tokenizer stages: the reconstruction objective, batches, previews.

``TokenizerObjective`` is the whole objective that pretrain-tokenizer and
train-wartok share: pixel, perceptual and VQ losses, the optional discriminator
and the optional dead-code restarts. A stage adds its own terms on top.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from wartok_cli.data.loader import make_loader
from wartok_cli.errors import WartokError
from wartok_cli.evaluate.reconstruction import fixed_batch_psnr
from wartok_cli.models import TokenizerOutput
from wartok_cli.models.lpips import LPIPS, lpips_state_dict
from wartok_cli.recipe import ReconstructionConfig
from wartok_cli.train.gan import DISCRIMINATOR_PARTS, Adversary
from wartok_cli.train.loop import EMA, Run

log = logging.getLogger("wartok")

LPIPS_EXPORT_HINT = (
    "On a machine with internet access, "
    "`python -c \"import lpips, torch; torch.save(lpips.LPIPS(net='vgg').state_dict(), 'lpips_vgg.pth')\"` "
    "writes a complete file (the lpips package fetches the VGG16 backbone from torchvision on first use)."
)


def image_loss(
    output: TokenizerOutput, images: torch.Tensor, weights: ReconstructionConfig, perceptual: LPIPS | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Return the weighted pixel and perceptual loss of the reconstruction and its parts."""
    reconstruction = output.reconstruction.float()
    mse = F.mse_loss(reconstruction, images)
    l1 = F.l1_loss(reconstruction, images)
    loss = weights.mse_weight * mse + weights.l1_weight * l1
    parts = {"mse": mse.item(), "l1": l1.item()}
    if perceptual is not None:
        distance = perceptual(output.reconstruction, images).mean()
        loss = loss + weights.perceptual_weight * distance
        parts["perceptual"] = distance.item()
    return loss, parts


def reconstruction_loss(
    output: TokenizerOutput, images: torch.Tensor, weights: ReconstructionConfig, perceptual: LPIPS | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Return the weighted reconstruction objective (pixel, perceptual and VQ losses) and its parts.

    The perceptual term is added when an LPIPS network is passed; its weight comes from ``weights``.
    """
    loss, parts = image_loss(output, images, weights, perceptual)
    loss = loss + weights.vq_weight * output.quant.loss
    return loss, {**parts, "vq": output.quant.loss.item()}


def file_sha256(path: Path) -> str:
    """Return the sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_lpips(path: Path, device: torch.device | str = "cpu") -> LPIPS:
    """Build the frozen LPIPS network from a local state-dict file; raise WartokError if the file does not fit.

    ``.safetensors`` files are read with safetensors, others with ``torch.load(weights_only=True)``,
    never with plain pickle. A state dict nested under a ``state_dict`` key is accepted.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as error:
        raise WartokError(f"Failed to read the LPIPS weights file {path}: {error}. {LPIPS_EXPORT_HINT}") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WartokError(
            f"{path} contains a {type(state).__name__}, not a state dict of LPIPS weights. {LPIPS_EXPORT_HINT}"
        )
    try:
        weights = lpips_state_dict(state)
    except ValueError as error:
        raise WartokError(
            f"{path} is not a complete LPIPS VGG checkpoint: {error}. It needs the VGG16 backbone (keys features.N.* "
            f"or net.sliceK.N.*) and the five LPIPS v0.1 linear layers (lin0.model.1.weight to lin4.model.1.weight). "
            f"{LPIPS_EXPORT_HINT}"
        ) from None
    network = LPIPS()
    network.load_state_dict(weights, strict=False)  # the input scaling constants are not weights
    log.info("perceptual loss: LPIPS VGG16 from %s (sha256 %s)", path, file_sha256(path)[:16])
    return network.to(device)


def train_batches(run: Run):
    """Return a function from the resume step to an endless iterator of training batches on the device."""
    recipe = run.recipe

    def batches_from(start_step: int) -> Iterator[dict]:
        loader = make_loader(
            recipe.shards_dir,
            "train",
            batch_size=run.per_process_batch,
            channels=recipe.data.channels,
            train=True,
            seed=recipe.seed,
            rank=run.accelerator.process_index,
            world_size=run.accelerator.num_processes,
            num_workers=recipe.data.num_workers,
            shuffle_buffer=recipe.data.shuffle_buffer,
            start_batch=start_step,
        )
        for batch in loader:
            yield {**batch, "images": batch["images"].to(run.device), "labels": batch["labels"].to(run.device)}

    return batches_from


def eval_batches(run: Run, split: str = "val", batch_size: int | None = None):
    """Return a loader that visits every image of a split once across processes."""
    recipe = run.recipe
    return make_loader(
        recipe.shards_dir,
        split,
        batch_size=batch_size or run.per_process_batch,
        channels=recipe.data.channels,
        train=False,
        rank=run.accelerator.process_index,
        world_size=run.accelerator.num_processes,
        num_workers=recipe.data.num_workers,
    )


def preview_batch(run: Run, count: int = 8) -> torch.Tensor:
    """Return the first validation images, the same on every process, for preview grids."""
    recipe = run.recipe
    loader = make_loader(recipe.shards_dir, "val", batch_size=count, channels=recipe.data.channels, train=False)
    return next(iter(loader))["images"].to(run.device)


def fixed_batch_metrics(run: Run, tokenizer: nn.Module, images: torch.Tensor, step_index: int) -> dict[str, float]:
    """On the last micro-batch of a log step, return the tokenizer's PSNR on a fixed validation batch."""
    done, settings = step_index + 1, run.settings
    if not run.status.last_micro_batch or (done % settings.log_every and done != settings.steps):
        return {}
    return {"val_psnr": fixed_batch_psnr(tokenizer, images, run.accelerator)}


def save_grid(path: Path, *rows: torch.Tensor, columns: int = 8) -> None:
    """Save image rows (each (batch, C, H, W) in [-1, 1]) as one PNG grid, atomically."""
    images = torch.cat([row[:columns].detach().float().cpu() for row in rows])
    images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    count, channels, height, width = images.shape
    grid_rows = (count + columns - 1) // columns
    grid = torch.zeros(channels, grid_rows * (height + 2), columns * (width + 2), dtype=torch.uint8)
    for index, image in enumerate(images):
        top, left = (index // columns) * (height + 2) + 1, (index % columns) * (width + 2) + 1
        grid[:, top : top + height, left : left + width] = image
    array = grid.permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[..., 0] if channels == 1 else array)
    temporary = path.with_name(f".{path.name}.tmp")
    picture.save(temporary, format="PNG")
    temporary.replace(path)


class DeadCodeRestarter:
    """Re-initialises codes that no process used over a window of steps.

    Index counts are summed over processes before deciding which codes are dead, and
    the replacements are drawn from the gathered encoder outputs of all processes with
    a generator seeded by the recipe seed and the step. Every process therefore writes
    the same rows, and the codebook stays identical across replicas. The counts are not
    checkpointed: after a resume the first window starts at the resumed step.
    """

    def __init__(self, every: int, codebook_size: int, seed: int, device: torch.device) -> None:
        self.every = every
        self.seed = seed
        self.counts = torch.zeros(codebook_size, dtype=torch.int64, device=device)
        self.steps_counted = 0
        self.restarted_total = 0

    def observe(self, step: int, run: Run, tokenizer: nn.Module, optimizer, ema: EMA | None,
                indices: torch.Tensor, latents: torch.Tensor) -> int:  # fmt: skip
        """Count a micro-batch's indices; after the last micro-batch of a window, restart the dead codes.

        Returns the number of codes restarted. Windows are counted in optimizer steps, and the
        replacements come from the last micro-batch of the step.
        """
        self.counts += torch.bincount(indices.flatten(), minlength=len(self.counts))
        if not run.status.last_micro_batch:
            return 0
        self.steps_counted += 1
        if self.steps_counted < self.every:
            return 0
        accelerator = run.accelerator
        counts = accelerator.reduce(self.counts.clone(), reduction="sum")
        self.counts.zero_()
        self.steps_counted = 0
        dead = (counts == 0).nonzero().flatten()
        if len(dead) == 0:
            return 0

        pool = accelerator.gather(latents.detach().float().reshape(-1, latents.shape[-1]).contiguous())
        # Every process has the same pool, so dropping non-finite rows keeps the choice identical.
        pool = pool[torch.isfinite(pool).all(dim=1)]
        if len(pool) == 0:
            log.warning("step %d: no finite encoder output to restart %d dead codes from", step + 1, len(dead))
            return 0
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        if len(pool) >= len(dead):
            choice = torch.randperm(len(pool), generator=generator)[: len(dead)]
        else:
            choice = torch.randint(len(pool), (len(dead),), generator=generator)
        replacements = pool[choice.to(pool.device)]

        quantizer = accelerator.unwrap_model(tokenizer).quantizer
        quantizer.restart_codes(dead, replacements)
        if ema is not None:
            # The average would otherwise keep the dead code for about 1 / (1 - decay) steps.
            ema.model.quantizer.restart_codes(dead.to(ema.model.quantizer.codebook.device), replacements)
        # A restarted code starts with fresh AdamW moments instead of the stale ones of the dead code.
        state = optimizer.state.get(quantizer.codebook, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][dead] = 0
        self.restarted_total += len(dead)
        log.info("step %d: restarted %d dead codes of %d", step + 1, len(dead), len(counts))
        return len(dead)


class TokenizerObjective:
    """The training objective of a tokenizer stage, identical in pretrain-tokenizer and train-wartok.

    ``generator_loss`` returns the loss of the tokenizer's update. ``after_step`` runs after
    that update: one discriminator update on the same reconstructions, then the dead-code
    bookkeeping. Once the Trainer merges a step's micro-batches, every step has the same
    metric names, as the metric log needs.
    """

    def __init__(self, run: Run, tokenizer: nn.Module, optimizer, ema: EMA | None = None,
                 init_dir: Path | None = None) -> None:  # fmt: skip
        config = run.recipe.reconstruction
        self.run = run
        self.config = config
        self.tokenizer = tokenizer
        self.optimizer = optimizer
        self.ema = ema
        self.perceptual = load_lpips(config.lpips_weights, run.device) if config.perceptual_weight > 0 else None
        self.adversary = None
        if config.discriminator_weight > 0:
            self.adversary = Adversary(run, config, tokenizer, init_dir)
        self.restarter = None
        if config.restart_dead_codes_every > 0:
            codebook_size = run.accelerator.unwrap_model(tokenizer).codebook_size
            self.restarter = DeadCodeRestarter(config.restart_dead_codes_every, codebook_size, run.recipe.seed,
                                               run.device)  # fmt: skip

    def generator_loss(
        self, step: int, output: TokenizerOutput, images: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the reconstruction objective plus the discriminator's generator term, and their parts."""
        pixels, parts = image_loss(output, images, self.config, self.perceptual)
        loss = pixels + self.config.vq_weight * output.quant.loss
        parts["vq"] = output.quant.loss.item()
        if self.adversary is not None:
            adversarial, adversarial_parts = self.adversary.generator_loss(step, output.reconstruction, pixels)
            loss = loss + adversarial
            parts.update(adversarial_parts)
        return loss, parts

    def after_step(
        self, step: int, images: torch.Tensor, output: TokenizerOutput, tokenizer_updated: bool = True
    ) -> dict[str, float]:
        """Update the discriminator and restart dead codes; return their metrics.

        With ``tokenizer_updated=False`` (a step in which the tokenizer did not learn) both are
        skipped, the discriminator's metrics are nan, and the codebook stays as the step saw it.
        """
        parts: dict[str, float] = {}
        if self.adversary is not None:
            if tokenizer_updated:
                parts.update(self.adversary.discriminator_step(step, images, output.reconstruction))
            else:
                parts.update(dict.fromkeys(DISCRIMINATOR_PARTS, float("nan")))
        if self.restarter is not None:
            if tokenizer_updated:
                self.restarter.observe(step, self.run, self.tokenizer, self.optimizer, self.ema,
                                       output.quant.indices, output.quant.latents)  # fmt: skip
            # A running total, so it is reported on the last micro-batch only: the Trainer averages each
            # metric over the micro-batches that report it, and an average of totals would undercount.
            if self.run.status.last_micro_batch:
                parts["codes_restarted"] = float(self.restarter.restarted_total)
        return parts

    def finish(self) -> None:
        """Check and export the discriminator, if there is one; every process must call this."""
        if self.adversary is not None:
            self.adversary.finish(self.run.final_dir)
