"""The LightningModule around :class:`comtip.CoMTIP`: losses, validation metrics, optimiser, RNG state."""

from __future__ import annotations

import math
import warnings
from functools import partial

import lightning.pytorch as L
import numpy as np
import torch

from .._metrics import pearson_depth_adjusted, pearson_per_gene, recall_at_k


def convert_sync_batchnorm(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """Replace every BatchNorm layer of ``model``, in place, by its synchronised variant (for DDP on GPUs).

    Uses :func:`timm.layers.convert_sync_batchnorm`, which turns timm's ``BatchNormAct2d`` (batch norm + activation,
    in EfficientNets) into ``SyncBatchNormAct`` and keeps its activation; PyTorch's and Lightning's
    ``sync_batchnorm=True`` convert it to a plain ``SyncBatchNorm`` and silently drop the activation. Parameters,
    running statistics and train/eval mode are shared with the original layers.

    Returns
    -------
    ``(parent, name, original)`` for every converted layer, to undo the conversion with
    :func:`revert_sync_batchnorm`.
    """
    from timm.layers import convert_sync_batchnorm as timm_convert

    converted = []
    for parent in list(model.modules()):
        if isinstance(parent, torch.nn.modules.batchnorm._BatchNorm):
            continue  # a norm layer's own children (activation, dropout) hold no BatchNorm
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(
                child, torch.nn.SyncBatchNorm
            ):
                parent.add_module(name, timm_convert(child))
                converted.append((parent, name, child))
    return converted


def revert_sync_batchnorm(converted: list[tuple[torch.nn.Module, str, torch.nn.Module]]) -> None:
    """Put back the original layers replaced by :func:`convert_sync_batchnorm`, with the trained state."""
    for parent, name, original in reversed(converted):
        sync = getattr(parent, name)
        if original.affine:
            original.weight, original.bias = sync.weight, sync.bias
        for buf in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(original, buf, getattr(sync, buf))
        original.momentum, original.training = sync.momentum, sync.training
        parent.add_module(name, original)


def _wants_sync_batchnorm(trainer) -> bool:
    """BatchNorm statistics over all ranks' batches: multi-process training on GPUs (SyncBatchNorm has no CPU kernel)."""
    return int(trainer.world_size) > 1 and trainer.strategy.root_device.type == "cuda"


def warmup_cosine(step: int, *, warmup: int, total: int, floor: float = 0.05) -> float:
    """The learning-rate factor of step ``step``: linear warm-up over ``warmup`` steps, then a cosine decay to ``floor``.

    Used through :class:`torch.optim.lr_scheduler.LambdaLR`. (torch's ``LinearLR`` + ``CosineAnnealingLR`` in a
    ``SequentialLR`` give the same curve, but computed recursively: the learning rates then differ in the last bits,
    and so would the trained weights.)
    """
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def _epoch_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the logged loss parts: float64 (exact epoch means, as the history has them), float32 on MPS."""
    return torch.float32 if device.type == "mps" else torch.float64


class CoMTIPModule(L.LightningModule):
    """Trains a CoMTIP model with AdamW and a warm-up + cosine schedule (:func:`warmup_cosine`).

    The data come from a :class:`comtip.train.CoMTIPDataModule` (``trainer.fit(module, datamodule=...)``); the
    per-epoch history from :class:`comtip.train.EpochHistory`, which reads the epoch means of the ``train/*`` loss
    parts logged here.

    Parameters
    ----------
    model
        The :class:`comtip.CoMTIP` to train (updated in place).
    stage
        ``"contrastive"`` (all losses of the config), ``"genes"`` (masked value modeling on gene sentences only) or
        ``"readout"`` (the prompt loss alone on cached pooled image features: the zero-shot read-out).
    lr, weight_decay, image_tower_lr_scale
        Optimiser settings (see :meth:`comtip.CoMTIP.optimizer_param_groups`).
    warmup_fraction
        Share of the steps with a linear warm-up.
    total_steps
        Steps of the whole run (for the cosine schedule).
    val_genes
        Panel indices scored by the zero-shot validation metrics.
    """

    def __init__(
        self,
        model,
        *,
        stage: str = "contrastive",
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        image_tower_lr_scale: float = 0.1,
        warmup_fraction: float = 0.05,
        total_steps: int = 1000,
        val_genes: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.stage = stage
        self.lr, self.weight_decay, self.image_tower_lr_scale = lr, weight_decay, image_tower_lr_scale
        self.warmup_fraction, self.total_steps = warmup_fraction, max(int(total_steps), 1)
        self.val_genes = None if val_genes is None else torch.as_tensor(val_genes, dtype=torch.long)
        self._val: dict[str, list] = {}
        self._sync_bn: list = []
        self._legacy_data = None

    # ------------------------------------------------------------------ data (deprecated: use CoMTIPDataModule)
    def set_data(self, train, val=None, *, batch_size: int, num_workers: int = 0, seed: int = 0) -> None:
        """Deprecated: pass ``datamodule=CoMTIPDataModule(train, val, ...)`` to ``trainer.fit`` instead.

        Parameters
        ----------
        train, val
            Training and validation data.
        batch_size, num_workers, seed
            As in :class:`comtip.train.CoMTIPDataModule`.
        """
        from ._datamodule import CoMTIPDataModule

        warnings.warn(
            "CoMTIPModule.set_data is deprecated and will be removed: pass the data to the Trainer instead, "
            "trainer.fit(module, datamodule=comtip.train.CoMTIPDataModule(train, val, batch_size=...)).",
            DeprecationWarning,
            stacklevel=2,
        )
        data = CoMTIPDataModule(train, val, batch_size=batch_size, num_workers=num_workers, seed=seed)
        self._legacy_data = data

        def hook(name: str):
            def loader():
                data.trainer = self._trainer
                return getattr(data, name)()

            return loader

        # instance attributes: Lightning then takes the module's own loaders, as before
        self.train_dataloader = hook("train_dataloader")
        self.val_dataloader = hook("val_dataloader")

    def _data_module(self):
        trainer = self._trainer
        data = trainer.datamodule if trainer is not None else None
        return data if data is not None else self._legacy_data

    # ------------------------------------------------------------------ DDP BatchNorm
    def setup(self, stage: str) -> None:
        # before the strategy wraps the model in DDP; not Lightning's sync_batchnorm, which drops timm's activations
        if stage == "fit" and not self._sync_bn and _wants_sync_batchnorm(self.trainer):
            self._sync_bn = convert_sync_batchnorm(self.model)

    def teardown(self, stage: str) -> None:
        if self._sync_bn:
            revert_sync_batchnorm(self._sync_bn)
            self._sync_bn = []

    # ------------------------------------------------------------------ training
    def _losses(self, batch: dict) -> dict:
        if self.stage == "genes":
            return self.model.masked_value_losses(batch)
        if self.stage == "readout":
            return self.model.readout_losses(self._with_pooled(batch))
        return self.model.training_losses(batch)

    def _with_pooled(self, batch: dict) -> dict:
        """The batch with the fixed tower's pooled features (streamed tiles: computed here, not cached)."""
        if "pooled" in batch or "image" not in batch:
            return batch
        tower = self.model.image
        was_training = tower.training
        tower.eval()  # the tower is fixed in the read-out stage: BatchNorm statistics stay as they are
        try:
            with torch.no_grad():
                pooled = self.model.image_features(batch["image"])
        finally:
            tower.train(was_training)
        return {**batch, "pooled": pooled}

    def training_step(self, batch: dict, batch_idx: int):
        parts = self._losses(batch)
        n = int(batch["gene_idx"].shape[0])
        # epoch means weighted by batch size, in float64: Lightning's accumulation is then the exact sum of v * n
        dtype = _epoch_dtype(parts["loss"].device)
        self.log_dict(
            {f"train/{k}": v.detach().to(dtype) for k, v in parts.items()},
            on_step=False,
            on_epoch=True,
            batch_size=n,
            sync_dist=True,
        )
        self.log(
            "loss", parts["loss"].detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=n, logger=False
        )
        return parts["loss"]

    def on_train_epoch_start(self) -> None:
        data = self._data_module()
        if data is not None:  # a fresh epoch (not the one a resumed run continues): a stream's first batch
            data.start_epoch(self.current_epoch)

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val = {"img": [], "gene": [], "img_prompt": [], "expr": [], "depth": []}
        self._rng_state = torch.get_rng_state()  # validation does not shift the training random stream

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        n = int(batch["gene_idx"].shape[0])
        parts = self._losses(batch)
        self.log_dict({f"val/{k}": v for k, v in parts.items()}, on_epoch=True, batch_size=n, sync_dist=True)
        if self.stage == "genes":
            return
        m = self.model
        if "pooled" in batch:
            pooled = batch["pooled"]
        else:
            feats = batch["image_prefix"] if "image_prefix" in batch else m.image.forward_prefix(batch["image"])
            pooled = m.image.forward_suffix(feats)[1]
        import torch.nn.functional as F

        self._val["img"].append(F.normalize(m.image_proj(pooled), dim=-1).float().cpu())
        self._val["img_prompt"].append(F.normalize(m._image_prompt_head()(pooled), dim=-1).float().cpu())
        self._val["gene"].append(m.encode_genes(batch["gene_idx"], batch["gene_val"], batch["gene_mask"]).float().cpu())
        if self.val_genes is not None:
            self._val["expr"].append(batch["expr"][:, self.val_genes.to(batch["expr"].device)].float().cpu())
        self._val["depth"].append(batch["depth"].float().cpu())

    def on_validation_epoch_end(self) -> None:
        torch.set_rng_state(self._rng_state)
        if self.stage == "genes" or not self._val.get("img"):
            return
        img = torch.cat(self._val["img"]).numpy()
        gene = torch.cat(self._val["gene"]).numpy()
        metrics = {"val/recall5": recall_at_k(img, gene, 5)}
        if self.val_genes is not None and len(self.val_genes):
            m = self.model
            ids = self.val_genes.to(m.device)
            with torch.no_grad():
                prompts = m.prompt_embeddings(ids)
                pred = m.predict_from_image_embeddings(
                    torch.cat(self._val["img_prompt"]).to(m.device), prompts, m.value_levels[ids], gene_ids=ids
                )
            pred = pred.float().cpu().numpy()
            true = torch.cat(self._val["expr"]).numpy()
            depth = torch.cat(self._val["depth"]).numpy()
            metrics["val/pcc"] = float(np.mean(pearson_per_gene(pred, true)))
            if np.isfinite(depth).all():
                metrics["val/pcc_adj"] = float(np.mean(pearson_depth_adjusted(pred, true, depth)))
        self.log_dict(metrics, prog_bar=True, sync_dist=False)

    # ------------------------------------------------------------------ optimiser
    def configure_optimizers(self):
        groups = self.model.optimizer_param_groups(
            lr=self.lr, weight_decay=self.weight_decay, image_tower_lr_scale=self.image_tower_lr_scale
        )
        opt = torch.optim.AdamW(groups, lr=self.lr, foreach=True)
        warm = max(1, int(self.warmup_fraction * self.total_steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(warmup_cosine, warmup=warm, total=self.total_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_end(self) -> None:
        # DDP keeps parameters in sync; buffers (running statistics) updated by each rank's last batch are
        # broadcast from rank 0 so that every replica ends identical
        if self.trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            for buf in self.model.buffers():
                torch.distributed.broadcast(buf.data, src=0)

    # ------------------------------------------------------------------ exact resume
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["comtip_rng"] = {"torch": torch.get_rng_state()}
        checkpoint["comtip_history"] = list(self.model.history)
        if self._legacy_data is not None and self._legacy_data.state_dict():  # set_data: not saved by Lightning
            checkpoint["comtip_stream"] = self._legacy_data.state_dict()["stream"]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rng = checkpoint.get("comtip_rng")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
        if "comtip_history" in checkpoint:
            self.model.history[:] = checkpoint["comtip_history"]
        data = self._data_module()
        if "comtip_stream" in checkpoint and data is not None:  # set_data, or a checkpoint of comtip <= 0.1
            data.load_state_dict({"stream": checkpoint["comtip_stream"]})
