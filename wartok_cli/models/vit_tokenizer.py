"""A 1D transformer tokenizer in the style of TiTok: an image becomes a short sequence of tokens.

The encoder reads the image's patches together with a fixed number of learnable
latent tokens and keeps only the latent tokens' outputs, so the token count is
set by ``num_latent_tokens`` and not by the image size. The decoder reads the
quantized tokens together with one learnable query per patch and predicts the
pixels of each patch. Both transformers are non-causal, with pre-norm blocks,
RMSNorm, a gated MLP (GEGLU or SwiGLU) and learned absolute positions.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from wartok_cli.models.conv_tokenizer import TokenizerOutput
from wartok_cli.models.prior import RMSNorm
from wartok_cli.models.quantizer import CosineQuantizer, QuantizerOutput

MLP_ACTIVATIONS = {"geglu": F.gelu, "swiglu": F.silu}


class GatedMLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), with GELU (GEGLU) or SiLU (SwiGLU) as act."""

    def __init__(self, dim: int, hidden: int, mlp: Literal["geglu", "swiglu"]) -> None:
        super().__init__()
        if mlp not in MLP_ACTIVATIONS:
            raise ValueError(f"Invalid mlp {mlp!r}: expected one of {', '.join(MLP_ACTIVATIONS)}.")
        self.activation = MLP_ACTIVATIONS[mlp]
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.activation(self.gate(x)) * self.up(x))


class SelfAttention(nn.Module):
    """Multi-head non-causal self-attention through scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)  # each (batch, heads, length, head_dim)
        out = F.scaled_dot_product_attention(query, key, value)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, mlp: Literal["geglu", "swiglu"]) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.mlp_norm = RMSNorm(dim)
        # Two thirds of dim * mlp_ratio, as in the AR prior, so the three matrices of the gated MLP
        # hold about as many weights as the two of a plain MLP with the same ratio.
        self.mlp = GatedMLP(dim, int(dim * mlp_ratio * 2 / 3), mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """A stack of pre-norm blocks followed by a final RMSNorm."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float, mlp: Literal["geglu", "swiglu"]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, mlp) for _ in range(depth))
        self.norm = RMSNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class ViTTokenizer(nn.Module):
    """Patch encoder with learnable latent tokens, cosine quantizer, and patch-query decoder."""

    family = "vit1d"

    def __init__(
        self,
        resolution: int = 32,
        channels: int = 1,
        patch_size: int = 4,
        num_latent_tokens: int = 32,
        width: int = 128,
        encoder_depth: int = 4,
        decoder_depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        mlp: Literal["geglu", "swiglu"] = "geglu",
        codebook_size: int = 256,
        code_dim: int = 8,
        commitment_beta: float = 0.25,
    ) -> None:
        super().__init__()
        if resolution % patch_size:
            raise ValueError(f"resolution ({resolution}) must be divisible by patch_size ({patch_size})")
        if width % heads:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        self.config = {
            "family": self.family,
            "resolution": resolution,
            "channels": channels,
            "patch_size": patch_size,
            "num_latent_tokens": num_latent_tokens,
            "width": width,
            "encoder_depth": encoder_depth,
            "decoder_depth": decoder_depth,
            "heads": heads,
            "mlp_ratio": mlp_ratio,
            "mlp": mlp,
            "codebook_size": codebook_size,
            "code_dim": code_dim,
            "commitment_beta": commitment_beta,
        }
        self.resolution = resolution
        self.channels = channels
        self.patch_size = patch_size
        self.grid = resolution // patch_size
        self.num_patches = self.grid**2
        self.num_tokens = num_latent_tokens
        self.codebook_size = codebook_size

        # Encoder: patch embedding plus learnable latent tokens, each with its own learned positions.
        self.patch_embed = nn.Linear(channels * patch_size**2, width)
        self.patch_position = nn.Parameter(torch.zeros(1, self.num_patches, width))
        self.latent_tokens = nn.Parameter(torch.zeros(1, num_latent_tokens, width))
        self.latent_position = nn.Parameter(torch.zeros(1, num_latent_tokens, width))
        self.encoder = Transformer(width, encoder_depth, heads, mlp_ratio, mlp)
        self.to_code = nn.Linear(width, code_dim)

        self.quantizer = CosineQuantizer(codebook_size, code_dim, commitment_beta)

        # Decoder: quantized tokens projected up, plus one shared mask token per patch position.
        self.from_code = nn.Linear(code_dim, width)
        self.decoder_latent_position = nn.Parameter(torch.zeros(1, num_latent_tokens, width))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.decoder_patch_position = nn.Parameter(torch.zeros(1, self.num_patches, width))
        self.decoder = Transformer(width, decoder_depth, heads, mlp_ratio, mlp)
        self.to_patch = nn.Linear(width, channels * patch_size**2)

        self.apply(self._init_weights)
        for parameter in (
            self.patch_position,
            self.latent_tokens,
            self.latent_position,
            self.decoder_latent_position,
            self.mask_token,
            self.decoder_patch_position,
        ):
            nn.init.normal_(parameter, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """Split images (batch, C, H, W) into flattened patches (batch, num_patches, C * p * p)."""
        expected = (self.channels, self.resolution, self.resolution)
        if tuple(images.shape[1:]) != expected:
            raise ValueError(f"Expected images of shape (batch, {', '.join(map(str, expected))}), got {tuple(images.shape)}.")
        batch, p, g = images.shape[0], self.patch_size, self.grid
        patches = images.reshape(batch, self.channels, g, p, g, p)
        patches = patches.permute(0, 2, 4, 1, 3, 5)  # (batch, row, column, C, p, p)
        return patches.reshape(batch, self.num_patches, self.channels * p * p)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """Reassemble flattened patches (batch, num_patches, C * p * p) into images (batch, C, H, W)."""
        batch, p, g = patches.shape[0], self.patch_size, self.grid
        images = patches.reshape(batch, g, g, self.channels, p, p)
        images = images.permute(0, 3, 1, 4, 2, 5)  # (batch, C, row, p, column, p)
        return images.reshape(batch, self.channels, self.resolution, self.resolution)

    def encode(self, images: torch.Tensor, temperature: Optional[float] = None) -> QuantizerOutput:
        """Encode images to tokens (batch, num_latent_tokens), with the quantizer's losses."""
        batch = images.shape[0]
        patches = self.patch_embed(self.patchify(images)) + self.patch_position
        latents = (self.latent_tokens + self.latent_position).expand(batch, -1, -1)
        hidden = self.encoder(torch.cat([patches, latents], dim=1))
        latents = self.to_code(hidden[:, self.num_patches :])  # (batch, num_latent_tokens, code_dim)
        return self.quantizer(latents, temperature)

    def decode_latents(self, quantized: torch.Tensor) -> torch.Tensor:
        """Decode quantized latents (batch, num_latent_tokens, code_dim) to images (batch, C, H, W)."""
        if quantized.ndim != 3 or quantized.shape[1] != self.num_tokens:
            raise ValueError(
                f"Expected quantized latents of shape (batch, {self.num_tokens}, code_dim), got {tuple(quantized.shape)}."
            )
        batch = quantized.shape[0]
        tokens = self.from_code(quantized) + self.decoder_latent_position
        queries = (self.mask_token + self.decoder_patch_position).expand(batch, -1, -1)
        hidden = self.decoder(torch.cat([tokens, queries], dim=1))
        return self.unpatchify(self.to_patch(hidden[:, self.num_tokens :]))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Decode token indices (batch, num_latent_tokens) to images (batch, C, H, W)."""
        return self.decode_latents(self.quantizer.lookup(indices))

    def forward(self, images: torch.Tensor, temperature: Optional[float] = None) -> TokenizerOutput:
        quant = self.encode(images, temperature)
        return TokenizerOutput(self.decode_latents(quant.quantized), quant)
