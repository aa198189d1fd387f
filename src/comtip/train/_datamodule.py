"""The LightningDataModule of a training stage: DataLoaders built where the DDP world size and rank are known."""

from __future__ import annotations

import lightning.pytorch as L
import torch


class _StreamLoader(torch.utils.data.DataLoader):
    """The DataLoader of a corpus stream.

    Its position in the epoch travels in the data module's state in the checkpoint (the batches the optimiser has
    stepped on), which is exact whatever Lightning prefetched; these two methods tell Lightning that it resumes
    mid-epoch.
    """

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        return None


class CoMTIPDataModule(L.LightningDataModule):
    """Training and validation data of one stage of :func:`comtip.train.fit`.

    A map-style dataset (a :class:`comtip.data.SpotDataset` or one of its cached-feature views) is served in batches
    by an :class:`comtip.train.EpochSampler` (shuffled per epoch from ``seed``, sharded across DDP ranks); a
    :class:`comtip.data.CorpusStream` shards, batches and orders itself, and its position in the epoch is saved in
    the checkpoint so that a run resumes mid-epoch exactly.

    Parameters
    ----------
    train
        Training data.
    val
        Validation data (``None``: none).
    batch_size
        Samples per batch (per device).
    num_workers
        DataLoader workers (per device).
    seed
        Seed of the sampling order.
    """

    def __init__(self, train, val=None, *, batch_size: int, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.train, self.val = train, val
        self.batch_size, self.num_workers, self.seed = int(batch_size), int(num_workers), int(seed)
        self._train_stream = None
        self._stream_position: tuple[int, int] = (0, 0)

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (int(trainer.world_size), int(trainer.global_rank)) if trainer is not None else (1, 0)

    def _loader(self, dataset, *, shuffle: bool, drop_last: bool):
        from torch.utils.data import DataLoader

        from ..data import worker_init_fn
        from ._data import EpochIndexed, EpochSampler

        world, rank = self._world()
        if hasattr(dataset, "for_rank"):  # a corpus stream: it shards, batches and orders itself
            stream = dataset.for_rank(world, rank)
            if shuffle:
                stream.set_position(*self._stream_position)
                self._train_stream = stream
            return _StreamLoader(
                stream,
                batch_size=None,
                num_workers=self.num_workers,
                worker_init_fn=worker_init_fn if self.num_workers > 0 else None,
                persistent_workers=False,  # each epoch's workers take the stream's position with them
                # its own generator: creating the iterator then draws nothing from the global stream (exact resume)
                generator=torch.Generator().manual_seed(self.seed),
            )
        sampler = EpochSampler(len(dataset), seed=self.seed, shuffle=shuffle, num_replicas=world, rank=rank)
        n_batches_full = len(sampler) // self.batch_size
        return DataLoader(
            EpochIndexed(dataset),
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=drop_last and n_batches_full > 0,
            num_workers=self.num_workers,
            worker_init_fn=worker_init_fn if self.num_workers > 0 else None,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self):
        """The training loader: shuffled, incomplete last batch dropped."""
        return self._loader(self.train, shuffle=True, drop_last=True)

    def val_dataloader(self):
        """The validation loader (in order, every spot), or ``[]`` without validation spots."""
        if self.val is None:
            return []
        return self._loader(self.val, shuffle=False, drop_last=False)

    def start_epoch(self, epoch: int) -> None:
        """A fresh training epoch begins (not the one a resumed run continues): a stream starts at its first batch."""
        if self._train_stream is not None:
            self._train_stream.set_epoch(epoch)

    def state_dict(self) -> dict:
        if self._train_stream is None or self.trainer is None:
            return {}
        # batches of this epoch already trained on (the one being checkpointed included): a resumed run goes on at
        # the next one
        done = int(self.trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        return {"stream": {"epoch": int(self.trainer.current_epoch), "batch": done}}

    def load_state_dict(self, state_dict: dict) -> None:
        pos = state_dict.get("stream")
        if pos is not None:
            self._stream_position = (int(pos["epoch"]), int(pos["batch"]))
