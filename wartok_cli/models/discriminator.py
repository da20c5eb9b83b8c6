"""PatchGAN discriminator and the hinge and LeCam losses of adversarial tokenizer training.

The layout follows the N-layer discriminator of pix2pix (Isola et al., 2017) as
VQGAN (Esser et al., 2021) uses it: ``layers`` convolutions of kernel 4 and
stride 2, then two of stride 1, with LeakyReLU(0.2) after every hidden layer.
Each output logit judges one overlapping patch of the image, so the result is a
map of real/fake logits, not one number per image.

Hidden layers use GroupNorm instead of the original BatchNorm. GroupNorm keeps
no running statistics and mixes no samples, so real and fake images can share
one forward pass, and a training step gives the same result whether the batch
is split over processes or not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KERNEL = 4
MAX_WIDTH_FACTOR = 8  # the widest layer has 8 x channels, as in pix2pix


def patch_map_side(resolution: int, layers: int) -> int:
    """Return the side of the logit map for square images of this side; below 1 means too small."""
    side = resolution
    for _ in range(layers):
        side = (side + 2 - KERNEL) // 2 + 1
    return side - 2  # each stride-1 convolution of kernel 4 and padding 1 removes one pixel


def _group_norm(channels: int) -> nn.GroupNorm:
    """Return GroupNorm with up to 32 groups of at least 4 channels; the group count divides the channels."""
    preferred = max(1, min(32, channels // 4))
    groups = next(count for count in range(preferred, 0, -1) if channels % count == 0)
    return nn.GroupNorm(groups, channels)


class PatchDiscriminator(nn.Module):
    """Images (batch, C, H, W) in [-1, 1] to patch logits (batch, 1, h, w); higher means real."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be at least 1, got {layers}")
        self.config = {"in_channels": in_channels, "channels": channels, "layers": layers}
        modules: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, KERNEL, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        width = channels
        for index in range(1, layers + 1):
            next_width = channels * min(2**index, MAX_WIDTH_FACTOR)
            stride = 2 if index < layers else 1
            modules += [
                nn.Conv2d(width, next_width, KERNEL, stride=stride, padding=1, bias=False),
                _group_norm(next_width),
                nn.LeakyReLU(0.2),
            ]
            width = next_width
        modules.append(nn.Conv2d(width, 1, KERNEL, stride=1, padding=1))
        self.net = nn.Sequential(*modules)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # DCGAN initialisation, as pix2pix and VQGAN use for this discriminator.
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, 0.0, 0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.GroupNorm):
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Return 0.5 * (mean relu(1 - D(real)) + mean relu(1 + D(fake))); zero once real > 1 and fake < -1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Return -mean D(fake): the generator lowers it by making reconstructions look real."""
    return -logits_fake.mean()


def lecam_regularization(
    logits_real: torch.Tensor, logits_fake: torch.Tensor, ema_real: float, ema_fake: float
) -> torch.Tensor:
    """Return the LeCam regulariser of Tseng et al. (CVPR 2021).

    It penalises real logits above the moving average of the fake logits and fake
    logits below that of the real ones, which keeps the discriminator's outputs
    from drifting apart when it overfits a small data set.
    """
    return F.relu(logits_real - ema_fake).pow(2).mean() + F.relu(ema_real - logits_fake).pow(2).mean()
