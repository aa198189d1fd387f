"""Training-side views of a SpotDataset: epoch-seeded sampling (DDP-aware) and cached frozen-prefix features."""

from __future__ import annotations

import math

import numpy as np


class EpochSampler:
    """A sampler that shuffles with a seed per epoch and shards across DDP ranks.

    It yields ``epoch * n + i``, so that the dataset knows the epoch even inside persistent DataLoader workers
    (augmentation is seeded by (seed, epoch, i)).

    Parameters
    ----------
    n
        Number of samples.
    seed
        Base seed.
    shuffle
        Shuffle each epoch.
    num_replicas, rank
        DDP world size and rank; each rank gets an equal share (padded by wrapping around).
    """

    def __init__(self, n: int, *, seed: int = 0, shuffle: bool = True, num_replicas: int = 1, rank: int = 0) -> None:
        self.n, self.seed, self.shuffle = int(n), int(seed), bool(shuffle)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.epoch = 0
        self.per_rank = math.ceil(self.n / self.num_replicas) if self.n else 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self):
        order = (
            np.random.default_rng([self.seed, self.epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
        )
        total = self.per_rank * self.num_replicas
        if total > self.n:
            order = np.concatenate([order, order[: total - self.n]])
        mine = order[self.rank : total : self.num_replicas]
        return iter((mine + self.epoch * self.n).tolist())


class EpochIndexed:
    """A dataset that decodes ``epoch * n + i`` (from :class:`EpochSampler`) into sample i of that epoch."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices):
        n = len(self.dataset)
        idx = np.asarray(indices, dtype=np.int64)
        epochs = idx // n
        if len(set(epochs.tolist())) > 1:
            msg = "A batch mixes epochs; use EpochSampler with a BatchSampler."
            raise RuntimeError(msg)
        self.dataset.set_epoch(int(epochs[0]) if len(epochs) else 0)
        return self.dataset.__getitems__(idx % n)

    def __getitem__(self, i):
        return self.__getitems__([i])[0]


class _CachedFeatures:
    """Samples of a dataset whose image is replaced by precomputed features (``self.features``: N × variants × ...).

    Subclasses fill ``features``, ``n_variants``, ``dataset``, ``augment``, ``seed`` and set ``key``, the batch key
    of the features. With ``augment``, each sample takes one of its variants, drawn from (seed, epoch, index).
    """

    key = "features"

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitems__(self, indices):
        idx = np.asarray(indices, dtype=np.int64)
        saved = self.dataset.reader
        self.dataset.reader = None  # genes only: the image comes from the features
        try:
            samples = self.dataset.__getitems__(idx)
        finally:
            self.dataset.reader = saved
        for s, i in zip(samples, idx, strict=True):
            k = (
                int(np.random.default_rng([self.seed, self.epoch, int(i)]).integers(self.n_variants))
                if self.augment
                else 0
            )
            s[self.key] = self.features[int(i), k]
        return samples

    def __getitem__(self, i):
        return self.__getitems__([i])[0]


class PrefixFeatureDataset(_CachedFeatures):
    """Samples whose image is replaced by the cached output of the model's frozen tower prefix.

    With a frozen prefix (``image_trainable_blocks`` > 0 but not all), the prefix is a fixed function of the
    tile: its output is computed once for each of the 8 dihedral transforms of every tile (the augmentation
    of training) and served as ``batch['image_prefix']``. Colour jitter is not applied (it would change the
    cached features); each epoch picks, per spot, one of the 8 transforms, seeded by (seed, epoch, spot).

    Parameters
    ----------
    dataset
        A :class:`comtip.data.SpotDataset` (its own augmentation is not used).
    model
        The CoMTIP model whose ``image.forward_prefix`` is cached.
    augment
        Use a random dihedral transform per sample and epoch (else the identity).
    batch_size
        Tiles per forward pass while caching.
    device
        Where to run the prefix.
    """

    key = "image_prefix"

    def __init__(self, dataset, model, *, augment: bool, batch_size: int = 64, device=None, seed: int = 0) -> None:
        import torch

        from .._progress import progress
        from ..data import dihedral

        self.dataset, self.augment, self.seed, self.epoch = dataset, augment, seed, 0
        n_variants = 8 if augment else 1
        device = device or "cpu"
        tower = model.image
        was_training = tower.training
        tower.eval()
        feats = None
        saved_augment = dataset.augment
        dataset.augment = False
        try:
            with torch.inference_mode():
                for start in progress(range(0, len(dataset), batch_size), desc="caching frozen image features"):
                    idx = np.arange(start, min(start + batch_size, len(dataset)))
                    img = dataset.images(idx).to(device)
                    for k in range(n_variants):
                        f = tower.forward_prefix(dihedral(img, k)).float().cpu()
                        if feats is None:
                            feats = torch.empty((len(dataset), n_variants, *f.shape[1:]), dtype=torch.float32)
                        feats[torch.from_numpy(idx), k] = f
        finally:
            dataset.augment = saved_augment
            tower.train(was_training)
        self.features = feats
        self.n_variants = n_variants

    @property
    def nbytes(self) -> int:
        return int(self.features.numel() * self.features.element_size())


def prefix_is_frozen(model) -> bool:
    """Whether the image tower has a frozen prefix whose output can be cached."""
    return len(model.image.prefix_units) > 0


class PooledFeatureDataset(_CachedFeatures):
    """Samples whose image is replaced by the pooled features of the (now fixed) image tower, for the read-out stage.

    The pooled features are computed once per tile and dihedral transform — from cached prefix features when
    ``dataset`` is a :class:`PrefixFeatureDataset`, else from the tiles — and served as ``batch['pooled']``.

    Parameters
    ----------
    dataset
        A :class:`comtip.data.SpotDataset` or a :class:`PrefixFeatureDataset`.
    model
        The CoMTIP model whose tower gives the features.
    augment
        Pick one of the 8 dihedral variants per sample and epoch (else the identity).
    """

    key = "pooled"

    def __init__(self, dataset, model, *, augment: bool, batch_size: int = 128, device=None, seed: int = 0) -> None:
        import torch

        from .._progress import progress
        from ..data import dihedral

        self.augment, self.seed, self.epoch = augment, seed, 0
        device = torch.device(device or "cpu")
        tower = model.image
        was_training = tower.training
        home = next(tower.parameters()).device
        tower.to(device).eval()
        n_variants = 8 if augment else 1
        out = None
        try:
            with torch.inference_mode():
                if isinstance(dataset, PrefixFeatureDataset):
                    self.dataset = dataset.dataset
                    feats = dataset.features[:, :n_variants]
                    n, v = feats.shape[:2]
                    pooled = []
                    for start in progress(range(0, n, batch_size), desc="pooled image features"):
                        f = feats[start : start + batch_size].to(device)
                        pooled.append(
                            tower.forward_suffix(f.reshape(-1, *f.shape[2:]))[1].float().cpu().view(len(f), v, -1)
                        )
                    out = torch.cat(pooled)
                else:
                    self.dataset = dataset
                    saved = dataset.augment
                    dataset.augment = False
                    try:
                        for start in progress(range(0, len(dataset), batch_size), desc="pooled image features"):
                            idx = np.arange(start, min(start + batch_size, len(dataset)))
                            img = dataset.images(idx).to(device)
                            f = torch.stack(
                                [tower(dihedral(img, k))[1].float().cpu() for k in range(n_variants)], dim=1
                            )
                            out = f if out is None else torch.cat([out, f])
                    finally:
                        dataset.augment = saved
        finally:
            tower.to(home).train(was_training)
        self.features = out
        self.n_variants = n_variants

    @classmethod
    def concat(cls, dataset, parts: list[PooledFeatureDataset], *, seed: int = 0) -> PooledFeatureDataset:
        """One augmenting dataset over ``dataset``, whose samples are those of ``parts`` in order (same variants)."""
        import torch

        if len(dataset) != sum(len(p) for p in parts) or len({p.n_variants for p in parts}) != 1:
            msg = "concat: the parts must cover the dataset's samples in order, with the same number of variants."
            raise ValueError(msg)
        self = cls.__new__(cls)
        self.dataset, self.augment, self.seed, self.epoch = dataset, parts[0].n_variants > 1, seed, 0
        self.features = torch.cat([p.features for p in parts])
        self.n_variants = parts[0].n_variants
        return self
