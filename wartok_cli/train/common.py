"""Plumbing shared by the tokenizer stages: the reconstruction loss, batches, previews."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from PIL import Image

from wartok_cli.data.loader import make_loader
from wartok_cli.models import TokenizerOutput
from wartok_cli.recipe import ReconstructionConfig
from wartok_cli.train.loop import Run


def reconstruction_loss(
    output: TokenizerOutput, images: torch.Tensor, weights: ReconstructionConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """Return the weighted reconstruction objective (pixel losses plus the VQ loss) and its parts."""
    reconstruction = output.reconstruction.float()
    mse = F.mse_loss(reconstruction, images)
    l1 = F.l1_loss(reconstruction, images)
    loss = weights.mse_weight * mse + weights.l1_weight * l1 + weights.vq_weight * output.quant.loss
    return loss, {"mse": mse.item(), "l1": l1.item(), "vq": output.quant.loss.item()}


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
