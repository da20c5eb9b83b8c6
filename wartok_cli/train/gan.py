"""The adversarial part of the tokenizer objective: a PatchGAN discriminator trained against the decoder.

One training step alternates two updates on the same reconstructions: the
tokenizer's (reconstruction loss plus the hinge generator loss, through a
frozen discriminator), then the discriminator's (hinge loss on real images
and detached reconstructions, plus the optional LeCam regulariser). Both are
off before ``discriminator_start``.

The generator weight is fixed (``discriminator_weight``) unless
``discriminator_adaptive`` requests VQGAN's adaptive weight. The fixed weight
is the default because the adaptive one depends on the decoder's last layer,
which differs between tokenizer families, and because it jumps toward its
clamp of 1e4 whenever the generator loss's gradient at that layer is small.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from wartok_cli.export import save_model
from wartok_cli.models.discriminator import (
    PatchDiscriminator,
    hinge_discriminator_loss,
    hinge_generator_loss,
    lecam_regularization,
)
from wartok_cli.recipe import ReconstructionConfig
from wartok_cli.train.loop import Run, check_in_sync

log = logging.getLogger("wartok")

ADAPTIVE_WEIGHT_MAX = 1e4
DISCRIMINATOR_PARTS = ("d_loss", "logits_real", "logits_fake", "lecam")


def last_decoder_weight(tokenizer: nn.Module) -> nn.Parameter:
    """Return the weight of the layer that writes the pixels, where VQGAN measures the adaptive weight."""
    if tokenizer.family == "vit1d":
        return tokenizer.to_patch.weight
    if tokenizer.family == "conv2d":
        return tokenizer.decoder.net[-1].weight
    raise ValueError(f"no last decoder layer known for tokenizer family {tokenizer.family!r}")


class LeCamAverages:
    """Moving averages of the mean real and fake logits, equal on every process and saved in checkpoints."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.real = 0.0
        self.fake = 0.0
        self.updates = 0

    def update(self, real: float, fake: float) -> None:
        """Move both averages toward the batch means; the first update copies them, so there is no start-up bias."""
        keep = self.decay if self.updates else 0.0
        self.real = keep * self.real + (1.0 - keep) * real
        self.fake = keep * self.fake + (1.0 - keep) * fake
        self.updates += 1

    def state_dict(self) -> dict:
        return {"real": self.real, "fake": self.fake, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.real = float(state["real"])
        self.fake = float(state["fake"])
        self.updates = int(state["updates"])


class Adversary:
    """The discriminator of a tokenizer stage, its AdamW optimizer and its losses.

    The discriminator and optimizer go through ``accelerator.prepare``, so they are
    wrapped for data parallelism and saved in every checkpoint with the tokenizer.
    ``init_dir``, the run of the tokenizer that a stage starts from, supplies the
    initial weights when that run exported a discriminator of the same shape.
    """

    def __init__(self, run: Run, config: ReconstructionConfig, tokenizer: nn.Module, init_dir: Path | None = None):
        self.run = run
        self.config = config
        accelerator = run.accelerator
        discriminator = PatchDiscriminator(
            run.recipe.data.channels, config.discriminator_channels, config.discriminator_layers
        )
        if init_dir is not None:
            load_discriminator(discriminator, init_dir)
        optimizer = torch.optim.AdamW(
            discriminator.parameters(),
            lr=config.discriminator_lr or run.settings.lr,
            betas=tuple(config.discriminator_betas or run.settings.betas),
            weight_decay=run.settings.weight_decay,
        )
        self.discriminator, self.optimizer = accelerator.prepare(discriminator, optimizer)
        self.lecam = LeCamAverages(config.lecam_decay)
        accelerator.register_for_checkpointing(self.lecam)
        self.finite = True  # every discriminator loss of the current step so far was finite on this process
        self.last_layer = last_decoder_weight(accelerator.unwrap_model(tokenizer))

    def active(self, step: int) -> bool:
        """Return whether the discriminator trains and its generator term is on at this step."""
        return step >= self.config.discriminator_start

    def generator_loss(
        self, step: int, reconstruction: torch.Tensor, image_loss: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the weighted generator term and its parts; exactly zero, with no graph, before the start step.

        ``image_loss`` is the pixel and perceptual loss, which only the adaptive weight reads.
        """
        if not self.active(step):
            return torch.zeros((), device=reconstruction.device), {"g_adv": 0.0, "g_weight": 0.0}
        discriminator = self.run.accelerator.unwrap_model(self.discriminator)
        # Frozen for this forward pass: the generator's backward then skips the discriminator's weights.
        discriminator.requires_grad_(False)
        try:
            logits_fake = discriminator(reconstruction)
        finally:
            discriminator.requires_grad_(True)
        adversarial = hinge_generator_loss(logits_fake.float())
        weight = torch.tensor(self.config.discriminator_weight, device=reconstruction.device)
        if self.config.discriminator_adaptive and torch.is_grad_enabled():
            weight = weight * self.adaptive_weight(image_loss, adversarial)
        return weight * adversarial, {"g_adv": adversarial.item(), "g_weight": weight.item()}

    def adaptive_weight(self, image_loss: torch.Tensor, adversarial: torch.Tensor) -> torch.Tensor:
        """Return VQGAN's ||d image_loss / dW|| / ||d adversarial / dW|| at the last decoder layer W.

        Each process measures its own norms, and the mean over processes is used, so every
        process logs the same weight.
        """
        image_grad = torch.autograd.grad(image_loss, self.last_layer, retain_graph=True)[0]
        adversarial_grad = torch.autograd.grad(adversarial, self.last_layer, retain_graph=True)[0]
        ratio = image_grad.norm() / (adversarial_grad.norm() + 1e-4)
        ratio = ratio.clamp(0.0, ADAPTIVE_WEIGHT_MAX).detach()
        return self.run.accelerator.reduce(ratio, reduction="mean")

    def discriminator_step(self, step: int, images: torch.Tensor, reconstruction: torch.Tensor) -> dict[str, float]:
        """Train the discriminator on one micro-batch of real images and detached reconstructions; return its parts.

        Gradients add up over the micro-batches of a step, and the optimizer steps on the last
        one, as the tokenizer's update does. When the loss or the gradient norm is not finite
        on any process, every process skips the update. Before the start step nothing runs,
        and every part is nan.
        """
        if not self.active(step):
            return dict.fromkeys(DISCRIMINATOR_PARTS, float("nan"))
        accelerator = self.run.accelerator
        status = self.run.status
        if status.micro_batch == 0:
            self.optimizer.zero_grad(set_to_none=True)
            self.finite = True
        batch = images.shape[0]
        # DDP all-reduces the gradients on the last micro-batch only, as for the tokenizer.
        sync = contextlib.nullcontext() if status.last_micro_batch else accelerator.no_sync(self.discriminator)
        with sync:
            # One forward pass over both halves: GroupNorm mixes no samples, so this equals two passes.
            with accelerator.autocast():
                logits = self.discriminator(torch.cat([images, reconstruction.detach()])).float()
            logits_real, logits_fake = logits[:batch], logits[batch:]
            loss = hinge_discriminator_loss(logits_real, logits_fake)

            means = accelerator.reduce(torch.stack([logits_real.mean(), logits_fake.mean()]).detach(), "mean")
            lecam = torch.zeros((), device=logits.device)
            if self.config.lecam_weight > 0:
                # The averages move once per micro-batch, so accumulation_steps > 1 shortens their memory in steps.
                self.lecam.update(float(means[0]), float(means[1]))
                lecam = lecam_regularization(logits_real, logits_fake, self.lecam.real, self.lecam.fake)
                loss = loss + self.config.lecam_weight * lecam
            self.finite = self.finite and bool(torch.isfinite(loss.detach()))
            accelerator.backward(loss / status.micro_batches)

        if status.last_micro_batch:
            # NOTE: fp16 (GPU only) is untested. Accelerate's clip_grad_norm_ unscales every prepared
            # optimizer, so the tokenizer's clipping may already have unscaled this one in the same step.
            max_norm = self.run.settings.grad_clip if self.run.settings.grad_clip is not None else math.inf
            grad_norm = float(accelerator.clip_grad_norm_(self.discriminator.parameters(), max_norm))
            failed = torch.tensor([float(not (self.finite and math.isfinite(grad_norm)))], device=logits.device)
            if accelerator.reduce(failed, "sum").item() > 0:
                self.optimizer.zero_grad(set_to_none=True)
                log.warning("step %d: the discriminator's loss or gradient norm is not finite on at least one "
                            "process, so its update was skipped", step + 1)  # fmt: skip
            else:
                self.optimizer.step()
        return {"d_loss": loss.item(), "logits_real": float(means[0]), "logits_fake": float(means[1]),
                "lecam": lecam.item()}  # fmt: skip

    def finish(self, final_dir: Path) -> None:
        """Check that the replicas agree, then export the discriminator next to the tokenizer."""
        accelerator = self.run.accelerator
        check_in_sync(accelerator, self.discriminator, "discriminator")
        if accelerator.is_main_process:
            save_model(final_dir, "discriminator", accelerator.unwrap_model(self.discriminator))
        accelerator.wait_for_everyone()


def load_discriminator(discriminator: PatchDiscriminator, tokenizer_path: Path) -> bool:
    """Load the discriminator exported next to a tokenizer if it exists and has the same shape; return whether it did.

    ``tokenizer_path`` is a run folder, its final/ folder or the tokenizer's weights file, as for load_tokenizer.
    """
    tokenizer_path = Path(tokenizer_path)
    folders = [tokenizer_path / "final", tokenizer_path] if tokenizer_path.is_dir() else [tokenizer_path.parent]
    found = [folder for folder in folders if (folder / "discriminator.safetensors").is_file()]
    if not found or not (found[0] / "discriminator.json").is_file():
        log.info("no discriminator next to %s: the discriminator starts from random weights", tokenizer_path)
        return False
    weights = found[0] / "discriminator.safetensors"
    config = found[0] / "discriminator.json"
    saved = json.loads(config.read_text())
    if saved != discriminator.config:
        log.warning("the discriminator in %s has config %s, not %s: starting from random weights",
                    weights, saved, discriminator.config)  # fmt: skip
        return False
    discriminator.load_state_dict(load_file(str(weights)))
    log.info("discriminator initialised from %s", weights)
    return True
