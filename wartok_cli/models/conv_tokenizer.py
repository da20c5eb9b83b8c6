"""A convolutional VQGAN-style tokenizer; tokens are the latent grid in raster order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from wartok_cli.models.quantizer import CosineQuantizer, QuantizerOutput


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4) or 1, channels)


class ResBlock(nn.Module):
    """Pre-norm residual block of two 3x3 convolutions."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _norm(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1),
            _norm(out_channels), nn.SiLU(), nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class Encoder(nn.Module):
    """Image (batch, C, H, W) to latents (batch, code_dim, H / f, W / f)."""

    def __init__(self, channels: int, base_channels: int, channel_mult: list[int], num_res_blocks: int, code_dim: int):
        super().__init__()
        widths = [base_channels * mult for mult in channel_mult]
        layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 3, padding=1)]
        current = widths[0]
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(current, width))
                current = width
            if level < len(widths) - 1:
                layers.append(nn.Conv2d(current, current, 3, stride=2, padding=1))
        layers += [ResBlock(current, current), _norm(current), nn.SiLU(), nn.Conv2d(current, code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


class Decoder(nn.Module):
    """Latents (batch, code_dim, h, w) back to images (batch, C, h * f, w * f)."""

    def __init__(self, channels: int, base_channels: int, channel_mult: list[int], num_res_blocks: int, code_dim: int):
        super().__init__()
        widths = [base_channels * mult for mult in reversed(channel_mult)]
        current = widths[0]
        layers: list[nn.Module] = [nn.Conv2d(code_dim, current, 3, padding=1), ResBlock(current, current)]
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(current, width))
                current = width
            if level < len(widths) - 1:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(current, current, 3, padding=1)]
        layers += [_norm(current), nn.SiLU(), nn.Conv2d(current, channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.net(latents)


@dataclass
class TokenizerOutput:
    """Reconstruction plus everything the quantizer returned."""

    reconstruction: torch.Tensor  # (batch, C, H, W), in [-1, 1] up to the decoder's range
    quant: QuantizerOutput


class ConvTokenizer(nn.Module):
    """Encoder, cosine quantizer and decoder; one token per cell of the latent grid."""

    family = "conv2d"

    def __init__(
        self,
        resolution: int = 32,
        channels: int = 1,
        base_channels: int = 64,
        channel_mult: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 1,
        codebook_size: int = 256,
        code_dim: int = 8,
        commitment_beta: float = 0.25,
    ) -> None:
        super().__init__()
        self.config = {
            "family": self.family,
            "resolution": resolution,
            "channels": channels,
            "base_channels": base_channels,
            "channel_mult": list(channel_mult),
            "num_res_blocks": num_res_blocks,
            "codebook_size": codebook_size,
            "code_dim": code_dim,
            "commitment_beta": commitment_beta,
        }
        self.grid = resolution // 2 ** (len(channel_mult) - 1)
        self.num_tokens = self.grid**2
        self.codebook_size = codebook_size
        self.encoder = Encoder(channels, base_channels, list(channel_mult), num_res_blocks, code_dim)
        self.quantizer = CosineQuantizer(codebook_size, code_dim, commitment_beta)
        self.decoder = Decoder(channels, base_channels, list(channel_mult), num_res_blocks, code_dim)

    def encode(self, images: torch.Tensor, temperature: Optional[float] = None) -> QuantizerOutput:
        """Encode images to tokens (batch, length) in raster order, with the quantizer's losses."""
        latents = self.encoder(images)  # (batch, code_dim, h, w)
        return self.quantizer(latents.flatten(2).transpose(1, 2), temperature)

    def decode_latents(self, quantized: torch.Tensor) -> torch.Tensor:
        """Decode quantized latents (batch, length, code_dim) to images."""
        grid = quantized.transpose(1, 2).reshape(quantized.shape[0], -1, self.grid, self.grid)
        return self.decoder(grid)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Decode token indices (batch, length) to images (batch, C, H, W)."""
        return self.decode_latents(self.quantizer.lookup(indices))

    def forward(self, images: torch.Tensor, temperature: Optional[float] = None) -> TokenizerOutput:
        quant = self.encode(images, temperature)
        return TokenizerOutput(self.decode_latents(quant.quantized), quant)
