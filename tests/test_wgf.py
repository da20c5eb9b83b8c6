"""The wAR-Tok signal in wartok_cli.wgf: where its gradient goes, its forward value, and its direction."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from wartok_cli import wgf
from wartok_cli.models import ARPrior, ConvTokenizer
from wartok_cli.models.quantizer import CosineQuantizer
from wartok_cli.recipe import ReconstructionConfig
from wartok_cli.train.common import reconstruction_loss

CODEBOOK_SIZE = 16
NUM_CLASSES = 10
TEMPERATURE = 0.1


def make_tokenizer() -> ConvTokenizer:
    """Return a tokenizer of 8-pixel images to a 4 x 4 grid of 16 codes."""
    torch.manual_seed(0)
    return ConvTokenizer(
        resolution=8, channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=0,
        codebook_size=CODEBOOK_SIZE, code_dim=4,
    )


def make_prior(seed: int) -> ARPrior:
    torch.manual_seed(seed)
    return ARPrior(CODEBOOK_SIZE, seq_len=16, num_classes=NUM_CLASSES, width=16, depth=1, heads=2)


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(4, 1, 8, 8, generator=generator) * 2 - 1
    labels = torch.tensor([0, 3, -1, 9])
    return images, labels


def wgf_forward(tokenizer, target, aux, images, labels):
    """Return (tokenizer output, contrast, L_wgf) as the train-wartok step computes them."""
    output = tokenizer(images, temperature=TEMPERATURE)
    indices = output.quant.indices
    contrast = wgf.contrast(wgf.log_probs(aux, indices, labels), wgf.log_probs(target, indices, labels))
    return output, contrast, wgf.wgf_loss(contrast, output.quant.soft_assignment, indices)


def perturbed_copy(prior: ARPrior) -> ARPrior:
    """Return a copy of the prior whose output head is moved, so the contrast is non-zero."""
    aux = copy.deepcopy(prior)
    with torch.no_grad():
        aux.head.weight.add_(0.5 * torch.randn_like(aux.head.weight))
    return aux


# Gradient routing ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backward_pass():
    """Run one tokenizer backward pass of reconstruction + L_wgf with a differing auxiliary prior."""
    tokenizer = make_tokenizer()
    target = make_prior(1)
    aux = perturbed_copy(target).train()
    images, labels = make_batch()
    output, contrast, l_wgf = wgf_forward(tokenizer, target, aux, images, labels)
    recon, _ = reconstruction_loss(output, images, ReconstructionConfig())
    (recon + l_wgf).backward()
    return tokenizer, target, aux, contrast


def test_backward_skips_target_prior(backward_pass):
    _, target, _, _ = backward_pass
    with_grad = [name for name, parameter in target.named_parameters() if parameter.grad is not None]
    assert with_grad == []


def test_backward_skips_aux_prior(backward_pass):
    _, _, aux, _ = backward_pass
    with_grad = [name for name, parameter in aux.named_parameters() if parameter.grad is not None]
    assert with_grad == []


def test_backward_reaches_encoder(backward_pass):
    tokenizer, _, _, _ = backward_pass
    assert all(parameter.grad is not None for parameter in tokenizer.encoder.parameters())


def test_perturbed_aux_gives_contrast(backward_pass):
    _, _, _, contrast = backward_pass
    assert contrast.abs().max() > 0


def test_log_probs_restores_train_mode():
    prior = make_prior(1).train()
    wgf.log_probs(prior, torch.zeros(2, 16, dtype=torch.long), None)
    assert prior.training


def encoder_wgf_gradients(aux_from_target) -> list[torch.Tensor]:
    """Return d(L_wgf)/d(encoder and codebook parameters), with aux built from the target."""
    tokenizer = make_tokenizer()
    target = make_prior(1)
    aux = aux_from_target(target)
    images, labels = make_batch()
    _, _, l_wgf = wgf_forward(tokenizer, target, aux, images, labels)
    parameters = list(tokenizer.encoder.parameters()) + list(tokenizer.quantizer.parameters())
    return torch.autograd.grad(l_wgf, parameters)


def test_identical_aux_zero_gradient():
    gradients = encoder_wgf_gradients(copy.deepcopy)
    largest = max(gradient.abs().max().item() for gradient in gradients)
    assert largest == 0.0


def test_identical_aux_zero_loss():
    tokenizer, target = make_tokenizer(), make_prior(1)
    images, labels = make_batch()
    _, _, l_wgf = wgf_forward(tokenizer, target, copy.deepcopy(target), images, labels)
    assert l_wgf.item() == 0.0


def test_differing_aux_nonzero_gradient():
    gradients = encoder_wgf_gradients(perturbed_copy)
    largest = max(gradient.abs().max().item() for gradient in gradients)
    assert largest > 0.0


# Forward value ------------------------------------------------------------------------------


def test_forward_is_mean_hard_contrast():
    generator = torch.Generator().manual_seed(3)
    contrast = torch.randn(5, 6, CODEBOOK_SIZE, generator=generator)
    soft = torch.softmax(torch.randn(5, 6, CODEBOOK_SIZE, generator=generator), dim=-1)
    # Hard indices that are not the soft argmax: the value must follow the indices, not the soft mass.
    indices = (soft.argmax(dim=-1) + 1) % CODEBOOK_SIZE
    expected = contrast.gather(-1, indices[..., None]).mean()
    torch.testing.assert_close(wgf.wgf_loss(contrast, soft, indices), expected)


def test_forward_ignores_soft_values():
    generator = torch.Generator().manual_seed(4)
    contrast = torch.randn(2, 3, CODEBOOK_SIZE, generator=generator)
    indices = torch.randint(CODEBOOK_SIZE, (2, 3), generator=generator)
    sharp = torch.softmax(10 * torch.randn(2, 3, CODEBOOK_SIZE, generator=generator), dim=-1)
    flat = torch.full((2, 3, CODEBOOK_SIZE), 1.0 / CODEBOOK_SIZE)
    torch.testing.assert_close(wgf.wgf_loss(contrast, sharp, indices), wgf.wgf_loss(contrast, flat, indices))


def test_soft_gradient_is_contrast():
    generator = torch.Generator().manual_seed(5)
    contrast = torch.randn(2, 3, CODEBOOK_SIZE, generator=generator)
    soft = torch.softmax(torch.randn(2, 3, CODEBOOK_SIZE, generator=generator), dim=-1).requires_grad_(True)
    indices = soft.detach().argmax(dim=-1)
    wgf.wgf_loss(contrast, soft, indices).backward()
    torch.testing.assert_close(soft.grad, contrast / 6)


def test_target_only_contrast():
    target = torch.log_softmax(torch.randn(2, 3, CODEBOOK_SIZE), dim=-1)
    torch.testing.assert_close(wgf.contrast(None, target, "target_only"), -target)


def test_unknown_contrast_mode():
    target = torch.zeros(1, 1, CODEBOOK_SIZE)
    with pytest.raises(ValueError, match="unknown contrast mode"):
        wgf.contrast(target, target, "reverse")


# Direction on a toy problem -----------------------------------------------------------------


def toy_run(steps: int):
    """Minimise L_wgf over a learnable latent when the target prefers code 5 at position 2.

    The auxiliary log-probabilities are uniform and the target's are uniform except at
    position 2, so only that position has a contrast that favours one code. Returns the
    soft assignment at position 2 before and after, and the final hard index there.
    """
    position, preferred = 2, 5
    torch.manual_seed(6)
    quantizer = CosineQuantizer(CODEBOOK_SIZE, 4).requires_grad_(False)
    latents = torch.randn(1, 4, 4).requires_grad_(True)
    aux_log_probs = torch.full((1, 4, CODEBOOK_SIZE), -math.log(CODEBOOK_SIZE))
    logits = torch.zeros(1, 4, CODEBOOK_SIZE)
    logits[0, position, preferred] = 4.0
    target_log_probs = torch.log_softmax(logits, dim=-1)
    contrast = wgf.contrast(aux_log_probs, target_log_probs)

    optimizer = torch.optim.Adam([latents], lr=0.05)
    before = quantizer(latents, temperature=0.5).soft_assignment[0, position].detach()
    assert before.argmax().item() != preferred, "the toy must start away from the preferred code"
    for _ in range(steps):
        output = quantizer(latents, temperature=0.5)
        loss = wgf.wgf_loss(contrast, output.soft_assignment, output.indices)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    output = quantizer(latents, temperature=0.5)
    after = output.soft_assignment[0, position].detach()
    return before[preferred].item(), after[preferred].item(), output.indices[0, position].item()


def test_toy_mass_moves_to_preferred():
    before, after, _ = toy_run(steps=20)
    assert after > before


def test_toy_hard_index_reaches_preferred():
    _, _, index = toy_run(steps=60)
    assert index == 5


# The weight schedule ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, 0.0), (9, 0.0), (10, 0.5), (11, 1.0), (12, 1.5), (13, 2.0), (100, 2.0)],
)
def test_ramped_weight_schedule(step, expected):
    assert wgf.ramped_weight(step, weight=2.0, start=10, ramp=4) == pytest.approx(expected)


def test_ramped_weight_no_ramp():
    assert wgf.ramped_weight(3, weight=2.0, start=3, ramp=0) == 2.0


def test_ema_update_half_life():
    target, source = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    torch.nn.init.zeros_(target.weight)
    torch.nn.init.ones_(source.weight)
    for _ in range(10):
        wgf.ema_update(target, source, half_life=10)
    # After one half-life the target has covered half the distance to a fixed source.
    assert torch.allclose(target.weight, torch.full((2, 2), 0.5), atol=1e-6)


def test_ema_update_keeps_source():
    target, source = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = source.weight.detach().clone()
    wgf.ema_update(target, source, half_life=5)
    assert torch.equal(source.weight, before)


def test_soft_assignment_matches_quantizer():
    torch.manual_seed(0)
    quantizer = CosineQuantizer(16, 4)
    output = quantizer(torch.randn(2, 5, 4), temperature=0.1)
    recomputed = wgf.soft_assignment(output.latents, quantizer.codebook, 0.1)
    assert torch.allclose(recomputed, output.soft_assignment, atol=1e-6)


@pytest.mark.parametrize("detach", [False, True])
def test_codebook_gradient_switch(detach):
    torch.manual_seed(0)
    quantizer = CosineQuantizer(16, 4)
    latents = torch.randn(2, 5, 4, requires_grad=True)
    output = quantizer(latents, temperature=0.1)
    codebook = quantizer.codebook.detach() if detach else quantizer.codebook
    soft = wgf.soft_assignment(output.latents, codebook, 0.1)
    contrast = torch.randn(2, 5, 16)
    wgf.wgf_loss(contrast, soft, output.indices).backward()
    codebook_grad = quantizer.codebook.grad
    assert latents.grad.abs().sum() > 0
    if detach:
        assert codebook_grad is None
    else:
        assert codebook_grad.abs().sum() > 0
