"""The LightningModule around :class:`comtip.CoMTIP`: losses, validation metrics, optimiser, RNG state."""

from __future__ import annotations

import math
import time
from typing import Any

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


class _StreamLoader(torch.utils.data.DataLoader):
    """The DataLoader of a corpus stream.

    Its position in the epoch travels in the module's checkpoint (``comtip_stream``: the batches the optimiser has
    stepped on), which is exact whatever Lightning prefetched; these two methods tell Lightning that it resumes
    mid-epoch.
    """

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        return None


class _DataHooks:
    """DataLoaders built inside the Lightning run, where the DDP world size and rank are known."""

    def set_data(self, train, val=None, *, batch_size: int, num_workers: int = 0, seed: int = 0) -> None:
        self._train_ds, self._val_ds = train, val
        self._batch_size, self._num_workers, self._seed = int(batch_size), int(num_workers), int(seed)

    def _loader(self, dataset, *, shuffle: bool, drop_last: bool):
        from torch.utils.data import DataLoader

        from ..data import worker_init_fn
        from ._data import EpochIndexed, EpochSampler

        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self._trainer is not None else (1, 0)
        if hasattr(dataset, "for_rank"):  # a corpus stream: it shards, batches and orders itself
            stream = dataset.for_rank(world, rank)
            if shuffle:
                stream.set_position(*getattr(self, "_stream_position", (0, 0)))
                self._train_stream = stream
            return _StreamLoader(
                stream,
                batch_size=None,
                num_workers=self._num_workers,
                worker_init_fn=worker_init_fn if self._num_workers > 0 else None,
                persistent_workers=False,  # each epoch's workers take the stream's position with them
                # its own generator: creating the iterator then draws nothing from the global stream (exact resume)
                generator=torch.Generator().manual_seed(self._seed),
            )
        sampler = EpochSampler(len(dataset), seed=self._seed, shuffle=shuffle, num_replicas=world, rank=rank)
        n_batches_full = len(sampler) // self._batch_size
        return DataLoader(
            EpochIndexed(dataset),
            batch_size=self._batch_size,
            sampler=sampler,
            drop_last=drop_last and n_batches_full > 0,
            num_workers=self._num_workers,
            worker_init_fn=worker_init_fn if self._num_workers > 0 else None,
            persistent_workers=self._num_workers > 0,
            generator=torch.Generator().manual_seed(self._seed),
        )

    def train_dataloader(self):
        return self._loader(self._train_ds, shuffle=True, drop_last=True)

    def val_dataloader(self):
        if self._val_ds is None:
            return []
        return self._loader(self._val_ds, shuffle=False, drop_last=False)


class _BestWeights(L.Callback):
    """Keeps the weights of the best validation epoch (by ``monitor``), in memory and in checkpoints."""

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        self.best: tuple[float, int, dict] | None = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        if np.isfinite(value) and (self.best is None or value > self.best[0]):
            state = {k: v.detach().cpu().clone() for k, v in pl_module.model.state_dict().items()}
            self.best = (value, int(trainer.current_epoch), state)

    def state_dict(self) -> dict:
        return {} if self.best is None else {"value": self.best[0], "epoch": self.best[1], "state": self.best[2]}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            self.best = (state_dict["value"], state_dict["epoch"], state_dict["state"])


class _StepTimes(L.Callback):
    """Wall time between the ends of consecutive training steps (data wait included): the step time a user sees."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.times: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.last = None  # validation between epochs is not a training step


class CoMTIPModule(_DataHooks, L.LightningModule):
    """Trains a CoMTIP model with AdamW and a warm-up + cosine schedule.

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
        self._train_sums: dict[str, float] = {}
        self._train_n = 0
        self._epoch_t0 = time.perf_counter()
        self._sync_bn: list = []

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
        self.log_dict(
            {f"train/{k}": v.detach() for k, v in parts.items()},
            on_step=False,
            on_epoch=True,
            batch_size=n,
            sync_dist=True,
        )
        self.log(
            "loss", parts["loss"].detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=n, logger=False
        )
        for k, v in parts.items():
            self._train_sums[k] = self._train_sums.get(k, 0.0) + float(v.detach()) * n
        self._train_n += n
        return parts["loss"]

    def on_train_epoch_start(self) -> None:
        stream = getattr(self, "_train_stream", None)
        if stream is not None:  # a fresh epoch (not the one a resumed run continues): its first batch
            stream.set_epoch(self.current_epoch)
        self._train_sums, self._train_n = {}, 0
        self._epoch_t0 = time.perf_counter()

    def on_train_epoch_end(self) -> None:
        entry: dict[str, Any] = {"stage": self.stage, "epoch": int(self.current_epoch), "step": int(self.global_step)}
        entry.update({f"train_{k}": v / max(self._train_n, 1) for k, v in self._train_sums.items()})
        entry.update(
            {k.replace("/", "_"): float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")}
        )
        entry["epoch_s"] = round(time.perf_counter() - self._epoch_t0, 2)
        self.model.history.append(entry)

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
        total = self.total_steps

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            t = min(1.0, (step - warm) / max(1, total - warm))
            return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
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
        if getattr(self, "_train_stream", None) is not None:
            # batches of this epoch already trained on (the one being checkpointed included): a streamed run
            # resumes at the next one
            done = int(self.trainer.fit_loop.epoch_loop.batch_progress.current.processed)
            checkpoint["comtip_stream"] = {"epoch": int(self.current_epoch), "batch": done}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rng = checkpoint.get("comtip_rng")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
        if "comtip_history" in checkpoint:
            self.model.history[:] = checkpoint["comtip_history"]
        if "comtip_stream" in checkpoint:
            pos = checkpoint["comtip_stream"]
            self._stream_position = (int(pos["epoch"]), int(pos["batch"]))
