"""Vector quantizer with L2-normalised codes that also returns a soft assignment.

Codes and encoder outputs live on the unit sphere of a low-dimensional space,
so the nearest code is the one of highest cosine similarity. wAR-Tok needs two
views of the same assignment: the hard indices (the tokens the prior models) and the
soft assignment softmax(similarity / temperature) (the path its gradient takes
back to the encoder).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class QuantizerOutput:
    """Output of one quantizer call, with token axes flattened to (batch, length)."""

    quantized: torch.Tensor  # (batch, length, code_dim), straight-through to the encoder
    indices: torch.Tensor  # (batch, length), int64
    loss: torch.Tensor  # codebook loss + beta * commitment loss
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    soft_assignment: torch.Tensor | None = None  # (batch, length, codebook_size), rows sum to one
    latents: torch.Tensor | None = None  # (batch, length, code_dim), L2-normalised encoder outputs, fp32


class CosineQuantizer(nn.Module):
    """Nearest-code quantizer on the unit sphere with a straight-through estimator."""

    def __init__(self, codebook_size: int, code_dim: int, commitment_beta: float = 0.25) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.commitment_beta = commitment_beta
        self.codebook = nn.Parameter(torch.randn(codebook_size, code_dim))

    def forward(self, latents: torch.Tensor, temperature: float | None = None) -> QuantizerOutput:
        """Quantize latents (batch, length, code_dim); add the soft assignment when a temperature is given."""
        # Distances and the argmax run in fp32 even under autocast: in bf16 near-ties between
        # codes would flip the hard index from one precision to the other.
        with torch.autocast(device_type=latents.device.type, enabled=False):
            latents = F.normalize(latents.float(), dim=-1)
            codes = F.normalize(self.codebook.float(), dim=-1)
            similarity = latents @ codes.t()  # (batch, length, codebook_size)
            indices = similarity.argmax(dim=-1)
            quantized = codes[indices]

            # The codebook term moves codes toward the encoder, the commitment term (weighted by
            # beta) moves the encoder toward its code.
            codebook_loss = F.mse_loss(quantized, latents.detach())
            commitment_loss = F.mse_loss(latents, quantized.detach())
            loss = codebook_loss + self.commitment_beta * commitment_loss

            soft = None
            if temperature is not None:
                soft = torch.softmax(similarity / temperature, dim=-1)

        straight_through = latents + (quantized - latents).detach()
        return QuantizerOutput(straight_through, indices, loss, codebook_loss, commitment_loss, soft, latents)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Return the normalised codes of the given indices, (..., code_dim)."""
        return F.normalize(self.codebook.float(), dim=-1)[indices]

    @torch.no_grad()
    def restart_codes(self, codes: torch.Tensor, replacements: torch.Tensor) -> None:
        """Overwrite the codebook rows ``codes`` (int64, (count,)) with ``replacements`` (count, code_dim).

        The caller picks the replacements, normally encoder outputs, and must pass the same
        values on every process so that data-parallel replicas keep one codebook.
        """
        if replacements.shape != (len(codes), self.code_dim):
            raise ValueError(
                f"Expected replacements of shape ({len(codes)}, {self.code_dim}), got {tuple(replacements.shape)}."
            )
        self.codebook[codes] = F.normalize(replacements.float(), dim=-1).to(self.codebook.dtype)
