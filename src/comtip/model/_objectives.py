"""The training objectives of the CoMTIP network: how a batch becomes its losses.

The heads used only by training (depth) live here too. Each function takes the :class:`CoMTIPNetwork` and a batch
(see :mod:`comtip.data` for the batch contract); the module's ``training_losses`` / ``readout_losses`` /
``masked_value_losses`` methods call them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._gene import sentence_dropout
from ._image import random_token_mask
from ._losses import (
    info_nce,
    info_nce_hard_negatives,
    mfm_loss,
    prompt_loss,
    readout_value_loss,
)
from ._paat import adversarial_loss, discriminator_loss, pair_swap

if TYPE_CHECKING:
    from ._network import CoMTIPNetwork


class DepthHead(nn.Module):
    """Predicts a spot's log depth (log1p total UMI) from pooled image features.

    The target is standardised with running statistics of the training batches (kept like BatchNorm's, saved
    with the model), so the head does not spend its first steps learning the offset.

    Parameters
    ----------
    in_dim
        Pooled feature dimension.
    momentum
        Update rate of the running mean and variance.
    """

    def __init__(self, in_dim: int, momentum: float = 0.01) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, 64), nn.GELU(), nn.Linear(64, 1))
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(()))
        self.register_buffer("running_var", torch.ones(()))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def loss(self, pooled: Tensor, depth: Tensor) -> Tensor:
        """MSE on the standardised log depth; updates the running statistics in training.

        Spots without a depth (NaN, e.g. data given already normalised) are left out. The statistics, the target and
        the loss are computed in fp32 whatever the autocast dtype of ``pooled`` (the buffers are fp32).
        """
        depth = depth.float().reshape(-1)
        pred = self.mlp(pooled).squeeze(-1).float()
        valid = torch.isfinite(depth)
        if not bool(valid.any()):
            return pred.sum() * 0.0
        depth, pred = depth[valid], pred[valid]
        if self.training:
            with torch.no_grad():
                mean = depth.mean()
                var = depth.var(unbiased=False).clamp_min(1e-4) if depth.numel() > 1 else depth.new_ones(())
                if not bool(self.initialised):
                    self.running_mean.copy_(mean)
                    self.running_var.copy_(var)
                    self.initialised.fill_(True)
                else:
                    self.running_mean.lerp_(mean, self.momentum)
                    self.running_var.lerp_(var, self.momentum)
        target = (depth - self.running_mean.float()) / self.running_var.float().sqrt()
        with torch.autocast(pred.device.type, enabled=False):
            return F.mse_loss(pred, target)

    def forward(self, pooled: Tensor) -> Tensor:
        """Predicted log depth (B,), in fp32."""
        return self.mlp(pooled).squeeze(-1).float() * self.running_var.float().sqrt() + self.running_mean.float()


def check_batch(m: CoMTIPNetwork, batch: Mapping[str, Tensor], keys: Sequence[str]) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        msg = f"The batch lacks {missing} (it has {sorted(batch)}); see the batch contract in comtip.data."
        raise ValueError(msg)


def training_losses(m: CoMTIPNetwork, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """See :meth:`CoMTIPNetwork.training_losses`."""
    cfg = m.config
    weights = cfg.loss_weights()
    uses_image = cfg.uses_contrastive or any(weights[k] > 0 for k in ("prompt", "mfm", "depth"))
    uses_sentences = cfg.uses_contrastive or any(weights[k] > 0 for k in ("paat_disc", "mvm"))
    need = ["gene_idx", "gene_val", "gene_mask"] if uses_sentences else []
    if uses_image and "image_prefix" not in batch:
        need.append("image")
    if weights["prompt"] > 0:
        need.append("expr")
    if weights["depth"] > 0:
        need.append("depth")
    check_batch(m, batch, need)
    parts: dict[str, Tensor] = {}

    # ---- image side (skipped when no active part looks at images)
    if uses_image:
        feats = batch["image_prefix"] if "image_prefix" in batch else m.image.forward_prefix(batch["image"])
        tokens, pooled = m.image.forward_suffix(feats)
        if weights["mfm"] > 0:
            parts["mfm"] = mfm_part(m, feats, tokens)
        if weights["depth"] > 0:
            parts["depth"] = m.depth_head.loss(pooled, batch["depth"])
        if weights["prompt"] > 0:
            parts["prompt"] = prompt_part(m, pooled, batch["expr"], mask=batch.get("expr_mask"))
    if not uses_sentences:
        return total(m, parts)

    # ---- gene side
    idx, val = batch["gene_idx"], batch["gene_val"].float()
    mask = m._check_genes(idx, val, batch["gene_mask"])
    if uses_image and val.shape[0] != pooled.shape[0]:
        msg = f"The batch has {pooled.shape[0]} images but {val.shape[0]} gene sentences."
        raise ValueError(msg)
    if m.training and cfg.sentence_dropout > 0:
        mask = sentence_dropout(mask, cfg.sentence_dropout)
    uses_pairs = weights["paat_swap"] > 0 or weights["paat_disc"] > 0
    if cfg.uses_contrastive or uses_pairs:
        enc = m.gene_encoder(idx, val, mask)
    if cfg.uses_contrastive:
        scale = m._logit_scale()
        img_c = F.normalize(m.image_proj(pooled), dim=-1)
        gene_c = F.normalize(m.gene_proj(enc.cls), dim=-1)
        base = info_nce(img_c, gene_c, scale)
        if weights["infonce"] > 0:
            parts["infonce"] = base
    if uses_pairs:
        swapped_val, changed = pair_swap(val, mask)
        swapped = m.gene_encoder(idx, swapped_val, mask)
        if weights["paat_swap"] > 0:
            swapped_c = F.normalize(m.gene_proj(swapped.cls), dim=-1)
            parts["paat_swap"] = info_nce_hard_negatives(img_c, gene_c, swapped_c, scale)
        if weights["paat_disc"] > 0:
            parts["paat_disc"] = discriminator_loss(m.pair_discriminator, enc.tokens, swapped.tokens, mask, changed)
    if weights["paat_adv"] > 0:

        def encode_perturbed(delta: Tensor) -> Tensor:
            out = m.gene_encoder(idx, val, mask, value_delta=delta)
            return F.normalize(m.gene_proj(out.cls), dim=-1)

        parts["paat_adv"] = adversarial_loss(
            encode=encode_perturbed,
            image_emb=img_c,
            value_emb=enc.value_emb,
            gene_mask=mask,
            base_loss=base,
            loss_fn=lambda a, b: info_nce(a, b, scale),
            epsilon=cfg.paat_epsilon,
            kind=cfg.paat_adv_kind,
            steps=cfg.paat_pgd_steps,
        )
    if weights["mvm"] > 0:
        parts["mvm"] = mvm_part(m, idx, val, batch["gene_mask"])
    return total(m, parts)


def total(m: CoMTIPNetwork, parts: dict[str, Tensor]) -> dict[str, Tensor]:
    weights = m.config.loss_weights()
    total = sum(weights[k] * v for k, v in parts.items())
    return {"loss": total, **parts}


def mfm_part(m: CoMTIPNetwork, feats: Tensor, full_tokens: Tensor) -> Tensor:
    batch = full_tokens.shape[0]
    hidden, visible_idx, hidden_idx = random_token_mask(
        batch, m.image.num_tokens, m.config.mask_ratio, device=full_tokens.device
    )
    with m.image.frozen_bn_statistics():
        visible, _ = m.image.forward_suffix(feats, token_mask=hidden)
    pred = m.mfm_generator(visible, visible_idx, hidden_idx)
    target = full_tokens.detach().gather(1, hidden_idx[..., None].expand(-1, -1, full_tokens.shape[-1]))
    return mfm_loss(pred, target, m.config.mfm_loss)


def prompt_part(
    m: CoMTIPNetwork, pooled: Tensor, expr: Tensor, kind: str = "two_hot", mask: Tensor | None = None
) -> Tensor:
    if expr.dim() != 2 or expr.shape != (pooled.shape[0], m.n_genes):
        msg = f"batch['expr'] must have shape (B, n_genes) = ({pooled.shape[0]}, {m.n_genes}), got {tuple(expr.shape)}."
        raise ValueError(msg)
    n = min(m.config.n_prompt_genes, m.n_genes)
    genes = torch.randperm(m.n_genes)[:n].to(pooled.device)
    levels = m.value_levels[genes]
    prompt = m._encode_prompts(genes, levels, m._gene_prompt_head())
    image = F.normalize(m._image_prompt_head()(pooled), dim=-1)
    values = expr[:, genes].to(levels.dtype)
    loss = readout_value_loss if kind == "mse" else prompt_loss
    if mask is None:  # every value measured (one table): the loss as it always was
        return loss(image, prompt, levels, values, m._read_scale(genes))
    return loss(image, prompt, levels, values, m._read_scale(genes), mask=mask[:, genes])


def mvm_part(m: CoMTIPNetwork, idx: Tensor, val: Tensor, mask: Tensor) -> Tensor:
    batch, length = idx.shape
    n = mask.sum(dim=1)
    n_hide = torch.where(n > 0, (n.float() * m.config.mvm_mask_ratio).round().long().clamp_min(1), 0)
    keys = torch.rand(batch, length, device=idx.device).masked_fill(~mask, 2.0)
    rank = keys.argsort(dim=1).argsort(dim=1)
    hidden = mask & (rank < n_hide[:, None])
    out = m.gene_encoder(idx, val, mask, value_mask=hidden)
    pred = m.mvm_head(out.tokens).squeeze(-1)
    if not bool(hidden.any()):
        return pred.sum() * 0.0
    return F.mse_loss(pred[hidden], val[hidden])


def readout_losses(m: CoMTIPNetwork, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """See :meth:`CoMTIPNetwork.readout_losses`."""
    if not m.config.uses_prompt:
        msg = "The read-out stage trains the prompt loss: it needs a model with prompt_weight > 0."
        raise ValueError(msg)
    check_batch(m, batch, ["pooled", "expr"])
    kind = m.config.readout_loss
    loss = prompt_part(m, batch["pooled"], batch["expr"], kind=kind, mask=batch.get("expr_mask"))
    return {"loss": loss, "readout" if kind == "mse" else "prompt": loss}


def masked_value_losses(m: CoMTIPNetwork, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """See :meth:`CoMTIPNetwork.masked_value_losses`."""
    if not hasattr(m, "mvm_head"):
        msg = "Masked value modeling needs a model built with mvm_weight > 0 (CoMTIPConfig(mvm_weight=1.0))."
        raise ValueError(msg)
    check_batch(m, batch, ["gene_idx", "gene_val", "gene_mask"])
    idx, val = batch["gene_idx"], batch["gene_val"].float()
    mask = m._check_genes(idx, val, batch["gene_mask"])
    mvm = mvm_part(m, idx, val, mask)
    return {"loss": mvm, "mvm": mvm}
