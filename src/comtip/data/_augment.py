"""Augmentation of H&E tiles: dihedral flips/rotations (histology has no "up") and mild colour jitter."""

from __future__ import annotations

import numpy as np


def dihedral(x, k: int):
    """The ``k``-th (0..7) of the 8 dihedral transforms of ``(..., H, W)`` tensors: ``k % 4`` quarter turns, flipped if ``k >= 4``."""
    import torch

    if k >= 4:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, k % 4, dims=(-2, -1))


def augment(images, rng: np.random.Generator, *, colour_jitter: float = 0.1):
    """Random dihedral transform and mild brightness/contrast/saturation jitter of float tiles in [0, 1].

    Parameters
    ----------
    images
        ``(n, 3, H, W)`` float tensor in [0, 1] (changed copies are returned).
    rng
        Source of randomness (one per sample keeps runs reproducible whatever the batch composition).
    colour_jitter
        Maximal relative change of brightness, contrast and saturation (0 turns colour jitter off).
    """
    import torch

    out = []
    for img in images:
        img = dihedral(img, int(rng.integers(8)))
        if colour_jitter > 0:
            b, c, s = 1 + rng.uniform(-colour_jitter, colour_jitter, size=3)
            img = img * b
            mean = img.mean()
            img = (img - mean) * c + mean
            gray = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]).unsqueeze(0)
            img = (img - gray) * s + gray
        out.append(img.clamp(0, 1))
    return torch.stack(out) if out else images
