"""The wAR-Tok prior-matching signal, in one place.

A Wasserstein-gradient-flow step on KL(q_tokens || p_prior) becomes, for hard
tokens, a per-token contrast between two AR models run teacher-forced on the
tokenizer's current indices z (Zheng, Luo, Hu, arXiv 2605.06148):

    c[b, t, k] = log q_aux(k | z_<t) - log p_target(k | z_<t)     (no gradient)
    L_wgf      = mean over b, t of  sum_k c[b, t, k] * pi_ste[b, t, k]
    pi_ste     = pi + (onehot(z) - pi).detach()

pi is the quantizer's soft assignment softmax(similarity / tau). The forward
value of L_wgf is the per-token estimate of log q - log p on the hard tokens.
Its gradient reaches the encoder only through pi, pushing assignment mass away
from codes the tokenizer over-produces relative to the prior (c > 0) and toward
codes the prior predicts (c < 0). q_aux is refitted online by cross-entropy on
the detached indices so that it keeps tracking the tokenizer's distribution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def log_probs(prior: nn.Module, indices: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Return log p(k | z_<t) for every position and code, (batch, length, vocab), in fp32."""
    was_training = prior.training
    prior.eval()  # no class dropout or dropout: the contrast compares the two models, not two noise draws
    try:
        logits = prior(indices, labels)
    finally:
        prior.train(was_training)
    return F.log_softmax(logits.float(), dim=-1)


def contrast(aux_log_probs: torch.Tensor | None, target_log_probs: torch.Tensor, mode: str = "full") -> torch.Tensor:
    """Return c = log q_aux - log p_target over the whole codebook, (batch, length, vocab).

    ``mode="target_only"`` drops log q_aux and returns -log p_target: the plain
    cross-entropy ablation that the auxiliary prior exists to correct.
    """
    if mode == "target_only":
        return -target_log_probs.detach()
    if mode != "full":
        raise ValueError(f"unknown contrast mode {mode!r}; expected 'full' or 'target_only'")
    return (aux_log_probs - target_log_probs).detach()


def soft_assignment(latents: torch.Tensor, codebook: torch.Tensor, temperature: float) -> torch.Tensor:
    """Return pi = softmax(cosine similarity / temperature) of latents (batch, length, dim) over the codes.

    The quantizer returns the same pi. This form lets a caller pass a detached codebook, so
    that L_wgf moves only the encoder and leaves the codes to the reconstruction objective.
    """
    with torch.autocast(device_type=latents.device.type, enabled=False):
        similarity = F.normalize(latents.float(), dim=-1) @ F.normalize(codebook.float(), dim=-1).t()
        return torch.softmax(similarity / temperature, dim=-1)


def straight_through_assignment(soft_assignment: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Return pi_ste: the one-hot of the hard indices forward, the soft assignment's gradient backward."""
    hard = F.one_hot(indices, soft_assignment.shape[-1]).to(soft_assignment.dtype)
    return soft_assignment + (hard - soft_assignment).detach()


def wgf_loss(contrast_values: torch.Tensor, soft_assignment: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Return L_wgf = mean over (batch, position) of sum_k c * pi_ste.

    The contrast is detached, so no AR model receives a gradient from this loss.
    """
    pi_ste = straight_through_assignment(soft_assignment.float(), indices)
    return (contrast_values.detach() * pi_ste).sum(dim=-1).mean()


def aux_update(
    aux_prior: nn.Module,
    optimizer: torch.optim.Optimizer,
    indices: torch.Tensor,
    labels: torch.Tensor | None,
    steps: int = 1,
    backward=None,
) -> float:
    """Refit q_aux by cross-entropy on the detached current indices; return the last loss.

    ``backward`` lets a caller route the backward pass through its accelerator
    (mixed-precision scaling, gradient sync); plain ``loss.backward()`` otherwise.
    """
    indices = indices.detach()
    loss_value = float("nan")
    for _ in range(steps):
        logits = aux_prior(indices, labels)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), indices.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        (backward or torch.Tensor.backward)(loss)
        optimizer.step()
        loss_value = loss.item()
    optimizer.zero_grad(set_to_none=True)
    return loss_value


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, half_life: float) -> None:
    """Move the target prior toward the source (q_aux) with the given half-life in steps.

    This is the ``ema`` target: a slowly lagging copy of the auxiliary prior, so the
    contrast compares the current token distribution with a smoothed past one.
    """
    decay = 0.5 ** (1.0 / half_life)
    for average, current in zip(target.parameters(), source.parameters()):
        average.lerp_(current.detach().to(average.dtype), 1.0 - decay)


def ramped_weight(step: int, weight: float, start: int, ramp: int) -> float:
    """Return lambda at a step: zero before ``start``, then a linear ramp over ``ramp`` steps."""
    if step < start:
        return 0.0
    if ramp == 0:
        return weight
    return weight * min(1.0, (step - start + 1) / ramp)
