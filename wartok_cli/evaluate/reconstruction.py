"""Reconstruction metrics and codebook statistics over a whole evaluation pass.

Sums (squared error, PSNR, image count, per-code index counts) are reduced
across processes before any ratio is taken, so the result on several processes
equals the single-process result on the same data.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn


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


@torch.no_grad()
def evaluate_tokenizer(tokenizer: nn.Module, batches, accelerator: Accelerator) -> dict[str, float]:
    """Return MSE, PSNR (images in [0, 1]), codebook usage and perplexity over every batch."""
    device = accelerator.device
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # squared error, PSNR, images
    counts = torch.zeros(tokenizer.codebook_size, dtype=torch.float64, device=device)
    for batch in batches:
        images = batch["images"].to(device)
        with accelerator.autocast():
            output = tokenizer(images)
        reconstruction = output.reconstruction.float().clamp(-1, 1)
        # Errors on the [0, 1] scale, so PSNR has a peak of 1.
        error = ((reconstruction - images) / 2).pow(2).flatten(1).mean(1)
        sums[0] += error.sum()
        sums[1] += (10 * torch.log10(1.0 / error.clamp(min=1e-10))).sum()
        sums[2] += len(images)
        counts += torch.bincount(output.quant.indices.flatten(), minlength=tokenizer.codebook_size).double()
    sums = accelerator.reduce(sums, reduction="sum")
    counts = accelerator.reduce(counts, reduction="sum")
    images = max(1.0, float(sums[2]))
    result = {"mse": float(sums[0]) / images, "psnr": float(sums[1]) / images, "images": int(sums[2])}
    result.update(codebook_stats(counts))
    return result
