"""Lightning parts of a training run: atomic checkpoint writes, the best-epoch checkpoint, the epoch history, step times."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, writing each file atomically: to ``<name>.tmp`` beside it, then :func:`os.replace`.

    A job killed while a checkpoint is being written keeps the previous, complete one. (Lightning's own save stages
    the file in the system's temporary folder and moves it; on a cluster that folder is often another file system,
    where the move is a copy that a kill can cut short.) Remote paths (``s3://`` …) are left to Lightning. Pass it
    as ``L.Trainer(plugins=[AtomicCheckpointIO()])``: every checkpoint the Trainer writes goes through it.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` through a temporary file in the same folder."""
        import fsspec

        fs, _ = fsspec.core.url_to_fs(str(path))
        if storage_options is not None or not isinstance(fs, fsspec.implementations.local.LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


class BestCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint(monitor=..., mode="max", save_top_k=1)`` of the weights of the best validation epoch.

    An epoch whose monitored value is missing or not finite (a NaN correlation) is never the best one (decided
    together by all DDP ranks). After ``trainer.fit``, :meth:`best_state` gives the saved weights (a kept epoch also
    survives a resume: the file and the callback's state are in the checkpoint folder).
    """

    def __init__(self, dirpath, *, stage: str, monitor: str) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=f"{stage}-best",
            monitor=monitor,
            mode="max",
            save_top_k=1,
            save_weights_only=True,
            every_n_epochs=1,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        finite = value is not None and bool(torch.isfinite(torch.as_tensor(value)).all())
        if trainer.strategy.reduce_boolean_decision(finite, all=True):
            super().on_train_epoch_end(trainer, pl_module)

    @property
    def best_epoch(self) -> int | None:
        """Epoch of the kept weights (``None``: none kept)."""
        return getattr(self, "_best_epoch", None) if self.best_model_path else None

    def best_state(self, trainer: L.Trainer) -> dict[str, torch.Tensor] | None:
        """The kept weights of the LightningModule (``None``: none kept); every rank gets rank 0's file."""
        state = None
        if self.best_model_path and trainer.is_global_zero:
            ckpt = torch.load(self.best_model_path, map_location="cpu", weights_only=True)
            state = {"state_dict": ckpt["state_dict"], "epoch": int(ckpt["epoch"])}
        state = trainer.strategy.broadcast(state, src=0)
        if state is None:
            return None
        self._best_epoch = state["epoch"]
        return state["state_dict"]


class EpochHistory(L.Callback):
    """Appends one row per epoch to ``pl_module.model.history``, from ``trainer.callback_metrics``.

    A row holds the stage, the epoch, the global step, the epoch means of the logged ``train/*`` loss parts (as
    ``train_<part>``), the validation metrics (``val_<name>``) and the epoch's wall time (``epoch_s``). It runs before
    the checkpoint callbacks, so a checkpoint holds the history up to its own epoch.
    """

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self._t0 = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        row: dict[str, Any] = {
            "stage": self.stage,
            "epoch": int(trainer.current_epoch),
            "step": int(trainer.global_step),
        }
        row.update({f"train_{k[6:]}": float(v) for k, v in metrics.items() if k.startswith("train/")})
        row.update({k.replace("/", "_"): float(v) for k, v in metrics.items() if k.startswith("val/")})
        row["epoch_s"] = round(time.perf_counter() - self._t0, 2)
        pl_module.model.history.append(row)


class StepTimes(L.Callback):
    """Wall time between the ends of consecutive training steps (data wait included): the step time a user sees."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.times: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.last = None  # validation between epochs is not a training step
