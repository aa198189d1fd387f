"""Lightning Trainer wiring of one training stage: data module, precision, devices, checkpoints, exact resume."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .._logging import logger

LAST = "last.ckpt"


def _freeze_unused(model, module, train, batch_size: int) -> list:
    """Parameters a stage does not train (no gradient on a trial batch) are frozen for it (DDP needs no unused ones).

    Returns the parameters frozen here, to be unfrozen after the stage.
    """
    import torch
    from torch.utils.data import default_collate

    if hasattr(train, "batches"):  # a corpus stream: its first batch
        batch = train.read(next(iter(train.batches(0))), 0)
    else:
        batch = default_collate(train.__getitems__(list(range(min(len(train), max(2, batch_size))))))
    model.zero_grad(set_to_none=True)
    with torch.random.fork_rng():
        module._losses(batch)["loss"].backward()
    frozen = [p for p in model.parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    for p in frozen:
        p.requires_grad_(False)
    return frozen


def default_precision(accelerator: str) -> str:
    """bf16 mixed precision on GPUs that support it, fp16 mixed on other GPUs, fp32 on CPU."""
    import torch

    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def _quiet_lightning(show: bool) -> None:
    level = logging.INFO if logger.getEffectiveLevel() <= logging.INFO else logging.WARNING
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(level)
    import warnings

    # our samplers shard across ranks themselves, and a few workers are deliberate on small data
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*The number of training batches.*")
    # a corpus stream deals its batches to the workers itself, so its length holds with any number of workers
    warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__` defined.*")
    # the frozen part of the image tower is kept in eval mode on purpose (BatchNorm statistics stay ImageNet's)
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


def fit(
    model,
    train,
    val=None,
    *,
    stage: Literal["contrastive", "genes", "readout"] = "contrastive",
    max_epochs: int = 20,
    batch_size: int = 32,
    lr: float = 1e-4,
    weight_decay: float = 0.05,
    image_tower_lr_scale: float = 0.1,
    accelerator: str = "auto",
    devices: int | str | list[int] = "auto",
    num_nodes: int = 1,
    precision: str | None = None,
    strategy: str = "auto",
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    show_progress_bar: bool = True,
    val_genes: np.ndarray | None = None,
    monitor: str | None = "val/pcc_adj",
    restore_best: bool = True,
    early_stopping_patience: int | None = None,
    gradient_clip_val: float | None = 1.0,
    checkpoint_every_n_steps: int | None = None,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place on ``train`` (validating on ``val``) with Lightning; returns a training summary.

    The data go to the Trainer as a :class:`comtip.train.CoMTIPDataModule`. Checkpoints are written by Lightning's
    ``ModelCheckpoint`` through :class:`comtip.train.AtomicCheckpointIO` (temporary file, then rename) to
    ``checkpoint_dir``: ``<stage>-last.ckpt`` at the end of every epoch, with the RNG state and the loss history;
    with ``resume=True`` a run finds it there and continues exactly where it stopped (same data order, augmentation
    and random stream as an uninterrupted run). With a validation set, ``<stage>-best.ckpt`` holds the weights of
    the best epoch by ``monitor`` (:class:`comtip.train.BestCheckpoint`), which are loaded back at the end
    (``restore_best``). The per-epoch history (:class:`comtip.train.EpochHistory`) goes to ``model.history``.

    ``train`` may be a :class:`comtip.data.CorpusStream`; with ``checkpoint_every_n_steps`` the checkpoint is also
    written every that many steps, and a streamed run resumes from it mid-epoch exactly as the uninterrupted run
    would have gone on. ``max_steps`` stops training after that many optimizer steps (the learning-rate schedule
    spans them). The summary holds ``s_per_step``, the median wall time of a training step with the data wait
    included, and, when weights were restored, ``monitor``, ``best_epoch`` and ``best_value``.
    """
    import lightning.pytorch as L
    import torch
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from ._callbacks import AtomicCheckpointIO, BestCheckpoint, EpochHistory, StepTimes
    from ._datamodule import CoMTIPDataModule
    from ._module import CoMTIPModule

    _quiet_lightning(show_progress_bar)
    L.seed_everything(seed, workers=True, verbose=False)
    # a corpus stream's length is its number of batches already
    steps_per_epoch = max(1, len(train) if hasattr(train, "batches") else len(train) // batch_size)
    module = CoMTIPModule(
        model,
        stage=stage,
        lr=lr,
        weight_decay=weight_decay,
        image_tower_lr_scale=image_tower_lr_scale,
        total_steps=min(steps_per_epoch * max_epochs, max_steps or steps_per_epoch * max_epochs),
        val_genes=val_genes,
    )
    data = CoMTIPDataModule(train, val, batch_size=batch_size, num_workers=num_workers, seed=seed)

    tmp = None
    if checkpoint_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="comtip_ckpt_")
        ckpt_dir = Path(tmp.name)
    else:
        ckpt_dir = Path(checkpoint_dir).expanduser()
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    has_val = val is not None and len(val) > 0 and stage in ("contrastive", "readout")
    if not has_val or (monitor == "val/pcc_adj" and val_genes is None):
        monitor = "val/recall5" if has_val else None
    step_times = StepTimes()
    callbacks: list = [EpochHistory(stage), step_times]
    if monitor is not None and early_stopping_patience:
        callbacks.append(
            EarlyStopping(monitor=monitor, mode="max", patience=early_stopping_patience, check_on_train_epoch_end=True)
        )
    best = None
    if monitor is not None and restore_best:
        # before the last checkpoint: the best one of an epoch is on disk before the last one that records it
        best = BestCheckpoint(ckpt_dir, stage=stage, monitor=monitor)
        callbacks.append(best)
    callbacks.append(
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename=f"{stage}-last",
            save_top_k=1,
            every_n_epochs=1,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        )
    )
    if checkpoint_every_n_steps:
        callbacks.append(
            ModelCheckpoint(
                dirpath=ckpt_dir,
                filename=f"{stage}-last",
                save_top_k=1,
                every_n_train_steps=int(checkpoint_every_n_steps),
                save_on_train_epoch_end=False,
                enable_version_counter=False,
            )
        )

    precision = precision or default_precision(accelerator)
    trainer = L.Trainer(
        max_epochs=max_epochs,
        max_steps=int(max_steps) if max_steps else -1,
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=precision,
        logger=False,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=show_progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        log_every_n_steps=max(1, min(50, steps_per_epoch)),
        default_root_dir=ckpt_dir,
        gradient_clip_val=gradient_clip_val,
        # under DDP on GPUs the module converts BatchNorm itself (CoMTIPModule.setup: timm's conversion keeps the
        # activation of BatchNormAct2d, which Lightning's sync_batchnorm=True drops)
        sync_batchnorm=False,
        limit_val_batches=1.0 if has_val else 0,
    )
    ckpt = ckpt_dir / f"{stage}-last.ckpt"
    ckpt_path = str(ckpt) if (resume and ckpt.is_file()) else None
    if ckpt_path:
        logger.warning("resuming %s training from %s", stage, ckpt_path)
    t0 = time.perf_counter()
    frozen = _freeze_unused(model, module, train, batch_size) if stage in ("genes", "readout") else []
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        best_state = best.best_state(trainer) if best is not None else None  # before the temporary folder goes
    finally:
        module.teardown("fit")  # puts back the original BatchNorm layers if a failed DDP run left them converted
        for p in frozen:
            p.requires_grad_(True)
        if tmp is not None:
            tmp.cleanup()
    wall = time.perf_counter() - t0
    summary: dict[str, Any] = {
        "stage": stage,
        "epochs": int(trainer.current_epoch),
        "steps": int(trainer.global_step),
        "wall_s": round(wall, 1),
        "s_per_step": round(float(np.median(step_times.times)), 4) if step_times.times else None,
        "precision": str(precision),
        "accelerator": type(trainer.accelerator).__name__.replace("Accelerator", "").lower(),
        "devices": int(trainer.num_devices),
        "num_nodes": int(num_nodes),
        "batch_size": int(batch_size),
        "lr": lr,
        "weight_decay": weight_decay,
        "seed": int(seed),
        "resumed_from": ckpt_path,
    }
    if best_state is not None:
        module.load_state_dict(best_state)
        epoch, value = best.best_epoch, float(best.best_model_score)
        summary.update({"monitor": monitor, "best_epoch": epoch, "best_value": round(value, 4)})
        logger.info("restored the weights of epoch %d (%s = %.4f)", epoch, monitor, value)
    summary["final_metrics"] = {
        k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if isinstance(v, (torch.Tensor, float))
    }
    summary["is_global_zero"] = bool(trainer.is_global_zero)
    return summary
