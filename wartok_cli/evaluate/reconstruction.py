"""Reconstruction metrics and codebook statistics over a whole evaluation pass.

Sums (squared error, PSNR, SSIM, image count, per-code index counts) are reduced
across processes before any ratio is taken, so the result on several processes
equals the single-process result on the same data.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import Accelerator
from torch import nn

from wartok_cli.evaluate.ssim import ssim


def codebook_stats(counts: torch.Tensor) -> dict[str, float]:
    """Return usage (fraction of codes used at least once) and perplexity from index counts."""
    total = counts.sum()
    probabilities = counts.double() / total.clamp(min=1)
    entropy = -(probabilities[probabilities > 0] * probabilities[probabilities > 0].log()).sum()
    return {
        "codebook_usage": float((counts > 0).double().mean()),
        "perplexity": float(entropy.exp()),
        "unigram_entropy": float(entropy),
    }


def image_mse(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Return the mean squared error of each image, on the [0, 1] scale (inputs are in [-1, 1])."""
    return ((reconstruction.float().clamp(-1, 1) - images.float()) / 2).pow(2).flatten(1).mean(1)


def psnr(mse: torch.Tensor) -> torch.Tensor:
    """Return the PSNR in dB of per-image errors on the [0, 1] scale (a peak of 1)."""
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-10))


@torch.no_grad()
def fixed_batch_psnr(tokenizer: nn.Module, images: torch.Tensor, accelerator: Accelerator) -> float:
    """Return the mean PSNR of the tokenizer's reconstructions of one batch, for training logs."""
    with accelerator.autocast():
        reconstruction = tokenizer(images).reconstruction
    return psnr(image_mse(reconstruction, images)).mean().item()


@torch.no_grad()
def evaluate_tokenizer(
    tokenizer: nn.Module,
    batches,
    accelerator: Accelerator,
    on_batch: Callable[[dict, torch.Tensor], None] | None = None,
) -> dict[str, float]:
    """Return MSE, PSNR, SSIM (images in [0, 1]), codebook usage and perplexity over every batch.

    ``on_batch(batch, reconstruction)``, when given, receives each batch with its
    reconstruction in [-1, 1], for example to extract Inception features. It must not
    start a collective operation, because processes can have different numbers of batches.
    """
    device = accelerator.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # squared error, PSNR, SSIM, images
    counts = torch.zeros(tokenizer.codebook_size, dtype=torch.float64, device=device)
    for batch in batches:
        images = batch["images"].to(device)
        with accelerator.autocast():
            output = tokenizer(images)
        reconstruction = output.reconstruction.float().clamp(-1, 1)
        error = image_mse(reconstruction, images)
        sums[0] += error.sum()
        sums[1] += psnr(error).sum()
        sums[2] += ssim((reconstruction + 1) / 2, (images + 1) / 2).double().sum()
        sums[3] += len(images)
        counts += torch.bincount(output.quant.indices.flatten(), minlength=tokenizer.codebook_size).double()
        if on_batch is not None:
            on_batch(batch, reconstruction)
    sums = accelerator.reduce(sums, reduction="sum")
    counts = accelerator.reduce(counts, reduction="sum")
    images = max(1.0, float(sums[3]))
    result = {
        "mse": float(sums[0]) / images,
        "psnr": float(sums[1]) / images,
        "ssim": float(sums[2]) / images,
        "images": int(sums[3]),
    }
    result.update(codebook_stats(counts))
    return result
