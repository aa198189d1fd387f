"""The user's CoMTIP model: the network plus its gene panel, training record, reference bank and files.

:class:`CoMTIP` is the :class:`~comtip.model.CoMTIPNetwork` network (``_network.py``) with what a user works with:
the gene names, the training history and summary, the reference bank of the training spots,
``save`` / ``load`` / ``from_pretrained`` / ``push_to_hub`` (``_io.py``) and :meth:`CoMTIP.add_genes`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from os import PathLike
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._config import CoMTIPConfig
from ._network import CoMTIPNetwork

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


class CoMTIP(CoMTIPNetwork):
    """CoMTIP: contrastive masked text-image pretraining for spatial transcriptomics.

    One embedding space for H&E tiles (a timm image tower trained with Masked Feature Modeling) and gene
    sentences (a Gene-Text Encoder over gene-name and value embeddings, with Pair-aware Adversarial Training),
    aligned by InfoNCE, plus a value-level prompt loss that trains the zero-shot read-out of expression from
    single-gene prompts.

    The network itself is :class:`~comtip.model.CoMTIPNetwork` (this class's parent); :class:`CoMTIP` adds the gene
    names, :attr:`history`, :attr:`training_summary`, :attr:`reference` and the files.

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
        config = CoMTIPConfig.cpu() if config is None else config
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
        super().__init__(config, len(genes), text, levels, load_pretrained=load_pretrained)
        self.genes: list[str] = genes
        self.name = f"comtip_{config.image_encoder}"
        self.training_summary: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        #: training spots' image embeddings (n, d) and panel expression (n, G) for reference-based prediction;
        #: filled by ``ct.tl.pretrain``, saved as ``reference.safetensors``
        self.reference: dict[str, Tensor] | None = None

    # ================================================================== user-facing
    @property
    def is_trained(self) -> bool:
        """Whether a trainer recorded any training in :attr:`training_summary`."""
        return bool(self.training_summary.get("steps") or self.training_summary.get("epochs"))

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
        self.extend_panel(text, levels)
        self.genes = [*self.genes, *names]
        log.info("added %d genes to the panel (now %d)", len(names), self.n_genes)

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

        return load_model(path, device=device, model_class=cls)

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

    @classmethod
    def from_pretrained(
        cls,
        path_or_name: str | PathLike,
        *,
        device: str | torch.device | None = None,
        revision: str | None = None,
    ) -> CoMTIP:
        """Load a model from a folder written by :meth:`save`, or from the Hugging Face Hub.

        Parameters
        ----------
        path_or_name
            A model folder, or a Hub id ``"user/name"`` (downloaded once into the Hub cache; needs a connection).
        device
            Where to put the model; ``None`` = CPU.
        revision
            Hub revision (branch, tag or commit).

        Returns
        -------
        The model. :func:`comtip.tl.load_model` does the same and also makes it the current model.
        """
        from ._io import resolve_pretrained

        return cls.load(resolve_pretrained(path_or_name, revision=revision), device=device)

    def __repr__(self) -> str:
        from .._version import __version__

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
