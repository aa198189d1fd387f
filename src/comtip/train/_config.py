"""The training settings of :func:`comtip.tl.pretrain` in one dataclass (no torch import: ``import comtip`` stays fast)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal


@dataclass
class TrainConfig:
    """How :func:`comtip.tl.pretrain` trains: stages, optimiser, data during training, hardware, checkpoints.

    The defaults are pretrain's defaults: there is one training preset, this one. The model itself (towers, loss
    weights) is set by :class:`comtip.CoMTIPConfig`, whose default in pretrain is :meth:`comtip.CoMTIPConfig.cpu`.
    Every field can also be passed to :func:`comtip.tl.pretrain` as a keyword (``ct.tl.pretrain(sdata,
    max_epochs=20)``); a keyword overrides the field of ``training=``.

    Parameters
    ----------
    max_epochs
        Epochs of the contrastive stage.
    batch_size
        Spots per batch (per device).
    lr
        AdamW learning rate (linear warm-up over 5 % of the steps, then a cosine decay to 5 % of it).
    weight_decay
        AdamW weight decay.
    image_tower_lr_scale
        Factor on the learning rate of the pretrained image tower.
    early_stopping_patience
        Stop after this many epochs without validation improvement (``None`` = never).
    gene_pretrain_epochs
        Epochs of masked value modeling on the count-only spots (and the training spots) before the contrastive stage
        (0 = none; needs ``CoMTIPConfig.mvm_weight > 0``). Not for a corpus.
    readout_epochs
        Epochs of the read-out stage after the contrastive stage: with the image tower fixed, the zero-shot read-out
        (gene encoder, prompt heads, read-out temperatures) trains on the prompt loss alone, on pooled image features
        computed once per tile and dihedral transform (0 = no read-out stage).
    readout_lr
        Learning rate of the read-out stage (``None``: ``lr``).
    readout_refit
        With a validation section: once validation has picked the read-out's best epoch, train the read-out again
        from the same start for that many epochs on the training and validation spots together (the contrastive
        stage keeps its validated weights). Off by default: on HER2ST it raised the plain correlations but not the
        depth-controlled ones (``benchmarks/README.md``). Not for a corpus.
    augment
        Augment the training tiles: a random flip/rotation (one of 8) per spot and epoch, plus colour jitter when the
        tower is not cached (see ``cache_image_features``). Validation scores are always computed on the tiles as
        they are; with ``readout_refit``, the validation spots are augmented like the training spots when the
        read-out is refitted on them.
    cache_image_features
        Compute the frozen part of the image tower once per tile and dihedral transform (``"auto"``: when the tower
        has a frozen part and training runs on the CPU). Colour jitter is then not applied. Not for a corpus.
    num_workers
        DataLoader workers (``None``: :attr:`comtip.settings.num_workers`).
    buffer_size
        Corpus only: spots in the shuffle buffer of the stream.
    n_reference
        Corpus only: training spots kept as the reference bank of retrieval and probe prediction.
    accelerator, devices, num_nodes, strategy
        Lightning's: ``devices=4`` trains with DDP on 4 GPUs; the same call runs under ``torchrun`` or SLURM.
    precision
        Lightning precision (``None``: bf16 mixed precision on GPUs that support it, fp16 mixed on other GPUs, fp32
        on the CPU).
    checkpoint_dir
        Folder for the checkpoints (``<stage>-last.ckpt``, ``<stage>-best.ckpt``); ``None``: a temporary folder,
        deleted at the end.
    resume
        Continue from ``<stage>-last.ckpt`` in ``checkpoint_dir`` when it is there.
    checkpoint_every_n_steps
        Corpus only: also write the checkpoint every that many steps (mid-epoch resume).
    seed
        Seed of everything (initialisation, sampling, augmentation).
    show_progress_bar
        Progress bars (``None``: :attr:`comtip.settings.show_progress_bar`).

    Examples
    --------
    >>> from comtip.train import TrainConfig
    >>> gpu = TrainConfig(max_epochs=50, batch_size=256, accelerator="gpu", devices=4)
    >>> model = ct.tl.pretrain(sdata, training=gpu)
    >>> model = ct.tl.pretrain(sdata, training=gpu, max_epochs=5)  # a keyword overrides the field
    """

    # stages and optimiser
    max_epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    image_tower_lr_scale: float = 0.1
    early_stopping_patience: int | None = None
    gene_pretrain_epochs: int = 0
    readout_epochs: int = 30
    readout_lr: float | None = 1e-3
    readout_refit: bool = False
    # data during training
    augment: bool = True
    cache_image_features: bool | Literal["auto"] = "auto"
    num_workers: int | None = None
    buffer_size: int = 4096
    n_reference: int = 10_000
    # hardware
    accelerator: str = "auto"
    devices: int | str | list[int] = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str | None = None
    # checkpoints and reproducibility
    checkpoint_dir: str | os.PathLike | None = None
    resume: bool = True
    checkpoint_every_n_steps: int | None = None
    seed: int = 0
    show_progress_bar: bool | None = None

    def __post_init__(self) -> None:
        for name in ("max_epochs", "gene_pretrain_epochs", "readout_epochs", "num_nodes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                msg = f"TrainConfig.{name}={value!r} must be an integer >= 0."
                raise ValueError(msg)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            msg = f"TrainConfig.batch_size={self.batch_size!r} must be an integer >= 1 (spots per batch and device)."
            raise ValueError(msg)

    @classmethod
    def fields(cls) -> list[str]:
        """The names of the settings, in order."""
        return [f.name for f in dataclasses.fields(cls)]

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed; an unknown name raises ``TypeError`` naming the known ones.

        Parameters
        ----------
        **changes
            Fields to change.
        """
        unknown = sorted(set(changes) - set(self.fields()))
        if unknown:
            msg = (
                f"Unknown training setting(s) {unknown}: the settings of comtip.train.TrainConfig are "
                f"{', '.join(self.fields())}."
            )
            raise TypeError(msg)
        return dataclasses.replace(self, **changes)
