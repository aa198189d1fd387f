"""Loss functions and projection heads.

Symmetric InfoNCE, InfoNCE with hard negatives, the value-level prompt loss and its read-out, MFM's reconstruction
loss.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)


class ProjectionHead(nn.Module):
    """Projection to the embedding space (the caller L2-normalises).

    Parameters
    ----------
    in_dim, out_dim
        Input and output dimensions.
    kind
        ``"linear"``, or ``"mlp"``: Linear → GELU → Linear → dropout, plus the linear path, then LayerNorm.
    dropout
        Dropout of ``"mlp"``.
    """

    def __init__(self, in_dim: int, out_dim: int, kind: Literal["linear", "mlp"] = "mlp", dropout: float = 0.0) -> None:
        super().__init__()
        self.kind = kind
        self.proj = nn.Linear(in_dim, out_dim)
        if kind == "mlp":
            self.mlp = nn.Sequential(nn.GELU(), nn.Linear(out_dim, out_dim), nn.Dropout(dropout))
            self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Project (…, in_dim) → (…, out_dim)."""
        h = self.proj(x)
        if self.kind == "mlp":
            h = self.norm(h + self.mlp(h))
        return h


def info_nce(image_emb: Tensor, gene_emb: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE (CLIP) between matched rows of L2-normalised image and gene embeddings (B, d)."""
    logits = logit_scale * image_emb @ gene_emb.T
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def info_nce_hard_negatives(image_emb: Tensor, gene_emb: Tensor, negative_emb: Tensor, logit_scale: Tensor) -> Tensor:
    """Image → gene InfoNCE where each image also sees extra negatives (e.g. all pair-swapped sentences).

    Parameters
    ----------
    image_emb, gene_emb
        (B, d) matched, L2-normalised embeddings.
    negative_emb
        (M, d) extra negatives for every image.
    logit_scale
        Inverse temperature.
    """
    candidates = torch.cat([gene_emb, negative_emb], dim=0)
    logits = logit_scale * image_emb @ candidates.T
    target = torch.arange(image_emb.shape[0], device=logits.device)
    return F.cross_entropy(logits, target)


def two_hot_targets(values: Tensor, levels: Tensor) -> Tensor:
    """Distribute each value over its two neighbouring levels by linear interpolation.

    Parameters
    ----------
    values
        (B, n) true values of n genes.
    levels
        (n, K) non-decreasing levels of each gene.

    Returns
    -------
    (B, n, K) targets summing to 1; values at or below the first level go to it, values at or above the top
    level to the top level.
    """
    n, k = levels.shape
    vals = values.T.contiguous().to(levels.dtype)  # (n, B)
    right = torch.searchsorted(levels.contiguous(), vals, right=True)  # first level > value
    lo = (right - 1).clamp(0, k - 2)
    l_lo = levels.gather(1, lo)
    l_hi = levels.gather(1, lo + 1)
    span = l_hi - l_lo
    w_hi = torch.where(span > 0, (vals - l_lo) / span.clamp_min(1e-12), (vals >= l_hi).to(vals.dtype))
    w_hi = w_hi.clamp(0.0, 1.0)
    target = torch.zeros(n, vals.shape[1], k, dtype=levels.dtype, device=levels.device)
    target.scatter_(2, lo[..., None], (1.0 - w_hi)[..., None])
    target.scatter_add_(2, (lo + 1)[..., None], w_hi[..., None])
    return target.transpose(0, 1)


def prompt_logits(image_emb: Tensor, prompt_emb: Tensor, logit_scale: Tensor) -> Tensor:
    """Read-out logits (B, n, K) = cos(image, prompt_gk) · scale_g.

    Parameters
    ----------
    image_emb
        (B, d) L2-normalised image embeddings in the prompt space.
    prompt_emb
        (n, K, d) L2-normalised prompt embeddings.
    logit_scale
        Scalar or (n,) inverse read-out temperatures.
    """
    n, k, d = prompt_emb.shape
    logits = (image_emb @ prompt_emb.reshape(n * k, d).T).view(-1, n, k)
    scale = logit_scale.reshape(-1)
    return logits * (scale.view(1, -1, 1) if scale.numel() > 1 else scale)


def prompt_loss(
    image_emb: Tensor,
    prompt_emb: Tensor,
    levels: Tensor,
    values: Tensor,
    logit_scale: Tensor,
    mask: Tensor | None = None,
) -> Tensor:
    """The value-level prompt loss, which trains the zero-shot read-out.

    Cross-entropy of softmax_k(cos(image, prompt_gk) / τ_read) against the two-hot target of the spot's true value.

    Parameters
    ----------
    image_emb
        (B, d) image embeddings (prompt space).
    prompt_emb
        (n, K, d) embeddings of the single-gene prompts (g, v_k).
    levels
        (n, K) the levels v_k.
    values
        (B, n) the spots' true values of the n genes.
    logit_scale
        Scalar or (n,) inverse read-out temperatures.
    mask
        (B, n) bool: which values were measured (a gene that a spot's sample did not measure is left out, not read
        as zero). ``None``: all.
    """
    logits = prompt_logits(image_emb, prompt_emb, logit_scale)
    target = two_hot_targets(values, levels).to(logits.dtype)
    loss = -(target * logits.log_softmax(dim=-1)).sum(dim=-1)
    if mask is None:
        return loss.mean()
    mask = mask.to(loss.dtype)
    return (loss * mask).sum() / mask.sum().clamp_min(1.0)


def readout_prediction(image_emb: Tensor, prompt_emb: Tensor, levels: Tensor, logit_scale: Tensor) -> Tensor:
    """Zero-shot prediction (B, n): the softmax_k(cos(image, prompt_gk) / τ_read)-weighted mean of the levels v_k.

    Arguments as in :func:`prompt_loss`. This is what :meth:`comtip.CoMTIP.predict_from_image_embeddings` reports and
    what :func:`readout_value_loss` trains.
    """
    logits = prompt_logits(image_emb, prompt_emb, logit_scale)
    return (logits.softmax(dim=-1) * levels.to(logits.dtype)).sum(dim=-1)


def readout_value_loss(
    image_emb: Tensor,
    prompt_emb: Tensor,
    levels: Tensor,
    values: Tensor,
    logit_scale: Tensor,
    mask: Tensor | None = None,
) -> Tensor:
    """Squared error of the zero-shot prediction (:func:`readout_prediction`), each gene in units of its batch spread.

    Dividing each gene's error by its variance over the batch weighs the genes alike, as the per-gene correlations of
    EVAL.md do; genes constant in the batch are left out. Arguments as in :func:`prompt_loss`.
    """
    pred = readout_prediction(image_emb, prompt_emb, levels, logit_scale)
    values = values.to(pred.dtype)
    if mask is None:
        var = values.var(dim=0, unbiased=False)
        varies = var > 1e-8
        if not bool(varies.any()):
            return pred.sum() * 0.0
        err = (pred - values)[:, varies] ** 2 / var[varies]
        return err.mean()
    # measured values only: each gene's spread over the spots that measured it
    w = mask.to(pred.dtype)
    n = w.sum(dim=0)
    mean = (values * w).sum(dim=0) / n.clamp_min(1.0)
    var = (((values - mean) ** 2) * w).sum(dim=0) / n.clamp_min(1.0)
    varies = (var > 1e-8) & (n > 1)
    if not bool(varies.any()):
        return pred.sum() * 0.0
    err = (pred - values)[:, varies] ** 2 / var[varies] * w[:, varies]
    return err.sum() / w[:, varies].sum()


def mfm_loss(pred: Tensor, target: Tensor, kind: Literal["cosine", "smooth_l1"] = "cosine") -> Tensor:
    """MFM reconstruction loss between predicted and target token features (…, C), on normalised features."""
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(pred, target, dim=-1)).mean()
    shape = pred.shape[-1:]
    return F.smooth_l1_loss(F.layer_norm(pred, shape), F.layer_norm(target, shape))
