"""The CoMTIP module: towers, losses and the zero-shot prediction primitives.

Image tower + MFM, Gene-Text Encoder + PAAT, InfoNCE, the value-level prompt loss, prompt embeddings and read-out.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from os import PathLike
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._config import CoMTIPConfig
from ._gene import GeneTextEncoder, sentence_dropout
from ._image import ImageTower, MaskFeatureGenerator, dihedral_transforms, random_token_mask
from ._losses import (
    ProjectionHead,
    info_nce,
    info_nce_hard_negatives,
    mfm_loss,
    prompt_logits,
    prompt_loss,
    readout_prediction,
    readout_value_loss,
)
from ._paat import PairDiscriminator, adversarial_loss, discriminator_loss, pair_swap

log = logging.getLogger(__name__)


def _as_tensor(x: Any, name: str, *, ndim: int) -> Tensor:
    if isinstance(x, Tensor):
        t = x.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(x, dtype=np.float32))
        except (TypeError, ValueError) as e:
            msg = f"{name} must be a tensor or array, got {type(x).__name__}."
            raise ValueError(msg) from e
    if t.dim() != ndim:
        msg = f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}."
        raise ValueError(msg)
    t = t.to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        msg = f"{name} holds NaN or infinite values."
        raise ValueError(msg)
    return t.cpu()


def _check_levels(levels: Tensor, n_genes: int, k: int, name: str = "value_levels") -> None:
    if levels.shape != (n_genes, k):
        msg = f"{name} must have shape (n_genes={n_genes}, n_value_levels={k}), got {tuple(levels.shape)}."
        raise ValueError(msg)
    if bool((levels.diff(dim=1) < 0).any()):
        row = int((levels.diff(dim=1) < 0).any(dim=1).nonzero()[0])
        msg = (
            f"{name} must be non-decreasing along the K levels of each gene; row {row} is not: {levels[row].tolist()}."
        )
        raise ValueError(msg)


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


class CoMTIP(nn.Module):
    """CoMTIP: contrastive masked text-image pretraining for spatial transcriptomics.

    One embedding space for H&E tiles (a timm image tower trained with Masked Feature Modeling) and gene
    sentences (a Gene-Text Encoder over gene-name and value embeddings, with Pair-aware Adversarial Training),
    aligned by InfoNCE, plus a value-level prompt loss that trains the zero-shot read-out of expression from
    single-gene prompts.

    Parameters
    ----------
    config
        The configuration; ``None`` uses :meth:`CoMTIPConfig.cpu`.
    genes
        The gene panel (unique names); sentence tokens index into it.
    gene_text_embeddings
        (G, T) frozen text embeddings of the genes' descriptions (stored in the model);
        ``None`` only with ``gene_embedding="learned"``.
    value_levels
        (G, K) the K prompt levels of each gene (level 0 = 0, then quantiles of the gene's positive training
        values), non-decreasing.
    load_pretrained
        Load the tower's initial weights (``config.image_pretrained``); :meth:`load` passes ``False``.

    Examples
    --------
    >>> import torch, comtip as ct
    >>> genes = ["ERBB2", "KRT19", "CD74"]
    >>> levels = torch.tensor([[0.0, 1.0, 2.0, 3.0]] * 3)
    >>> model = ct.CoMTIP(ct.CoMTIPConfig.tiny(), genes, torch.randn(3, 8), levels)
    >>> model.encode_image(torch.rand(2, 3, 64, 64)).shape
    torch.Size([2, 16])
    """

    def __init__(
        self,
        config: CoMTIPConfig | None,
        genes: Sequence[str],
        gene_text_embeddings: Tensor | np.ndarray | None,
        value_levels: Tensor | np.ndarray,
        *,
        load_pretrained: bool = True,
    ) -> None:
        super().__init__()
        config = CoMTIPConfig() if config is None else config
        if not isinstance(config, CoMTIPConfig):
            msg = f"config must be a CoMTIPConfig, not {type(config).__name__}."
            raise TypeError(msg)
        config.validate()
        genes = [str(g) for g in genes]
        if not genes:
            msg = "The gene panel `genes` is empty: pass the names of the panel genes."
            raise ValueError(msg)
        duplicated = sorted(g for g, n in Counter(genes).items() if n > 1)
        if duplicated:
            msg = f"The gene panel has duplicated names {duplicated[:5]}; make gene names unique."
            raise ValueError(msg)
        if value_levels is None:
            msg = "value_levels (G, K) is required: the prompt levels of each panel gene (see comtip.pp)."
            raise ValueError(msg)
        levels = _as_tensor(value_levels, "value_levels", ndim=2)
        _check_levels(levels, len(genes), config.n_value_levels)
        text = None
        if config.uses_text:
            if gene_text_embeddings is None:
                msg = (
                    f"gene_embedding={config.gene_embedding!r} needs gene_text_embeddings (G, T); pass them or use "
                    "gene_embedding='learned'."
                )
                raise ValueError(msg)
            text = _as_tensor(gene_text_embeddings, "gene_text_embeddings", ndim=2)
            if text.shape[0] != len(genes):
                msg = f"gene_text_embeddings has {text.shape[0]} rows for {len(genes)} genes."
                raise ValueError(msg)
            if config.text_dim is None:
                config = config.replace(text_dim=int(text.shape[1]))
            elif config.text_dim != text.shape[1]:
                msg = f"gene_text_embeddings has dimension {text.shape[1]} but config.text_dim={config.text_dim}."
                raise ValueError(msg)
        elif gene_text_embeddings is not None:
            log.warning("gene_embedding='learned': the gene text embeddings are not used and not stored")

        self.config = config
        self.genes: list[str] = genes
        self.name = f"comtip_{config.image_encoder}"
        self.training_summary: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        #: training spots' image embeddings (n, d) and panel expression (n, G) for reference-based prediction;
        #: filled by ``ct.tl.pretrain``, saved as ``reference.safetensors``
        self.reference: dict[str, Tensor] | None = None
        self._state_counter = 0
        self._prompt_cache: tuple[tuple, Tensor] | None = None
        self.register_buffer("value_levels", levels)

        # image tower + heads
        self.image = ImageTower(config, pretrained=load_pretrained)
        feat = self.image.num_features
        d = config.embed_dim
        self.image_proj = ProjectionHead(feat, d, config.projection, config.projection_dropout)
        self.gene_encoder = GeneTextEncoder(config, len(genes), text)
        if config.separate_prompt_encoder:
            self.prompt_gene_encoder = GeneTextEncoder(config, len(genes), text)
        self.gene_proj = ProjectionHead(config.gene_dim, d, config.projection, config.projection_dropout)
        if config.has_separate_prompt_heads:
            self.image_prompt_proj = ProjectionHead(feat, d, config.projection, config.projection_dropout)
            self.gene_prompt_proj = ProjectionHead(config.gene_dim, d, config.projection, config.projection_dropout)

        # temperatures: parameters when an objective trains them, buffers otherwise
        logit_scale = torch.tensor(math.log(1.0 / config.temperature_init))
        if config.uses_contrastive:
            self.logit_scale = nn.Parameter(logit_scale)
        else:
            self.register_buffer("logit_scale", logit_scale)
        log_tau = torch.tensor(math.log(config.prompt_temperature_init))
        if config.uses_prompt:
            self.log_tau_read = nn.Parameter(log_tau)
            if config.prompt_per_gene_temperature:
                self.log_tau_gene = nn.Parameter(torch.zeros(len(genes)))
        else:
            self.register_buffer("log_tau_read", log_tau)

        # loss-specific modules, built only when their weight is > 0
        if config.mfm_weight > 0:
            if self.image.trainable_blocks == 0:
                log.warning("mfm_weight > 0 with a frozen image tower: MFM only trains its own generator")
            self.mfm_generator = MaskFeatureGenerator(
                feat, self.image.grid, config.mfm_dim, config.mfm_depth, config.mfm_heads
            )
        if config.paat_disc_weight > 0:
            self.pair_discriminator = PairDiscriminator(config.gene_dim)
        if config.depth_weight > 0:
            self.depth_head = DepthHead(feat)
        if config.mvm_weight > 0:
            dim = config.gene_dim
            self.mvm_head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 1))

    # ================================================================== properties
    @property
    def n_genes(self) -> int:
        """Number of genes in the panel (including genes added with :meth:`add_genes`)."""
        return len(self.genes)

    @property
    def n_value_levels(self) -> int:
        """Number K of prompt levels per gene."""
        return int(self.value_levels.shape[1])

    @property
    def embed_dim(self) -> int:
        """Dimension of the embedding space."""
        return self.config.embed_dim

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return self.value_levels.device

    @property
    def temperature(self) -> float:
        """Current InfoNCE temperature."""
        return float(1.0 / self._logit_scale())

    @property
    def read_out_temperature(self) -> float:
        """Current global read-out temperature τ_read (before per-gene factors)."""
        return float(self.log_tau_read.detach().exp())

    @property
    def is_trained(self) -> bool:
        """Whether a trainer recorded any training in :attr:`training_summary`."""
        return bool(self.training_summary.get("steps") or self.training_summary.get("epochs"))

    def _logit_scale(self) -> Tensor:
        return self.logit_scale.exp().clamp(max=self.config.max_logit_scale)

    def _read_scale(self, gene_ids: Tensor | None) -> Tensor:
        """Inverse read-out temperatures: scalar, or (n,) with per-gene factors."""
        log_tau = self.log_tau_read
        per_gene = getattr(self, "log_tau_gene", None)
        if per_gene is not None:
            ids = torch.arange(self.n_genes, device=log_tau.device) if gene_ids is None else gene_ids
            log_tau = log_tau + per_gene[ids]
        return (-log_tau).exp().clamp(max=self.config.max_logit_scale)

    def _image_prompt_head(self) -> ProjectionHead:
        return getattr(self, "image_prompt_proj", self.image_proj)

    def _gene_prompt_head(self) -> ProjectionHead:
        return getattr(self, "gene_prompt_proj", self.gene_proj)

    def _prompt_encoder(self) -> GeneTextEncoder:
        return getattr(self, "prompt_gene_encoder", self.gene_encoder)

    def split_prompt_encoder(self) -> None:
        """Give the prompts their own copy of the gene encoder (``config.separate_prompt_encoder``), from now on.

        Called by ``ct.tl.pretrain`` before its read-out stage: that stage then trains the copy, and the gene-sentence
        embeddings (retrieval, :func:`comtip.tl.embed`) stay those of the contrastive stage.
        """
        if hasattr(self, "prompt_gene_encoder"):
            return
        import copy
        import dataclasses

        self.prompt_gene_encoder = copy.deepcopy(self.gene_encoder)
        self.config = dataclasses.replace(self.config, separate_prompt_encoder=True)
        self._state_counter += 1
        self._prompt_cache = None

    # ================================================================== state / cache
    def train(self, mode: bool = True) -> CoMTIP:
        """Set training mode (invalidates the prompt-embedding cache)."""
        self._state_counter += 1
        return super().train(mode)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load weights (invalidates the prompt-embedding cache); see :meth:`torch.nn.Module.load_state_dict`."""
        self._state_counter += 1
        self._prompt_cache = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _cache_key(self) -> tuple:
        tensors = [
            *self._prompt_encoder().parameters(),
            *self._prompt_encoder().buffers(),
            *self._gene_prompt_head().parameters(),
            self.value_levels,
        ]
        version = sum(t._version for t in tensors)
        ref = self.value_levels
        return (self._state_counter, version, self.n_genes, ref.device, self._prompt_encoder().cls_token.dtype)

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        """Eval behaviour (no dropout, BatchNorm running statistics) without touching the cache counter."""
        saved = [(m, m.training) for m in self.modules()]
        nn.Module.train(self, False)
        try:
            yield
        finally:
            for m, flag in saved:
                m.training = flag

    # ================================================================== checks
    def _check_genes(self, gene_idx: Tensor, gene_val: Tensor, gene_mask: Tensor | None) -> Tensor:
        if gene_idx.dim() != 2 or gene_val.shape != gene_idx.shape:
            msg = f"gene_idx and gene_val must both have shape (B, L); got {tuple(gene_idx.shape)} and {tuple(gene_val.shape)}."
            raise ValueError(msg)
        if gene_idx.dtype not in (torch.int64, torch.int32):
            msg = f"gene_idx must hold integer panel indices, got dtype {gene_idx.dtype}."
            raise ValueError(msg)
        if gene_mask is None:
            gene_mask = torch.ones_like(gene_idx, dtype=torch.bool)
        elif gene_mask.shape != gene_idx.shape or gene_mask.dtype != torch.bool:
            msg = f"gene_mask must be a bool tensor of shape {tuple(gene_idx.shape)}, got {gene_mask.dtype} {tuple(gene_mask.shape)}."
            raise ValueError(msg)
        if gene_idx.numel() and (int(gene_idx.min()) < 0 or int(gene_idx.max()) >= self.n_genes):
            msg = f"gene_idx holds indices outside the panel [0, {self.n_genes}); padded positions must hold 0."
            raise ValueError(msg)
        return gene_mask

    def gene_index(self, names: Sequence[str] | str) -> Tensor:
        """Panel indices of gene names.

        Parameters
        ----------
        names
            Gene names (or one name).

        Returns
        -------
        int64 tensor of indices.
        """
        if isinstance(names, str):
            names = [names]
        lookup = {g: i for i, g in enumerate(self.genes)}
        missing = [n for n in names if n not in lookup]
        if missing:
            msg = (
                f"Genes not in the model's panel: {missing[:8]}{' …' if len(missing) > 8 else ''}. "
                "Add them with model.add_genes(names, text_embeddings, value_levels)."
            )
            raise KeyError(msg)
        return torch.tensor([lookup[n] for n in names], dtype=torch.long, device=self.device)

    # ================================================================== encoders
    def image_features(self, images: Tensor) -> Tensor:
        """Pooled tower features (B, C) of RGB images in [0, 1] (before any projection)."""
        return self.image(images)[1]

    def _encode_image_with(self, head: ProjectionHead, images: Tensor, dihedral: bool) -> Tensor:
        if not dihedral:
            return F.normalize(head(self.image(images)[1]), dim=-1)
        total = sum(F.normalize(head(self.image(v)[1]), dim=-1) for v in dihedral_transforms(images))
        return F.normalize(total, dim=-1)

    def encode_image(self, images: Tensor, *, dihedral: bool = False) -> Tensor:
        """L2-normalised image embeddings (B, d) in the contrastive space.

        Parameters
        ----------
        images
            (B, 3, H, W) RGB in [0, 1] (or uint8); resized to ``config.image_size`` when needed.
        dihedral
            Average the embeddings of the 8 flips/rotations (then re-normalise).
        """
        return self._encode_image_with(self.image_proj, images, dihedral)

    def encode_image_prompt(self, images: Tensor, *, dihedral: bool = False) -> Tensor:
        """L2-normalised image embeddings (B, d) in the prompt space (the zero-shot read-out's space).

        Identical to :meth:`encode_image` when the two objectives share their heads.

        Parameters
        ----------
        images
            (B, 3, H, W) RGB in [0, 1].
        dihedral
            Average over the 8 flips/rotations.
        """
        return self._encode_image_with(self._image_prompt_head(), images, dihedral)

    def encode_genes(self, gene_idx: Tensor, gene_val: Tensor, gene_mask: Tensor | None = None) -> Tensor:
        """L2-normalised gene-sentence embeddings (B, d) in the contrastive space.

        Parameters
        ----------
        gene_idx
            (B, L) int64 panel indices (0 at padded positions).
        gene_val
            (B, L) log-normalised values.
        gene_mask
            (B, L) bool, True for real tokens; ``None`` = all real.
        """
        gene_mask = self._check_genes(gene_idx, gene_val, gene_mask)
        return F.normalize(self.gene_proj(self.gene_encoder(gene_idx, gene_val, gene_mask).cls), dim=-1)

    def encode_genes_prompt(self, gene_idx: Tensor, gene_val: Tensor, gene_mask: Tensor | None = None) -> Tensor:
        """L2-normalised gene-sentence embeddings (B, d) in the prompt space; see :meth:`encode_genes`."""
        gene_mask = self._check_genes(gene_idx, gene_val, gene_mask)
        out = self._prompt_encoder()(gene_idx, gene_val, gene_mask)
        return F.normalize(self._gene_prompt_head()(out.cls), dim=-1)

    def predict_depth(self, images: Tensor) -> Tensor:
        """Predicted log1p depth (B,) of the spots in ``images``; needs ``depth_weight > 0``."""
        if not hasattr(self, "depth_head"):
            msg = "This model has no depth head (depth_weight=0 in its config)."
            raise ValueError(msg)
        return self.depth_head(self.image(images)[1])

    # ================================================================== training
    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Same as :meth:`training_losses`."""
        return self.training_losses(batch)

    def _check_batch(self, batch: Mapping[str, Tensor], keys: Sequence[str]) -> None:
        missing = [k for k in keys if k not in batch]
        if missing:
            msg = f"The batch lacks {missing} (it has {sorted(batch)}); see the batch contract in comtip.data."
            raise ValueError(msg)

    def training_losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """All training losses of a batch.

        Parameters
        ----------
        batch
            ``"image"`` (B, 3, H, W) RGB in [0, 1] — or ``"image_prefix"``, the cached output of
            ``model.image.forward_prefix`` —, ``"gene_idx"`` (B, L) int64, ``"gene_val"`` (B, L), ``"gene_mask"``
            (B, L) bool, ``"expr"`` (B, G) for the prompt loss, ``"depth"`` (B,) for the depth head.

        Returns
        -------
        ``"loss"``, the weighted total, and the unweighted parts whose weight is > 0 among ``"infonce"``,
        ``"prompt"``, ``"mfm"``, ``"paat_swap"``, ``"paat_disc"``, ``"paat_adv"``, ``"depth"``, ``"mvm"``.
        """
        cfg = self.config
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
        self._check_batch(batch, need)
        parts: dict[str, Tensor] = {}

        # ---- image side (skipped when no active part looks at images)
        if uses_image:
            feats = batch["image_prefix"] if "image_prefix" in batch else self.image.forward_prefix(batch["image"])
            tokens, pooled = self.image.forward_suffix(feats)
            if weights["mfm"] > 0:
                parts["mfm"] = self._mfm_loss(feats, tokens)
            if weights["depth"] > 0:
                parts["depth"] = self.depth_head.loss(pooled, batch["depth"])
            if weights["prompt"] > 0:
                parts["prompt"] = self._prompt_loss(pooled, batch["expr"], mask=batch.get("expr_mask"))
        if not uses_sentences:
            return self._total(parts)

        # ---- gene side
        idx, val = batch["gene_idx"], batch["gene_val"].float()
        mask = self._check_genes(idx, val, batch["gene_mask"])
        if uses_image and val.shape[0] != pooled.shape[0]:
            msg = f"The batch has {pooled.shape[0]} images but {val.shape[0]} gene sentences."
            raise ValueError(msg)
        if self.training and cfg.sentence_dropout > 0:
            mask = sentence_dropout(mask, cfg.sentence_dropout)
        uses_pairs = weights["paat_swap"] > 0 or weights["paat_disc"] > 0
        if cfg.uses_contrastive or uses_pairs:
            enc = self.gene_encoder(idx, val, mask)
        if cfg.uses_contrastive:
            scale = self._logit_scale()
            img_c = F.normalize(self.image_proj(pooled), dim=-1)
            gene_c = F.normalize(self.gene_proj(enc.cls), dim=-1)
            base = info_nce(img_c, gene_c, scale)
            if weights["infonce"] > 0:
                parts["infonce"] = base
        if uses_pairs:
            swapped_val, changed = pair_swap(val, mask)
            swapped = self.gene_encoder(idx, swapped_val, mask)
            if weights["paat_swap"] > 0:
                swapped_c = F.normalize(self.gene_proj(swapped.cls), dim=-1)
                parts["paat_swap"] = info_nce_hard_negatives(img_c, gene_c, swapped_c, scale)
            if weights["paat_disc"] > 0:
                parts["paat_disc"] = discriminator_loss(
                    self.pair_discriminator, enc.tokens, swapped.tokens, mask, changed
                )
        if weights["paat_adv"] > 0:

            def encode_perturbed(delta: Tensor) -> Tensor:
                out = self.gene_encoder(idx, val, mask, value_delta=delta)
                return F.normalize(self.gene_proj(out.cls), dim=-1)

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
            parts["mvm"] = self._mvm_loss(idx, val, batch["gene_mask"])
        return self._total(parts)

    def _total(self, parts: dict[str, Tensor]) -> dict[str, Tensor]:
        weights = self.config.loss_weights()
        total = sum(weights[k] * v for k, v in parts.items())
        return {"loss": total, **parts}

    def _mfm_loss(self, feats: Tensor, full_tokens: Tensor) -> Tensor:
        batch = full_tokens.shape[0]
        hidden, visible_idx, hidden_idx = random_token_mask(
            batch, self.image.num_tokens, self.config.mask_ratio, device=full_tokens.device
        )
        with self.image.frozen_bn_statistics():
            visible, _ = self.image.forward_suffix(feats, token_mask=hidden)
        pred = self.mfm_generator(visible, visible_idx, hidden_idx)
        target = full_tokens.detach().gather(1, hidden_idx[..., None].expand(-1, -1, full_tokens.shape[-1]))
        return mfm_loss(pred, target, self.config.mfm_loss)

    def _prompt_loss(self, pooled: Tensor, expr: Tensor, kind: str = "two_hot", mask: Tensor | None = None) -> Tensor:
        if expr.dim() != 2 or expr.shape != (pooled.shape[0], self.n_genes):
            msg = f"batch['expr'] must have shape (B, n_genes) = ({pooled.shape[0]}, {self.n_genes}), got {tuple(expr.shape)}."
            raise ValueError(msg)
        n = min(self.config.n_prompt_genes, self.n_genes)
        genes = torch.randperm(self.n_genes)[:n].to(pooled.device)
        levels = self.value_levels[genes]
        prompt = self._encode_prompts(genes, levels, self._gene_prompt_head())
        image = F.normalize(self._image_prompt_head()(pooled), dim=-1)
        values = expr[:, genes].to(levels.dtype)
        loss = readout_value_loss if kind == "mse" else prompt_loss
        if mask is None:  # every value measured (one table): the loss as it always was
            return loss(image, prompt, levels, values, self._read_scale(genes))
        return loss(image, prompt, levels, values, self._read_scale(genes), mask=mask[:, genes])

    def _encode_prompts(self, genes: Tensor, levels: Tensor, head: ProjectionHead) -> Tensor:
        """Embeddings (n, K, d) of the single-gene prompts (g, v_k)."""
        n, k = levels.shape
        idx = genes.repeat_interleave(k)[:, None]
        val = levels.reshape(-1, 1)
        mask = torch.ones_like(idx, dtype=torch.bool)
        out = self._prompt_encoder()(idx, val, mask)
        return F.normalize(head(out.cls), dim=-1).view(n, k, -1)

    def _mvm_loss(self, idx: Tensor, val: Tensor, mask: Tensor) -> Tensor:
        batch, length = idx.shape
        n = mask.sum(dim=1)
        n_hide = torch.where(n > 0, (n.float() * self.config.mvm_mask_ratio).round().long().clamp_min(1), 0)
        keys = torch.rand(batch, length, device=idx.device).masked_fill(~mask, 2.0)
        rank = keys.argsort(dim=1).argsort(dim=1)
        hidden = mask & (rank < n_hide[:, None])
        out = self.gene_encoder(idx, val, mask, value_mask=hidden)
        pred = self.mvm_head(out.tokens).squeeze(-1)
        if not bool(hidden.any()):
            return pred.sum() * 0.0
        return F.mse_loss(pred[hidden], val[hidden])

    def readout_losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The read-out loss alone, on pooled image features: the read-out stage of training.

        With the image tower fixed, its pooled features can be computed once (per tile and dihedral transform);
        this trains the zero-shot read-out — gene encoder, prompt heads and read-out temperatures — on them, with
        ``config.readout_loss``: the squared error of the read-out's predicted values (``"mse"``,
        :func:`~comtip.model._losses.readout_value_loss`) or the prompt loss's cross-entropy (``"two_hot"``).

        Parameters
        ----------
        batch
            ``"pooled"`` (B, C) pooled tower features (:meth:`image_features`) and ``"expr"`` (B, G).

        Returns
        -------
        ``{"loss": x, "readout": x}`` for ``"mse"``, ``{"loss": x, "prompt": x}`` for ``"two_hot"`` (the same
        loss as the contrastive stage's ``"prompt"`` part).
        """
        if not self.config.uses_prompt:
            msg = "The read-out stage trains the prompt loss: it needs a model with prompt_weight > 0."
            raise ValueError(msg)
        self._check_batch(batch, ["pooled", "expr"])
        kind = self.config.readout_loss
        loss = self._prompt_loss(batch["pooled"], batch["expr"], kind=kind, mask=batch.get("expr_mask"))
        return {"loss": loss, "readout" if kind == "mse" else "prompt": loss}

    def masked_value_losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Masked value modeling for gene-side pretraining (count-only spots, no image).

        A fraction ``mvm_mask_ratio`` of each sentence's tokens (at least one) has its value embedding replaced by
        a learned mask vector; a head predicts the hidden values from the encoder's token outputs (MSE).

        Parameters
        ----------
        batch
            ``"gene_idx"``, ``"gene_val"``, ``"gene_mask"`` (B, L).

        Returns
        -------
        ``{"loss": mvm, "mvm": mvm}`` (the weight ``mvm_weight`` only scales the part inside
        :meth:`training_losses`).
        """
        if not hasattr(self, "mvm_head"):
            msg = "Masked value modeling needs a model built with mvm_weight > 0 (CoMTIPConfig(mvm_weight=1.0))."
            raise ValueError(msg)
        self._check_batch(batch, ["gene_idx", "gene_val", "gene_mask"])
        idx, val = batch["gene_idx"], batch["gene_val"].float()
        mask = self._check_genes(idx, val, batch["gene_mask"])
        mvm = self._mvm_loss(idx, val, mask)
        return {"loss": mvm, "mvm": mvm}

    # ================================================================== zero-shot prediction
    def prompt_embeddings(
        self, gene_ids: Tensor | Sequence[int] | None = None, levels: Tensor | None = None, *, batch_size: int = 4096
    ) -> Tensor:
        """Embeddings (G, K, d) of the single-gene prompts (g, v_k) in the prompt space, for zero-shot prediction.

        Computed in eval mode without gradients. The result for the panel's own levels is cached and reused until
        the weights change (training mode switches, ``load_state_dict``, in-place updates such as optimizer
        steps, :meth:`add_genes`); treat it as read-only.

        Parameters
        ----------
        gene_ids
            Panel indices (see :meth:`gene_index`); ``None`` = the whole panel.
        levels
            (G, K') custom levels; ``None`` = the model's :attr:`value_levels`.
        batch_size
            Prompts encoded at once.
        """
        ids = None if gene_ids is None else torch.as_tensor(gene_ids, dtype=torch.long, device=self.device).reshape(-1)
        if ids is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.n_genes):
            msg = f"gene_ids must lie in [0, {self.n_genes}); use model.gene_index(names)."
            raise ValueError(msg)
        if levels is None:
            key = self._cache_key()
            if self._prompt_cache is not None and self._prompt_cache[0] == key:
                full = self._prompt_cache[1]
                return full if ids is None else full[ids]
            if ids is None:
                full = self._compute_prompts(
                    torch.arange(self.n_genes, device=self.device), self.value_levels, batch_size
                )
                self._prompt_cache = (key, full)
                return full
            return self._compute_prompts(ids, self.value_levels[ids], batch_size)
        n = self.n_genes if ids is None else ids.numel()
        levels = torch.as_tensor(levels, dtype=torch.float32, device=self.device)
        if levels.dim() != 2 or levels.shape[0] != n:
            msg = f"levels must have shape ({n}, K), got {tuple(levels.shape)}."
            raise ValueError(msg)
        ids = torch.arange(self.n_genes, device=self.device) if ids is None else ids
        return self._compute_prompts(ids, levels, batch_size)

    def _compute_prompts(self, ids: Tensor, levels: Tensor, batch_size: int) -> Tensor:
        k = levels.shape[1]
        per = max(1, batch_size // k)
        head = self._gene_prompt_head()
        out = []
        with torch.no_grad(), self._eval_mode():
            for start in range(0, ids.numel(), per):
                sl = slice(start, start + per)
                out.append(self._encode_prompts(ids[sl], levels[sl].to(self._prompt_encoder().cls_token.dtype), head))
        if not out:
            return torch.zeros(0, k, self.embed_dim, device=self.device)
        return torch.cat(out, dim=0)

    def predict_from_image_embeddings(
        self,
        image_embeddings: Tensor,
        prompt_embeddings: Tensor,
        levels: Tensor,
        *,
        gene_ids: Tensor | Sequence[int] | None = None,
        max_elements: int = 2**25,
    ) -> Tensor:
        """Zero-shot expression (N, G): the softmax(cos / τ_read)-weighted mean of each gene's levels.

        Parameters
        ----------
        image_embeddings
            (N, d) from :meth:`encode_image_prompt`.
        prompt_embeddings
            (G, K, d) from :meth:`prompt_embeddings`.
        levels
            (G, K) the levels of those prompts.
        gene_ids
            Panel indices of the G genes, for per-gene read-out temperatures; ``None`` = the whole panel in order
            (needed only when the model learned per-gene temperatures).
        max_elements
            Bound on the N × G × K logits held at once (rows are processed in chunks).
        """
        g, k, d = prompt_embeddings.shape
        if levels.shape != (g, k):
            msg = f"levels must have shape {(g, k)} to match prompt_embeddings, got {tuple(levels.shape)}."
            raise ValueError(msg)
        if image_embeddings.dim() != 2 or image_embeddings.shape[1] != d:
            msg = f"image_embeddings must have shape (N, {d}), got {tuple(image_embeddings.shape)}."
            raise ValueError(msg)
        ids = None if gene_ids is None else torch.as_tensor(gene_ids, dtype=torch.long, device=levels.device)
        if getattr(self, "log_tau_gene", None) is not None and ids is None and g != self.n_genes:
            msg = f"{g} prompt genes for a panel of {self.n_genes}: pass gene_ids= so per-gene temperatures apply."
            raise ValueError(msg)
        scale = self._read_scale(ids).to(prompt_embeddings.device, prompt_embeddings.dtype)
        levels = levels.to(prompt_embeddings.dtype)
        n = image_embeddings.shape[0]
        out = torch.empty(n, g, dtype=prompt_embeddings.dtype, device=prompt_embeddings.device)
        chunk = max(1, max_elements // max(g * k, 1))
        for start in range(0, n, chunk):
            x = image_embeddings[start : start + chunk].to(prompt_embeddings.dtype)
            out[start : start + chunk] = readout_prediction(x, prompt_embeddings, levels, scale)
        return out

    def predict_from_images(
        self, images: Tensor, gene_ids: Tensor | Sequence[int] | None = None, *, dihedral: bool = False
    ) -> Tensor:
        """Zero-shot expression (B, G) of images, in eval mode without gradients.

        Parameters
        ----------
        images
            (B, 3, H, W) RGB in [0, 1].
        gene_ids
            Panel indices; ``None`` = the whole panel.
        dihedral
            Average the image embedding over the 8 flips/rotations.
        """
        with torch.no_grad(), self._eval_mode():
            emb = self.encode_image_prompt(images, dihedral=dihedral)
        prompts = self.prompt_embeddings(gene_ids)
        ids = None if gene_ids is None else torch.as_tensor(gene_ids, dtype=torch.long, device=self.device)
        levels = self.value_levels if ids is None else self.value_levels[ids]
        with torch.no_grad():
            return self.predict_from_image_embeddings(emb, prompts, levels, gene_ids=ids)

    def prompt_logits(self, image_embeddings: Tensor, gene_ids: Tensor) -> Tensor:
        """Read-out logits (N, n, K) of images against the prompts of ``gene_ids`` (for diagnostics)."""
        return prompt_logits(image_embeddings, self.prompt_embeddings(gene_ids), self._read_scale(gene_ids))

    dihedral_transforms = staticmethod(dihedral_transforms)

    # ================================================================== genes outside the panel
    @torch.no_grad()
    def add_genes(
        self,
        names: Sequence[str],
        text_embeddings: Tensor | np.ndarray | None,
        value_levels: Tensor | np.ndarray,
    ) -> None:
        """Append genes to the panel so that they can be prompted from their description alone.

        Their learned per-gene offsets and read-out temperature factors start at zero. Call this before building
        an optimizer (parameters are replaced).

        Parameters
        ----------
        names
            New gene names (not in the panel).
        text_embeddings
            (n, T) text embeddings of their descriptions, from the same text model as the panel's.
        value_levels
            (n, K) their prompt levels.
        """
        names = [str(n) for n in names]
        if not names:
            return
        if self.config.gene_embedding == "learned":
            msg = (
                "This model uses gene_embedding='learned' (one free vector per training gene): genes outside the "
                "panel cannot be added. Train with gene_embedding='text' or 'text+offset' to prompt new genes."
            )
            raise ValueError(msg)
        known = set(self.genes)
        clash = [n for n in names if n in known]
        if clash or len(set(names)) != len(names):
            msg = f"add_genes: names already in the panel or repeated: {clash[:8] or names}."
            raise ValueError(msg)
        if text_embeddings is None:
            msg = "add_genes needs the text embeddings (n, T) of the new genes' descriptions."
            raise ValueError(msg)
        text = _as_tensor(text_embeddings, "text_embeddings", ndim=2)
        levels = _as_tensor(value_levels, "value_levels", ndim=2)
        if text.shape != (len(names), self.config.text_dim):
            msg = f"text_embeddings must have shape ({len(names)}, text_dim={self.config.text_dim}), got {tuple(text.shape)}."
            raise ValueError(msg)
        _check_levels(levels, len(names), self.n_value_levels)
        self.gene_encoder.add_genes(text, len(names))
        if hasattr(self, "prompt_gene_encoder"):
            self.prompt_gene_encoder.add_genes(text, len(names))
        self.value_levels = torch.cat([self.value_levels, levels.to(self.value_levels)], dim=0)
        per_gene = getattr(self, "log_tau_gene", None)
        if per_gene is not None:
            grown = torch.cat([per_gene.detach(), per_gene.new_zeros(len(names))])
            self.log_tau_gene = nn.Parameter(grown, requires_grad=per_gene.requires_grad)
        self.genes = [*self.genes, *names]
        self._state_counter += 1
        self._prompt_cache = None
        log.info("added %d genes to the panel (now %d)", len(names), self.n_genes)

    # ================================================================== optimisation helper
    def optimizer_param_groups(
        self, *, lr: float, weight_decay: float = 0.01, image_tower_lr_scale: float = 1.0
    ) -> list[dict[str, Any]]:
        """Trainable parameters in optimizer groups: no weight decay on biases, norms, embeddings and temperatures.

        Parameters
        ----------
        lr
            Base learning rate.
        weight_decay
            Decay of the weight matrices.
        image_tower_lr_scale
            Factor on the learning rate of the (pretrained) backbone.
        """
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            no_decay = p.dim() < 2 or any(
                s in name for s in ("norm", "bn", "token", "pos_embed", "gene_offset", "gene_emb", "bins", "log_tau")
            )
            tower = name.startswith("image.backbone.")
            groups.setdefault((tower, no_decay), []).append(p)
        out = []
        for (tower, no_decay), params in groups.items():
            out.append(
                {
                    "params": params,
                    "lr": lr * (image_tower_lr_scale if tower else 1.0),
                    "weight_decay": 0.0 if no_decay else weight_decay,
                }
            )
        return out

    # ================================================================== save / load
    def save(self, path: str | PathLike, *, overwrite: bool = False) -> None:
        """Save to a folder: ``model.safetensors`` (weights, gene text embeddings, levels) and ``config.json``.

        The folder is written next to its target and moved into place, so an interrupted save leaves any model
        already there intact.

        Parameters
        ----------
        path
            Target folder.
        overwrite
            Replace an existing model folder.
        """
        from ._io import save_model

        save_model(self, path, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | PathLike, *, device: str | torch.device | None = None) -> CoMTIP:
        """Load a model saved by :meth:`save`; reads only ``model.safetensors`` and ``config.json`` (never a pickle).

        Parameters
        ----------
        path
            The model folder.
        device
            Where to put the model; ``None`` = CPU.
        """
        from ._io import load_model

        return load_model(path, device=device)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool = True,
        token: str | None = None,
        commit_message: str = "Upload comtip model",
    ) -> str:
        """Upload the model to the Hugging Face Hub: the files of :meth:`save` and a model card.

        Parameters
        ----------
        repo_id
            ``"user/name"`` of the Hub repository (created if needed).
        private
            Create the repository as private.
        token
            Hub token (default: the logged-in user's).
        commit_message
            Message of the upload commit.

        Returns
        -------
        URL of the commit. Load the model elsewhere with ``ct.tl.load_model(repo_id)``.
        """
        from ._io import push_to_hub

        return push_to_hub(self, repo_id, private=private, token=token, commit_message=commit_message)

    def weights_checksum(self) -> str:
        """SHA-256 of the state dict (names, dtypes, shapes, bytes, in sorted order), for provenance."""
        from ._io import state_dict_checksum

        return state_dict_checksum(self.state_dict())

    # ================================================================== repr
    def n_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (optionally only those with ``requires_grad``)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def __repr__(self) -> str:
        from .. import __version__

        cfg = self.config
        shown = ", ".join(self.genes[:5]) + (", …" if self.n_genes > 5 else "")
        weights = {k: v for k, v in cfg.loss_weights().items() if v > 0}
        if self.is_trained:
            s = self.training_summary
            trained = f"yes ({s.get('epochs', '?')} epochs, {s.get('steps', '?')} steps)"
        else:
            trained = "no"
        heads = "separate contrastive / prompt heads" if cfg.has_separate_prompt_heads else "shared heads"
        text = f"text dim {cfg.text_dim}, " if cfg.uses_text else ""
        lines = [
            f"CoMTIP model '{self.name}' (comtip {__version__})",
            f"  image encoder: {self.image.describe(cfg.image_encoder)}; weights: {cfg.image_pretrained}",
            f"  embedding: d = {cfg.embed_dim}, {heads}",
            f"  gene encoder: {cfg.gene_embedding} + {cfg.value_embedding} values, {cfg.gene_layers} layers × {cfg.gene_dim}",
            f"  gene panel: {self.n_genes} genes ({shown}), {text}K = {self.n_value_levels} value levels",
            f"  parameters: {self.n_parameters(True):,} trainable / {self.n_parameters():,} total",
            "  losses: " + ", ".join(f"{k}={v:g}" for k, v in weights.items()),
            f"  trained: {trained}",
        ]
        return "\n".join(lines)
