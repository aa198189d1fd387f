"""The image tower (a backbone as frozen prefix + trainable suffix), MFM's mask feature generator, dihedral views.

The tower outputs image tokens (ViT patch tokens or CNN feature-map cells) and a pooled feature; the backbones
and their weights come from ``_backbones.py``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._backbones import (
    EFFICIENTNET_LITE0,
    N_EFFICIENTNET_LITE0_TENSORS,
    Unit,
    backbone_units,
    create_backbone,
    efficientnet_lite0_package_file,
    load_efficientnet_lite0_package_weights,
    matches_prefix,
)

if TYPE_CHECKING:
    from ._config import CoMTIPConfig

log = logging.getLogger(__name__)

#: images per CPU forward chunk (see :func:`_chunks`); ``comtip.settings.cpu_chunk_size`` sets it per call
CPU_CHUNK_SIZE = 4

__all__ = [
    "EFFICIENTNET_LITE0",
    "N_EFFICIENTNET_LITE0_TENSORS",
    "CPU_CHUNK_SIZE",
    "ImageTower",
    "MaskFeatureGenerator",
    "create_backbone",
    "dihedral_transforms",
    "efficientnet_lite0_package_file",
    "load_efficientnet_lite0_package_weights",
    "random_token_mask",
]


def random_token_mask(
    batch_size: int, n_tokens: int, ratio: float, *, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor, Tensor]:
    """Hide the same number of random tokens in every row.

    Parameters
    ----------
    batch_size, n_tokens
        Shape of the mask.
    ratio
        Fraction hidden (at least 1 and at most ``n_tokens - 1`` tokens).
    device
        Device of the outputs.

    Returns
    -------
    ``hidden`` (B, N) bool (True = hidden), ``visible_idx`` (B, N_vis) and ``hidden_idx`` (B, N_hid), both sorted.
    """
    if n_tokens < 2:
        msg = f"Masked feature modeling needs at least 2 image tokens, got {n_tokens}: raise image_size."
        raise ValueError(msg)
    n_hide = min(max(1, round(ratio * n_tokens)), n_tokens - 1)
    order = torch.rand(batch_size, n_tokens, device=device).argsort(dim=1)
    hidden_idx = order[:, :n_hide].sort(dim=1).values
    visible_idx = order[:, n_hide:].sort(dim=1).values
    hidden = torch.zeros(batch_size, n_tokens, dtype=torch.bool, device=device)
    hidden.scatter_(1, hidden_idx, True)
    return hidden, visible_idx, hidden_idx


def _gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


# ---------------------------------------------------------------------------------------------- tower
def _chunks(x: Tensor, n: int | None) -> tuple[Tensor, ...]:
    """``x`` split along the batch into ``n`` rows on the CPU (``None`` or 0: no split); else ``(x,)``.

    A CPU forward pass of a large batch is slower than the same images in small chunks: each activation of a big
    batch exceeds glibc malloc's mmap threshold, so every layer maps and zeroes fresh pages (measured on 2 cores
    with ``tf_efficientnet_lite0``: 31 images/s at 64 per pass, ~90 at 4; peak memory 2.0 GB -> 1.0 GB).
    """
    if x.device.type != "cpu" or not n or x.shape[0] <= n:
        return (x,)
    return x.split(n)


def _in_chunks(fn: Callable[[Tensor], Tensor], x: Tensor, n: int | None) -> Tensor:
    parts = _chunks(x, n)
    return fn(parts[0]) if len(parts) == 1 else torch.cat([fn(c) for c in parts])


class ImageTower(nn.Module):
    """A timm backbone as a frozen prefix and a trainable suffix that outputs image tokens and a pooled feature.

    Tokens are ViT patch tokens or the cells of a CNN's last feature map. ``forward_prefix`` (normalisation and
    the frozen units, always under ``no_grad``) and ``forward_suffix`` (the trainable units) can be run apart, so
    training can cache prefix features of a frozen tower.

    Parameters
    ----------
    config
        The model config (``image_*`` fields and ``mfm_weight``).
    pretrained
        Load the initial weights named by ``config.image_pretrained`` (``False`` when the weights come from a
        saved model anyway).
    cpu_chunk_size
        Images per forward chunk on the CPU without gradients (``None``: one pass); an attribute that callers may
        change (``comtip.tl`` and training set it from :attr:`comtip.settings.cpu_chunk_size`).
    """

    def __init__(
        self, config: CoMTIPConfig, *, pretrained: bool = True, cpu_chunk_size: int | None = CPU_CHUNK_SIZE
    ) -> None:
        super().__init__()
        self.cpu_chunk_size = cpu_chunk_size
        import timm

        self.image_size = config.image_size
        self.backbone = create_backbone(
            config.image_encoder,
            pretrained=config.image_pretrained if pretrained else None,
            image_size=config.image_size,
        )
        data_cfg = timm.data.resolve_data_config({}, model=self.backbone)
        self.register_buffer("pixel_mean", torch.tensor(data_cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(data_cfg["std"], dtype=torch.float32).view(1, 3, 1, 1))
        self.family, units = backbone_units(self.backbone)
        self._units = units
        n_blocks = sum(u.kind == "block" for u in units)
        k = config.image_trainable_blocks
        if k > n_blocks:
            msg = (
                f"image_trainable_blocks={k} but {config.image_encoder!r} has {n_blocks} blocks"
                f"{' (comtip treats this timm model as one block)' if self.family == 'generic' else ''}; "
                "use -1 to train everything or a number up to the block count."
            )
            raise ValueError(msg)
        if k == -1:
            split = 0
        elif k == 0:
            split = len(units)
        else:
            block_pos = [i for i, u in enumerate(units) if u.kind == "block"]
            split = block_pos[n_blocks - k]
        self._split = split
        self.trainable_blocks = k
        self.n_blocks = n_blocks
        # class/register tokens ahead of the patch tokens (transformers; 0 for CNNs)
        self.num_prefix_tokens = int(getattr(self.backbone, "num_prefix_tokens", 0) or 0)
        pool = config.image_pool
        if pool == "auto":
            has_cls = self.num_prefix_tokens > 0 and getattr(self.backbone, "global_pool", "") == "token"
            pool = "cls" if has_cls else "mean"
        if pool == "cls" and self.num_prefix_tokens == 0:
            msg = f"image_pool='cls' but {config.image_encoder!r} has no class token; use image_pool='mean'."
            raise ValueError(msg)
        self.pool = pool
        self._freeze()
        try:
            self._probe_shapes()
        except (AssertionError, RuntimeError) as e:
            patch = getattr(getattr(self.backbone, "patch_embed", None), "patch_size", None)
            p = max(patch) if isinstance(patch, tuple | list) else patch
            hint = (
                f"use a multiple of its {p} px patch, e.g. image_size={max(p, round(config.image_size / p) * p)}"
                if p
                else "pick another image_size"
            )
            msg = f"CoMTIPConfig.image_size={config.image_size} does not suit {config.image_encoder!r} ({e}): {hint}."
            raise ValueError(msg) from e
        self.mask_token: nn.Parameter | None = None
        # a ViT always drops hidden patch tokens (after its stem); CNN inputs (C, h, w) are masked by replacement
        if config.mfm_weight > 0 and self.family != "vit" and len(self._suffix_in_shape) == 3:
            self.mask_token = nn.Parameter(torch.zeros(self._suffix_in_shape[0]))

    # ------------------------------------------------------------------ structure
    @property
    def prefix_units(self) -> list[Unit]:
        """The frozen units, run under ``no_grad``."""
        return self._units[: self._split]

    @property
    def suffix_units(self) -> list[Unit]:
        """The trainable units."""
        return self._units[self._split :]

    def _freeze(self) -> None:
        suffix_prefixes = tuple(p for u in self.suffix_units for p in u.prefixes)
        all_prefixes = tuple(p for u in self._units for p in u.prefixes)
        uncovered = []
        for name, param in self.backbone.named_parameters():
            if not matches_prefix(name, all_prefixes):
                uncovered.append(name)
                param.requires_grad_(False)
                continue
            param.requires_grad_(matches_prefix(name, suffix_prefixes))
        if uncovered:
            log.warning("image tower: parameters outside the forward path are frozen: %s", uncovered[:6])
        prefix_prefixes = tuple(p for u in self.prefix_units for p in u.prefixes)
        self._frozen_prefixes = ("",) if self._split == len(self._units) else prefix_prefixes

    def train(self, mode: bool = True) -> ImageTower:
        """Set training mode; the frozen prefix (BatchNorm statistics included) always stays in eval mode."""
        super().train(mode)
        if self._split > 0:
            for name, m in self.backbone.named_modules():
                if matches_prefix(name, self._frozen_prefixes):
                    m.eval()
        return self

    @torch.no_grad()
    def _probe_shapes(self) -> None:
        was_training = self.backbone.training
        self.backbone.eval()
        x = torch.zeros(1, 3, self.image_size, self.image_size)
        for u in self.prefix_units:
            x = u.fn(self.backbone, x)
        self._suffix_in_shape = tuple(x.shape[1:])
        for u in self.suffix_units:
            x = u.fn(self.backbone, x)
        if x.dim() == 4:
            self.grid = (int(x.shape[2]), int(x.shape[3]))
            self.num_features = int(x.shape[1])
        elif x.dim() == 3:
            n = x.shape[1] - self.num_prefix_tokens
            if self.family == "vit":
                self.grid = tuple(int(g) for g in self.backbone.patch_embed.grid_size)
            else:
                side = math.isqrt(n)
                self.grid = (side, n // side)
            self.num_features = int(x.shape[2])
            if self.grid[0] * self.grid[1] != n:
                msg = f"image tower: {n} tokens do not form the grid {self.grid}."
                raise ValueError(msg)
        else:
            msg = f"image tower: unsupported feature shape {tuple(x.shape)} from forward_features."
            raise ValueError(msg)
        self.backbone.train(was_training)
        self.train(self.training)

    @property
    def num_tokens(self) -> int:
        """Number of image tokens (grid cells)."""
        return self.grid[0] * self.grid[1]

    # ------------------------------------------------------------------ forward
    def normalize(self, images: Tensor) -> Tensor:
        """Check RGB images in [0, 1] (or uint8), resize to ``image_size`` and apply the backbone's normalisation."""
        if images.dim() != 4 or images.shape[1] != 3:
            msg = f"images must have shape (B, 3, H, W), got {tuple(images.shape)}."
            raise ValueError(msg)
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        elif not images.is_floating_point():
            msg = f"images must be float RGB in [0, 1] or uint8, got dtype {images.dtype}."
            raise ValueError(msg)
        else:
            lo, hi = float(images.min()), float(images.max())
            if lo < -1e-3 or hi > 1.0 + 1e-3:
                msg = (
                    f"images must be RGB in [0, 1] (not normalised: the model normalises itself); got values in "
                    f"[{lo:.3g}, {hi:.3g}]. Divide uint8 images by 255."
                )
                raise ValueError(msg)
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False
            )
        return (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std

    def forward_prefix(self, images: Tensor) -> Tensor:
        """Normalise ``images`` (B, 3, H, W, RGB in [0, 1]) and run the frozen units, without gradients.

        Returns
        -------
        The suffix input: the normalised images when the whole tower trains, else a feature map (B, C, h, w) or
        a token sequence (B, P + N, C).
        """
        with torch.no_grad():
            if not self.prefix_units:
                return self.normalize(images)
            return _in_chunks(
                lambda c: self._run_units(self.prefix_units, self.normalize(c)), images, self.cpu_chunk_size
            )

    def _run_units(self, units: list[Unit], x: Tensor) -> Tensor:
        for u in units:
            x = u.fn(self.backbone, x)
        return x

    def forward_suffix(self, features: Tensor, token_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Run the trainable units on prefix features.

        Parameters
        ----------
        features
            Output of :meth:`forward_prefix`.
        token_mask
            (B, N) bool, True = hidden, on the output token grid (the same count per row). ViT patch tokens are
            dropped (after the stem when the stem trains); CNN feature cells (or input pixels) under a hidden
            token are replaced by a learnable mask token at the suffix input.

        Returns
        -------
        ``tokens`` (B, N, C) — only the visible ones, in position order, when ``token_mask`` is given — and
        ``pooled`` (B, C).

        Without gradients, in eval mode, on the CPU and without a mask, the batch runs in chunks of
        :attr:`cpu_chunk_size` (same result, less memory, faster).
        """
        if token_mask is None and not (torch.is_grad_enabled() or self.training):
            parts = [self._forward_suffix(c) for c in _chunks(features, self.cpu_chunk_size)]
            if len(parts) > 1:
                return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            return parts[0]
        return self._forward_suffix(features, token_mask)

    def _forward_suffix(self, features: Tensor, token_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = features
        units = self.suffix_units
        dropped = False
        if token_mask is not None:
            if self.family == "vit" and x.dim() == 4:
                x = units[0].fn(self.backbone, x)
                units = units[1:]
            x, dropped = self._apply_mask(x, token_mask)
        for u in units:
            x = u.fn(self.backbone, x)
        if x.dim() == 4:
            tokens = x.flatten(2).transpose(1, 2)
            prefix_tokens = None
        else:
            tokens = x[:, self.num_prefix_tokens :]
            prefix_tokens = x[:, : self.num_prefix_tokens]
        if token_mask is not None and not dropped:
            tokens = _gather_tokens(tokens, _visible_index(token_mask))
        if self.pool == "cls":
            pooled = prefix_tokens[:, 0]
        else:
            pooled = tokens.mean(dim=1)
        if x.dim() == 3:  # transformers: timm's fc_norm after pooling (Identity for class-token pooling)
            fc_norm = getattr(self.backbone, "fc_norm", None)
            if isinstance(fc_norm, nn.Module):
                pooled = fc_norm(pooled)
        else:  # CNNs with a norm in the classifier head (ConvNeXt)
            head = getattr(self.backbone, "head", None)
            norm = getattr(head, "norm", None) if isinstance(head, nn.Module) else None
            if isinstance(norm, nn.Module):
                pooled = norm(pooled[:, :, None, None]).flatten(1)
        return tokens, pooled

    def _apply_mask(self, x: Tensor, token_mask: Tensor) -> tuple[Tensor, bool]:
        if token_mask.shape != (x.shape[0], self.num_tokens):
            msg = f"token_mask must have shape (B, {self.num_tokens}), got {tuple(token_mask.shape)}."
            raise ValueError(msg)
        if x.dim() == 3:  # token sequence: drop hidden patch tokens
            p = self.num_prefix_tokens
            kept = _gather_tokens(x[:, p:], _visible_index(token_mask))
            return torch.cat([x[:, :p], kept], dim=1), True
        if self.mask_token is None:
            msg = "This image tower was built without a mask token (mfm_weight=0): masking is unavailable."
            raise ValueError(msg)
        m = token_mask.view(-1, 1, *self.grid).to(x.dtype)
        m = F.interpolate(m, size=x.shape[-2:], mode="nearest")
        return x * (1 - m) + self.mask_token.view(1, -1, 1, 1).to(x.dtype) * m, False

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens (B, N, C) and pooled features (B, C) of RGB images in [0, 1].

        Without gradients, in eval mode and on the CPU, the batch runs in chunks of
        :attr:`cpu_chunk_size` images (same result, less memory, faster).
        """
        return self.forward_suffix(self.forward_prefix(images))

    @contextlib.contextmanager
    def frozen_bn_statistics(self) -> Iterator[None]:
        """Inside this context BatchNorm layers use batch statistics but do not update their running ones.

        Used for the masked MFM branch, whose mask-token-filled inputs must not shift the running statistics.
        """
        bns = [m for m in self.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        saved = [m.momentum for m in bns]
        try:
            for m in bns:
                m.momentum = 0.0
            yield
        finally:
            for m, mom in zip(bns, saved, strict=True):
                m.momentum = mom

    def describe(self, name: str) -> str:
        """A one-line description: encoder, input size, trainable part."""
        k = self.trainable_blocks
        if k == -1:
            part = "all trainable"
        elif k == 0:
            part = "frozen"
        else:
            part = f"last {k} of {self.n_blocks} blocks trainable"
        return f"{name}, {self.image_size} px, {self.num_tokens} tokens × {self.num_features}, {part}"


def _visible_index(token_mask: Tensor) -> Tensor:
    """Positions of the visible tokens, sorted, (B, N_vis); rows must hide the same number of tokens."""
    counts = token_mask.sum(dim=1)
    if bool((counts != counts[0]).any()):
        msg = "token_mask must hide the same number of tokens in every row."
        raise ValueError(msg)
    n_vis = token_mask.shape[1] - int(counts[0])
    # stable sort puts visible (False) positions first, in position order
    return token_mask.to(torch.int8).argsort(dim=1, stable=True)[:, :n_vis]


# ---------------------------------------------------------------------------------------------- MFM
def sincos_2d(grid: tuple[int, int], dim: int) -> Tensor:
    """Fixed 2-D sine-cosine position embedding (h * w, dim)."""
    h, w = grid
    quarter = max(dim // 4, 1)
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    out_y = ys.reshape(-1, 1) * omega
    out_x = xs.reshape(-1, 1) * omega
    emb = torch.cat([out_y.sin(), out_y.cos(), out_x.sin(), out_x.cos()], dim=1)
    if emb.shape[1] < dim:
        emb = torch.cat([emb, torch.zeros(emb.shape[0], dim - emb.shape[1])], dim=1)
    return emb[:, :dim]


class _CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention (queries attend to a context) followed by an MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, q: Tensor, kv: Tensor) -> Tensor:
        kv = self.norm_kv(kv)
        q = q + self.attn(self.norm_q(q), kv, kv, need_weights=False)[0]
        return q + self.mlp(self.norm_mlp(q))


class MaskFeatureGenerator(nn.Module):
    """MFM's mask feature generator: predicts the full branch's token features at hidden positions.

    A learnable query per hidden position (a shared query + a position embedding) cross-attends to the visible
    tokens' features and regresses the full branch's feature at that position.

    Parameters
    ----------
    feat_dim
        Feature dimension of the image tokens.
    grid
        Token grid (h, w).
    dim, depth, heads
        Width, number of cross-attention blocks and heads.
    """

    def __init__(self, feat_dim: int, grid: tuple[int, int], dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.in_proj = nn.Linear(feat_dim, dim)
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(sincos_2d(grid, dim)[None])
        self.blocks = nn.ModuleList(_CrossAttentionBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, feat_dim)

    def forward(self, visible: Tensor, visible_idx: Tensor, hidden_idx: Tensor) -> Tensor:
        """Predict features (B, N_hid, feat_dim) at ``hidden_idx`` from ``visible`` (B, N_vis, feat_dim)."""
        pos = self.pos_embed.expand(visible.shape[0], -1, -1)
        kv = self.in_proj(visible) + _gather_tokens(pos, visible_idx)
        q = self.query + _gather_tokens(pos, hidden_idx)
        for blk in self.blocks:
            q = blk(q, kv)
        return self.out(self.norm(q))


# ---------------------------------------------------------------------------------------------- TTA
def dihedral_transforms(images: Tensor) -> list[Tensor]:
    """The 8 flips/rotations of a batch of square images (…, H, W): 4 rotations, each with and without a flip.

    Histology has no "up": averaging image embeddings over these 8 variants is the inference-time augmentation.
    The ``k``-th variant is :func:`comtip.data.dihedral` ``(images, k)``, the transform training augments with.
    """
    from ..data import dihedral

    return [dihedral(images, k) for k in range(8)]
