"""Batched inference loops (no AnnData): image embeddings in both spaces, gene-sentence embeddings.

EVAL.md's frozen ImageNet baseline encoder lives in :mod:`comtip.bench` (``ImageNetEncoder``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from ._image import dihedral_transforms


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or CUDA when available, else the CPU (MPS is never picked automatically)."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast(device: torch.device):
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


@torch.inference_mode()
def embed_images(
    model, batches: Iterable[dict], *, dihedral: bool = False, device=None, prompt: bool = True
) -> dict[str, np.ndarray]:
    """Image embeddings of every batch, in the contrastive space (``"image"``) and the prompt space (``"prompt"``).

    The tower runs once per image (per dihedral variant); both projection heads read its pooled features.

    Parameters
    ----------
    model
        A :class:`comtip.CoMTIP`.
    batches
        Iterable of dicts with ``"image"`` (B, 3, H, W) in [0, 1].
    dihedral
        Average each embedding over the 8 flips/rotations (then re-normalise).
    device
        Where to run (see :func:`pick_device`).
    prompt
        Also compute the prompt-space embeddings.

    Returns
    -------
    ``{"image": (N, d), "prompt": (N, d)}`` float32 arrays, L2-normalised rows.
    """
    device = pick_device(device)
    was_training = model.training
    model.eval().to(device)
    img_head, prompt_head = model.image_proj, model._image_prompt_head()
    out: dict[str, list] = {"image": [], "prompt": []}
    try:
        for batch in batches:
            x = batch["image"].to(device, non_blocking=True)
            variants = dihedral_transforms(x) if dihedral else [x]
            acc_i = acc_p = 0
            with _autocast(device):
                for v in variants:
                    pooled = model.image(v)[1].float()
                    acc_i = acc_i + F.normalize(img_head(pooled).float(), dim=-1)
                    if prompt:
                        acc_p = acc_p + F.normalize(prompt_head(pooled).float(), dim=-1)
            out["image"].append(F.normalize(acc_i, dim=-1).cpu())
            if prompt:
                out["prompt"].append(F.normalize(acc_p, dim=-1).cpu())
    finally:
        model.train(was_training)
    d = model.embed_dim
    return {
        k: (torch.cat(v).numpy() if v else np.zeros((0, d), np.float32)) for k, v in out.items() if v or k == "image"
    }


@torch.inference_mode()
def embed_genes(model, batches: Iterable[dict], *, device=None) -> np.ndarray:
    """Gene-sentence embeddings (N, d) in the contrastive space of batches with ``gene_idx/gene_val/gene_mask``."""
    device = pick_device(device)
    was_training = model.training
    model.eval().to(device)
    out = []
    try:
        for b in batches:
            out.append(
                model.encode_genes(b["gene_idx"].to(device), b["gene_val"].to(device), b["gene_mask"].to(device))
                .float()
                .cpu()
            )
    finally:
        model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, model.embed_dim), np.float32)


@torch.inference_mode()
def embed_prefix_features(
    model, features: torch.Tensor, *, batch_size: int = 256, device=None
) -> dict[str, np.ndarray]:
    """Embeddings from cached outputs of the frozen tower prefix ``(N, V, ...)``, averaged over the V variants.

    The V variants are the dihedral transforms of each tile (see ``comtip.train.PrefixFeatureDataset``).

    Returns
    -------
    ``{"image": (N, d), "prompt": (N, d)}``, L2-normalised.
    """
    device = pick_device(device)
    was_training = model.training
    model.eval().to(device)
    img_head, prompt_head = model.image_proj, model._image_prompt_head()
    out_i, out_p = [], []
    try:
        for start in range(0, features.shape[0], batch_size):
            f = features[start : start + batch_size].to(device)
            n, v = f.shape[:2]
            pooled = model.image.forward_suffix(f.reshape(n * v, *f.shape[2:]))[1].float()
            ei = F.normalize(img_head(pooled), dim=-1).view(n, v, -1).mean(1)
            ep = F.normalize(prompt_head(pooled), dim=-1).view(n, v, -1).mean(1)
            out_i.append(F.normalize(ei, dim=-1).cpu())
            out_p.append(F.normalize(ep, dim=-1).cpu())
    finally:
        model.train(was_training)
    return {"image": torch.cat(out_i).numpy(), "prompt": torch.cat(out_p).numpy()}


class DihedralMean(torch.nn.Module):
    """An image encoder's output averaged over the 8 flips/rotations of its input (test-time averaging).

    With ``keep_first``, the output of the untransformed view comes first, concatenated with the mean: ``(N, 2C)``,
    both from one pass over the 8 views.
    """

    def __init__(self, encoder: torch.nn.Module, *, keep_first: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.keep_first = keep_first

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        views = torch.stack([self.encoder(v) for v in dihedral_transforms(images)])
        return torch.cat([views[0], views.mean(0)], dim=-1) if self.keep_first else views.mean(0)


@torch.inference_mode()
def encode_batches(encoder: torch.nn.Module, batches: Iterable[dict], *, device=None) -> np.ndarray:
    """Run a frozen image encoder over batches with ``"image"``; returns (N, C) float32 features."""
    device = pick_device(device)
    encoder.eval().to(device)
    out = [encoder(b["image"].to(device)).float().cpu() for b in batches]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)
