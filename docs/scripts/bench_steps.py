"""Time one training step of each stage's models for a recipe, fp32 and bf16 side by side.

    python docs/scripts/bench_steps.py recipes/quickstart.yaml [--steps 10]

A step is forward, backward and an AdamW update at the recipe's batch size, on
random inputs of the recipe's shape, on the CPU or the first GPU. The wAR-Tok
step adds the two teacher-forced prior passes and one auxiliary-prior update.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from wartok_cli import wgf
from wartok_cli.models import build_tokenizer
from wartok_cli.recipe import load_recipe
from wartok_cli.train.pretrain import tokenizer_config
from wartok_cli.train.prior import build_prior


def time_step(step, steps: int, device: torch.device) -> float:
    """Return the median milliseconds of ``step()`` over ``steps`` calls, after two warm-up calls."""
    times = []
    for index in range(steps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index >= 2:
            times.append(1000 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    side, channels = recipe.data.resolution, recipe.data.channels

    tokenizer = build_tokenizer(tokenizer_config(recipe)).to(device)
    prior = build_prior(recipe).to(device)
    aux = copy.deepcopy(prior)
    prior.requires_grad_(False)
    tokenizer_optimizer = torch.optim.AdamW(tokenizer.parameters(), 1e-4)
    prior_optimizer = torch.optim.AdamW(aux.parameters(), 1e-4)
    print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"tokenizer {sum(p.numel() for p in tokenizer.parameters()) / 1e6:.2f}M parameters, "
          f"prior {sum(p.numel() for p in prior.parameters()) / 1e6:.2f}M, {recipe.tokens_per_image} tokens per image")

    for precision in ("fp32", "bf16"):
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        batch = recipe.pretrain.batch_size
        images = torch.rand(batch, channels, side, side, device=device) * 2 - 1
        labels = torch.randint(0, max(1, recipe.data.num_classes), (batch,), device=device)
        tokens = torch.randint(0, recipe.tokenizer.codebook_size, (recipe.train_prior.batch_size, recipe.tokens_per_image),
                               device=device)

        def tokenizer_step(with_wgf: bool = False) -> None:
            with autocast:
                output = tokenizer(images, temperature=0.1 if with_wgf else None)
                loss = (output.reconstruction.float() - images).pow(2).mean() + output.quant.loss
                if with_wgf:
                    indices = output.quant.indices
                    contrast = wgf.contrast(wgf.log_probs(aux, indices, labels), wgf.log_probs(prior, indices, labels))
                    loss = loss + wgf.wgf_loss(contrast, output.quant.soft_assignment, indices)
            tokenizer_optimizer.zero_grad()
            loss.backward()
            tokenizer_optimizer.step()
            if with_wgf:
                with autocast:
                    wgf.aux_update(aux, prior_optimizer, indices, labels)

        def prior_step() -> None:
            with autocast:
                loss = aux.loss(tokens, labels[: len(tokens)])
            prior_optimizer.zero_grad()
            loss.backward()
            prior_optimizer.step()

        results = {
            "pretrain-tokenizer": time_step(tokenizer_step, args.steps, device),
            "train-prior": time_step(prior_step, args.steps, device),
            "train-wartok": time_step(lambda: tokenizer_step(with_wgf=True), args.steps, device),
        }
        for stage, milliseconds in results.items():
            print(f"{precision}  {stage:<20} {milliseconds:8.1f} ms/step")


if __name__ == "__main__":
    main()
