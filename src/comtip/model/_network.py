"""The CoMTIP network as a pure :class:`torch.nn.Module`: towers, heads, temperatures, losses, zero-shot read-out.

Tensors in, tensors out: the module knows how many genes its panel has, not their names, and holds no training
history, reference bank or files — those belong to the user-facing :class:`~comtip.CoMTIP` (``_comtip.py``).
The training objectives are composed in ``_objectives.py``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _objectives
from ._config import CoMTIPConfig
from ._gene import GeneTextEncoder
from ._image import ImageTower, MaskFeatureGenerator, dihedral_transforms
from ._losses import ProjectionHead, prompt_logits, readout_prediction
from ._objectives import DepthHead
from ._paat import PairDiscriminator

log = logging.getLogger(__name__)


class CoMTIPNetwork(nn.Module):
    """The CoMTIP network: image tower + MFM, Gene-Text Encoder + PAAT, projection heads and temperatures.

    A pure :class:`torch.nn.Module` — what training and inference run. Users work with :class:`~comtip.CoMTIP`,
    which is this module plus the gene names, the training history, the reference bank and save/load.

    Parameters
    ----------
    config
        A validated configuration (``text_dim`` set when the genes are embedded from text).
    n_genes
        Number of genes in the panel; sentence tokens index into it.
    gene_text_embeddings
        (G, T) frozen text embeddings of the genes' descriptions, or ``None`` with ``gene_embedding="learned"``.
    value_levels
        (G, K) the K prompt levels of each gene, non-decreasing.
    load_pretrained
        Load the tower's initial weights (``config.image_pretrained``).
    """

    def __init__(
        self,
        config: CoMTIPConfig,
        n_genes: int,
        gene_text_embeddings: Tensor | None,
        value_levels: Tensor,
        *,
        load_pretrained: bool = True,
    ) -> None:
        super().__init__()
        self.config = config
        self._state_counter = 0
        self._prompt_cache: tuple[tuple, Tensor] | None = None
        self.register_buffer("value_levels", value_levels)

        # image tower + heads
        self.image = ImageTower(config, pretrained=load_pretrained)
        feat = self.image.num_features
        d = config.embed_dim
        self.image_proj = ProjectionHead(feat, d, config.projection, config.projection_dropout)
        self.gene_encoder = GeneTextEncoder(config, n_genes, gene_text_embeddings)
        if config.separate_prompt_encoder:
            self.prompt_gene_encoder = GeneTextEncoder(config, n_genes, gene_text_embeddings)
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
                self.log_tau_gene = nn.Parameter(torch.zeros(n_genes))
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
        return int(self.value_levels.shape[0])

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
    def cpu_chunk_size(self) -> int | None:
        """Images per forward chunk of the image tower on the CPU without gradients (``None``: one pass).

        ``comtip.tl`` sets it from :attr:`comtip.settings.cpu_chunk_size` each time a tool runs the model.
        """
        return self.image.cpu_chunk_size

    @cpu_chunk_size.setter
    def cpu_chunk_size(self, value: int | None) -> None:
        self.image.cpu_chunk_size = value or None

    @property
    def temperature(self) -> float:
        """Current InfoNCE temperature."""
        return float(1.0 / self._logit_scale())

    @property
    def read_out_temperature(self) -> float:
        """Current global read-out temperature τ_read (before per-gene factors)."""
        return float(self.log_tau_read.detach().exp())

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
    def train(self, mode: bool = True) -> CoMTIPNetwork:
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
        return _objectives.training_losses(self, batch)

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
        return _objectives.readout_losses(self, batch)

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
        return _objectives.masked_value_losses(self, batch)

    def _encode_prompts(self, genes: Tensor, levels: Tensor, head: ProjectionHead) -> Tensor:
        """Embeddings (n, K, d) of the single-gene prompts (g, v_k)."""
        n, k = levels.shape
        idx = genes.repeat_interleave(k)[:, None]
        val = levels.reshape(-1, 1)
        mask = torch.ones_like(idx, dtype=torch.bool)
        out = self._prompt_encoder()(idx, val, mask)
        return F.normalize(head(out.cls), dim=-1).view(n, k, -1)

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
    def extend_panel(self, text_embeddings: Tensor, value_levels: Tensor) -> None:
        """Append ``n`` genes to the panel: their text embeddings (n, T) and prompt levels (n, K), already checked.

        Their learned per-gene offsets and read-out temperature factors start at zero; parameters are replaced, so
        call this before building an optimizer. :meth:`comtip.CoMTIP.add_genes` checks the names and calls it.
        """
        n = int(value_levels.shape[0])
        self.gene_encoder.add_genes(text_embeddings, n)
        if hasattr(self, "prompt_gene_encoder"):
            self.prompt_gene_encoder.add_genes(text_embeddings, n)
        self.value_levels = torch.cat([self.value_levels, value_levels.to(self.value_levels)], dim=0)
        per_gene = getattr(self, "log_tau_gene", None)
        if per_gene is not None:
            grown = torch.cat([per_gene.detach(), per_gene.new_zeros(n)])
            self.log_tau_gene = nn.Parameter(grown, requires_grad=per_gene.requires_grad)
        self._state_counter += 1
        self._prompt_cache = None

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

    # ================================================================== repr
    def n_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (optionally only those with ``requires_grad``)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
