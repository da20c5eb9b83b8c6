"""CosineQuantizer: the soft assignment, the hard index, and where each VQ loss term sends its gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wartok_cli.models.quantizer import CosineQuantizer

CODEBOOK_SIZE = 16
CODE_DIM = 4


def make_quantizer(beta: float = 0.25, seed: int = 0) -> CosineQuantizer:
    torch.manual_seed(seed)
    return CosineQuantizer(CODEBOOK_SIZE, CODE_DIM, commitment_beta=beta)


def make_latents(seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(3, 7, CODE_DIM, generator=generator)


@pytest.mark.parametrize("temperature", [0.05, 0.5, 5.0])
def test_soft_rows_sum_to_one(temperature):
    output = make_quantizer()(make_latents(), temperature=temperature)
    sums = output.soft_assignment.sum(dim=-1)
    torch.testing.assert_close(sums, torch.ones_like(sums))


@pytest.mark.parametrize("temperature", [0.05, 0.5, 5.0])
def test_soft_argmax_equals_hard_index(temperature):
    output = make_quantizer()(make_latents(), temperature=temperature)
    assert torch.equal(output.soft_assignment.argmax(dim=-1), output.indices)


def test_soft_assignment_shape():
    output = make_quantizer()(make_latents(), temperature=0.1)
    assert output.soft_assignment.shape == (3, 7, CODEBOOK_SIZE)


def test_no_temperature_no_soft():
    output = make_quantizer()(make_latents())
    assert output.soft_assignment is None


def test_hard_index_is_nearest_code():
    quantizer = make_quantizer()
    latents = make_latents()
    output = quantizer(latents)
    codes = F.normalize(quantizer.codebook.detach(), dim=-1)
    distances = torch.cdist(F.normalize(latents, dim=-1), codes[None].expand(3, -1, -1))
    assert torch.equal(output.indices, distances.argmin(dim=-1))


def test_quantized_forward_is_code():
    quantizer = make_quantizer()
    output = quantizer(make_latents())
    torch.testing.assert_close(output.quantized, quantizer.lookup(output.indices))


def test_straight_through_gradient_identity():
    latents = make_latents().requires_grad_(True)
    output = make_quantizer()(latents)
    weights = torch.randn_like(output.quantized)
    (output.quantized * weights).sum().backward()
    expected = torch.autograd.grad((F.normalize(latents, dim=-1) * weights).sum(), latents)[0]
    torch.testing.assert_close(latents.grad, expected)


def latent_gradient(beta: float) -> torch.Tensor:
    """Return d(VQ loss)/d(latents) with the codebook frozen."""
    quantizer = make_quantizer(beta).requires_grad_(False)
    latents = make_latents().requires_grad_(True)
    quantizer(latents).loss.backward()
    return latents.grad


def test_commitment_gradient_scales_with_beta():
    torch.testing.assert_close(latent_gradient(1.0), 4.0 * latent_gradient(0.25))


def test_commitment_gradient_nonzero():
    assert latent_gradient(0.25).abs().sum() > 0


def test_latent_gradient_is_beta_commitment():
    quantizer = make_quantizer(0.25).requires_grad_(False)
    latents = make_latents().requires_grad_(True)
    output = quantizer(latents)
    commitment = torch.autograd.grad(output.commitment_loss, latents, retain_graph=True)[0]
    total = torch.autograd.grad(output.loss, latents)[0]
    torch.testing.assert_close(total, 0.25 * commitment)


def test_codebook_loss_skips_latents():
    latents = make_latents().requires_grad_(True)
    make_quantizer()(latents).codebook_loss.backward()
    assert latents.grad is None


def test_codebook_gradient_only_used_codes():
    quantizer = make_quantizer()
    output = quantizer(make_latents())
    output.codebook_loss.backward()
    used = torch.zeros(CODEBOOK_SIZE, dtype=torch.bool)
    used[output.indices.unique()] = True
    moved = quantizer.codebook.grad.abs().sum(dim=-1) > 0
    assert torch.equal(moved, used)


def test_codebook_loss_moves_codes():
    quantizer = make_quantizer()
    latents = make_latents()
    optimizer = torch.optim.SGD(quantizer.parameters(), lr=1.0)
    before = quantizer(latents).codebook_loss.item()
    for _ in range(10):
        optimizer.zero_grad()
        quantizer(latents).codebook_loss.backward()
        optimizer.step()
    assert quantizer(latents).codebook_loss.item() < before
