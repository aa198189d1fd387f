"""Gene-Text Encoder and sentence dropout.

Gene-name embeddings from frozen text embeddings, value embeddings, and a transformer over the unordered, padded gene
sentences of a batch.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from ._config import CoMTIPConfig

log = logging.getLogger(__name__)


class SoftBinValueEmbedding(nn.Module):
    """Soft binning of a log value over learned bins: Gaussian memberships to learned centres → mix of bin vectors.

    Parameters
    ----------
    n_bins
        Number of bins.
    dim
        Output dimension.
    value_max
        The initial centres span ``[0, value_max]``; centres and widths are learned.
    """

    def __init__(self, n_bins: int, dim: int, value_max: float) -> None:
        super().__init__()
        self.centres = nn.Parameter(torch.linspace(0.0, value_max, n_bins))
        spacing = value_max / max(n_bins - 1, 1)
        self.log_width = nn.Parameter(torch.full((n_bins,), math.log(spacing)))
        self.bins = nn.Parameter(torch.randn(n_bins, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, values: Tensor) -> Tensor:
        """Embed values (…) → (…, dim)."""
        z = (values[..., None] - self.centres) / self.log_width.exp()
        weights = torch.softmax(-0.5 * z.square(), dim=-1)
        return self.norm(weights @ self.bins)


class MLPValueEmbedding(nn.Module):
    """An MLP of the log value.

    Parameters
    ----------
    dim
        Output dimension.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(1, dim), nn.GELU(), nn.Linear(dim, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, values: Tensor) -> Tensor:
        """Embed values (…) → (…, dim)."""
        return self.norm(self.mlp(values[..., None]))


class GeneEncoderOutput(NamedTuple):
    """What :class:`GeneTextEncoder` returns."""

    cls: Tensor
    """(B, D) the CLS output, the sentence representation."""
    tokens: Tensor
    """(B, L, D) the token outputs."""
    value_emb: Tensor
    """(B, L, D) the value embeddings before any perturbation (the adversarial target)."""


class GeneTextEncoder(nn.Module):
    """The Gene-Text Encoder: token = gene-name embedding + value embedding; a transformer over the token set.

    There is no positional encoding (a sentence is a set); padded positions are masked, so all sentences of a
    batch run in parallel; a CLS token summarises the sentence.

    Parameters
    ----------
    config
        The model config (``gene_*``, ``value_*``, ``n_value_bins``, ``mvm_weight``).
    n_genes
        Panel size G.
    text_embeddings
        (G, T) frozen text embeddings of the genes' descriptions, kept as a buffer; ``None`` with
        ``gene_embedding="learned"``.
    """

    def __init__(self, config: CoMTIPConfig, n_genes: int, text_embeddings: Tensor | None) -> None:
        super().__init__()
        dim = config.gene_dim
        self.gene_embedding = config.gene_embedding
        if config.uses_text:
            if text_embeddings is None:
                msg = f"gene_embedding={config.gene_embedding!r} needs gene text embeddings (G, T)."
                raise ValueError(msg)
            self.register_buffer("text_emb", text_embeddings.detach().to(torch.float32).clone())
            self.text_proj = nn.Sequential(nn.Linear(text_embeddings.shape[1], dim), nn.LayerNorm(dim))
        if config.gene_embedding == "text+offset":
            self.gene_offset = nn.Parameter(torch.zeros(n_genes, dim))
        self.offset_dropout = float(config.gene_offset_dropout)
        if config.gene_embedding == "learned":
            self.gene_emb = nn.Parameter(torch.randn(n_genes, dim))
        if config.value_embedding == "soft_bins":
            self.value_embedding = SoftBinValueEmbedding(config.n_value_bins, dim, config.value_max)
        else:
            self.value_embedding = MLPValueEmbedding(dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim,
            config.gene_heads,
            dim_feedforward=4 * dim,
            dropout=config.gene_dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(
            layer, config.gene_layers, norm=nn.LayerNorm(dim), enable_nested_tensor=False
        )
        self.value_mask_emb = nn.Parameter(torch.randn(dim) * 0.02) if config.mvm_weight > 0 else None
        self._n_genes = n_genes

    @property
    def n_genes(self) -> int:
        """Number of genes the encoder knows."""
        return self._n_genes

    def gene_tokens(self, gene_idx: Tensor) -> Tensor:
        """Gene-name embeddings (…, D) of panel indices."""
        # F.embedding, not parameter[gene_idx]: its backward sums the rows of repeated genes in a fixed order, while
        # indexing's backward (index_put_ with accumulate) sums them in a thread-dependent order on the CPU, so that
        # two identical training runs drifted apart in the last bits (benchmarks/README: run to run)
        if self.gene_embedding == "learned":
            return F.embedding(gene_idx, self.gene_emb)
        emb = self.text_proj(self.text_emb[gene_idx])
        if self.gene_embedding == "text+offset":
            offset = F.embedding(gene_idx, self.gene_offset)
            if self.training and self.offset_dropout > 0:  # some genes by their text alone, as genes added later
                keep = torch.rand(self.gene_offset.shape[0], device=offset.device) >= self.offset_dropout
                offset = offset * keep[gene_idx].unsqueeze(-1).to(offset.dtype)
            emb = emb + offset
        return emb

    def forward(
        self,
        gene_idx: Tensor,
        gene_val: Tensor,
        gene_mask: Tensor,
        *,
        value_delta: Tensor | None = None,
        value_mask: Tensor | None = None,
    ) -> GeneEncoderOutput:
        """Encode a batch of gene sentences.

        Parameters
        ----------
        gene_idx
            (B, L) int64 panel indices.
        gene_val
            (B, L) log-normalised values.
        gene_mask
            (B, L) bool, True for real tokens.
        value_delta
            (B, L, D) perturbation added to the value embeddings (PAAT's adversarial part).
        value_mask
            (B, L) bool: these tokens' value embeddings are replaced by a learned mask vector (masked value
            modeling).
        """
        values = self.value_embedding(gene_val.to(self.cls_token.dtype))
        v = values
        if value_mask is not None:
            if self.value_mask_emb is None:
                msg = "Masked value modeling needs a model built with mvm_weight > 0."
                raise ValueError(msg)
            v = torch.where(value_mask[..., None], self.value_mask_emb.to(v.dtype), v)
        if value_delta is not None:
            v = v + value_delta
        x = self.gene_tokens(gene_idx) + v
        batch = x.shape[0]
        x = torch.cat([self.cls_token.expand(batch, -1, -1), x], dim=1)
        padding = torch.cat([torch.zeros(batch, 1, dtype=torch.bool, device=x.device), ~gene_mask], dim=1)
        out = self.encoder(x, src_key_padding_mask=padding)
        return GeneEncoderOutput(out[:, 0], out[:, 1:], values)

    @torch.no_grad()
    def add_genes(self, text_embeddings: Tensor | None, n_new: int) -> None:
        """Append genes: their text embeddings (frozen) and zero learned offsets."""
        if self.gene_embedding == "learned":
            msg = (
                "gene_embedding='learned' has one free vector per training gene: genes cannot be added after "
                "training. Use gene_embedding='text' or 'text+offset' to prompt genes from their description."
            )
            raise ValueError(msg)
        new = text_embeddings.to(self.text_emb.device, self.text_emb.dtype)
        self.text_emb = torch.cat([self.text_emb, new], dim=0)
        if self.gene_embedding == "text+offset":
            old = self.gene_offset
            offset = torch.cat([old.detach(), old.new_zeros(n_new, old.shape[1])], dim=0)
            self.gene_offset = nn.Parameter(offset, requires_grad=old.requires_grad)
        self._n_genes += n_new


def sentence_dropout(gene_mask: Tensor, p: float) -> Tensor:
    """With probability ``p`` per sentence, keep only a random sub-sentence of 1..n of its n tokens.

    Parameters
    ----------
    gene_mask
        (B, L) bool, True for real tokens.
    p
        Probability that a sentence is cut.

    Returns
    -------
    The new mask (B, L); sentences with a single token are left as they are.
    """
    if p <= 0:
        return gene_mask
    batch, length = gene_mask.shape
    device = gene_mask.device
    n = gene_mask.sum(dim=1)
    cut = (torch.rand(batch, device=device) < p) & (n > 1)
    keep_n = (torch.rand(batch, device=device) * n).floor().long() + 1  # uniform in 1..n
    keys = torch.rand(batch, length, device=device).masked_fill(~gene_mask, 2.0)
    rank = keys.argsort(dim=1).argsort(dim=1)
    keep = gene_mask & (rank < keep_n[:, None])
    return torch.where(cut[:, None], keep, gene_mask)
