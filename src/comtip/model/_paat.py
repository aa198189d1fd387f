"""Pair-aware Adversarial Training (PAAT).

Pair-swapped sentences, the pair discriminator, and the adversarial (FGM / PGD) perturbation of value embeddings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)


def pair_swap(gene_val: Tensor, gene_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Permute the values of each sentence among its real tokens: same genes, wrong gene–value pairs.

    A sentence with at least two distinct values always comes out different from the original (if the random
    permutation only moved equal values, the largest and smallest values are exchanged).

    Parameters
    ----------
    gene_val
        (B, L) values.
    gene_mask
        (B, L) bool, True for real tokens.

    Returns
    -------
    ``swapped`` (B, L) values (padded positions unchanged) and ``changed`` (B, L) bool: real tokens whose value
    differs from the original.
    """
    batch, length = gene_val.shape
    device = gene_val.device
    positions = torch.arange(length, device=device).expand(batch, -1)
    # valid positions in their order, then the padding in its order
    ordered = (~gene_mask).to(torch.int8).argsort(dim=1, stable=True)
    # valid positions in random order, then the padding in its order
    keys = torch.where(gene_mask, torch.rand(batch, length, device=device), 2.0 + positions.to(gene_val.dtype))
    shuffled = keys.argsort(dim=1)
    swapped = gene_val.clone()
    swapped.scatter_(1, ordered, gene_val.gather(1, shuffled))

    differs = ((swapped != gene_val) & gene_mask).any(dim=1)
    lo = gene_val.masked_fill(~gene_mask, float("inf"))
    hi = gene_val.masked_fill(~gene_mask, float("-inf"))
    distinct = gene_mask.any(dim=1) & (hi.amax(dim=1) > lo.amin(dim=1))
    fix = distinct & ~differs
    if bool(fix.any()):
        rows = fix.nonzero(as_tuple=True)[0]
        i_max = hi.argmax(dim=1)[rows]
        i_min = lo.argmin(dim=1)[rows]
        v_max = gene_val[rows, i_max]
        v_min = gene_val[rows, i_min]
        swapped[rows, i_max] = v_min
        swapped[rows, i_min] = v_max
    changed = (swapped != gene_val) & gene_mask
    return swapped, changed


class PairDiscriminator(nn.Module):
    """An MLP on the encoder's token outputs: logit that a token's gene–value pair is real (not swapped).

    Parameters
    ----------
    dim
        Token dimension.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 1))

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits (…,) of tokens (…, dim)."""
        return self.mlp(tokens).squeeze(-1)


def discriminator_loss(
    discriminator: PairDiscriminator,
    real_tokens: Tensor,
    swapped_tokens: Tensor,
    gene_mask: Tensor,
    changed: Tensor,
) -> Tensor:
    """Balanced BCE of the pair discriminator.

    Real pairs (all tokens of real sentences, and unmoved tokens of swapped ones) against swapped pairs, each class
    weighted equally.

    Parameters
    ----------
    discriminator
        The pair discriminator.
    real_tokens, swapped_tokens
        (B, L, D) token outputs of the real and of the pair-swapped sentences.
    gene_mask
        (B, L) real tokens.
    changed
        (B, L) tokens of the swapped sentences whose value was moved.
    """
    logits = discriminator(torch.cat([real_tokens, swapped_tokens], dim=0))
    valid = torch.cat([gene_mask, gene_mask], dim=0)
    labels = torch.cat([gene_mask, gene_mask & ~changed], dim=0).to(logits.dtype)
    per_token = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    pos = valid & (labels > 0.5)
    neg = valid & (labels < 0.5)
    parts = [per_token[m].mean() for m in (pos, neg) if bool(m.any())]
    if not parts:
        return logits.sum() * 0.0
    return torch.stack(parts).mean()


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def adversarial_loss(
    *,
    encode: Callable[[Tensor], Tensor],
    image_emb: Tensor,
    value_emb: Tensor,
    gene_mask: Tensor,
    base_loss: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    epsilon: float,
    kind: Literal["fgm", "pgd"] = "fgm",
    steps: int = 3,
) -> Tensor:
    """Alignment loss under the worst small perturbation of the value embeddings (FGM, or PGD in ``steps`` steps).

    The radius of each token's perturbation is ``epsilon`` times the norm of its value embedding. The direction
    comes from the gradient of ``base_loss`` (the unperturbed loss, whose graph is kept) with respect to
    ``value_emb``; PGD refines it by projected steps on ``encode`` with the image embeddings detached. Without
    autograd (e.g. a validation step under ``no_grad``) a random direction of the same radius is used.

    Parameters
    ----------
    encode
        ``delta (B, L, D) -> gene embeddings (B, d)`` of the same sentences with perturbed value embeddings.
    image_emb
        (B, d) image embeddings.
    value_emb
        (B, L, D) value embeddings of the unperturbed pass.
    gene_mask
        (B, L) real tokens (padding is never perturbed).
    base_loss
        The unperturbed loss, computed from ``value_emb``.
    loss_fn
        ``(image_emb, gene_emb) -> loss`` (InfoNCE).
    epsilon
        Relative radius.
    kind
        ``"fgm"`` or ``"pgd"``.
    steps
        PGD steps.
    """
    mask = gene_mask[..., None].to(value_emb.dtype)
    radius = epsilon * value_emb.detach().norm(dim=-1, keepdim=True) * mask
    can_grad = torch.is_grad_enabled() and base_loss.requires_grad and value_emb.requires_grad
    if not can_grad:
        delta = radius * _unit(torch.randn_like(value_emb))
        return loss_fn(image_emb, encode(delta))
    (grad,) = torch.autograd.grad(base_loss, value_emb, retain_graph=True, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(value_emb)
    if kind == "fgm":
        delta = radius * _unit(grad)
    else:
        alpha = 2.5 * radius / steps
        delta = torch.zeros_like(value_emb)
        for step in range(steps):
            delta = delta + alpha * _unit(grad)
            norm = delta.norm(dim=-1, keepdim=True)
            delta = (delta * (radius / norm.clamp_min(1e-12)).clamp(max=1.0)) * mask
            if step < steps - 1:
                d = delta.detach().requires_grad_(True)
                inner = loss_fn(image_emb.detach(), encode(d))
                (grad,) = torch.autograd.grad(inner, d, allow_unused=True)
                if grad is None:
                    grad = torch.zeros_like(value_emb)
    return loss_fn(image_emb, encode(delta.detach()))
