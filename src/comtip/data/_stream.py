"""Spots of a corpus on disk streamed as training batches: split across DDP ranks and DataLoader workers.

Nothing here grows with the corpus: the plan of an epoch is made of (shard, first row, last row) segments, one shard's
row order at a time and a shuffle buffer of fixed size; tiles and counts are read per batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .. import _constants as C
from ._augment import augment as augment_tiles
from ._sentences import gene_sentences


class CorpusStream(IterableDataset):
    """Batches of spots of a :class:`comtip.Corpus`, streamed from its shards.

    Each rank of a DDP run takes an equal, contiguous share of the epoch's stream (shards in a seeded order, the rows
    of each shard in a seeded order), padded by wrapping around as :class:`torch.utils.data.DistributedSampler` does,
    so that every spot is seen once per epoch across all ranks; a shuffle buffer of ``buffer_size`` spots then mixes
    shards and samples. The rank's batches are dealt to the DataLoader workers in turn, so the batches come out in
    the same order whatever the number of workers, and a run resumed at batch ``k`` of an epoch
    (:meth:`set_position`) continues exactly where it stopped.

    A gene of the panel that a sample did not measure is masked (``expr_mask`` False), not read as zero.

    Parameters
    ----------
    corpus
        The corpus (:func:`comtip.io.read_corpus`).
    genes
        The model's gene panel (symbols of ``corpus.genes``).
    samples
        Samples to stream (default: all).
    sentence_length
        L, genes per sentence.
    batch_size
        Spots per batch (per rank).
    shuffle
        Shuffle shards, rows and, through the buffer, samples each epoch.
    buffer_size
        Spots in the shuffle buffer.
    augment
        Random dihedral transform and colour jitter per spot, seeded by (seed, epoch, spot).
    colour_jitter
        Strength of the colour jitter.
    seed
        Seed of the order and the augmentation.
    drop_last
        Drop the last incomplete batch of each rank.
    pad
        Pad each rank's share to the same length by wrapping around (training; DDP needs equal step counts).
    num_replicas, rank
        DDP world size and this rank.
    """

    def __init__(
        self,
        corpus,
        genes: Sequence[str],
        *,
        samples: Sequence[str] | None = None,
        sentence_length: int = 64,
        batch_size: int = 32,
        shuffle: bool = True,
        buffer_size: int = 4096,
        augment: bool = False,
        colour_jitter: float = 0.1,
        seed: int = 0,
        drop_last: bool = False,
        pad: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__()
        self.corpus = corpus
        self.genes = list(genes)
        all_samples = list(corpus.samples.index.astype(str))
        self.samples = all_samples if samples is None else [str(s) for s in samples]
        unknown = [s for s in self.samples if s not in set(all_samples)]
        if unknown:
            msg = f"Samples {unknown[:5]} are not in the corpus at {corpus.path} (it has {all_samples[:10]}...)."
            raise KeyError(msg)
        union = pd.Index(corpus.genes)
        self.columns = union.get_indexer(self.genes)
        if (self.columns < 0).any():
            missing = [g for g, c in zip(self.genes, self.columns, strict=True) if c < 0]
            msg = f"Genes {missing[:5]} of the panel are not in the corpus's gene union; choose the panel from corpus.genes."
            raise KeyError(msg)
        # which panel genes each sample measured (samples x G, small)
        self._sample_pos = {s: i for i, s in enumerate(self.samples)}
        measured = np.zeros((len(self.samples), len(self.genes)), dtype=bool)
        for i, s in enumerate(self.samples):
            measured[i] = np.isin(self.columns, corpus.sample_genes(s))
        self.measured = measured
        self.sentence_length = int(sentence_length)
        self.batch_size = int(batch_size)
        self.shuffle, self.buffer_size = bool(shuffle), max(1, int(buffer_size))
        self.augment, self.colour_jitter, self.seed = bool(augment), float(colour_jitter), int(seed)
        self.drop_last, self.pad = bool(drop_last), bool(pad)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.tile_size_px = int(corpus.tile_size_px)
        self._segments, self._shard_names, self._offsets = self._plan_segments()
        self.n_spots = int(sum(b - a for _, a, b in self._segments))
        if self.n_spots == 0:
            msg = f"No spots of samples {self.samples[:5]} in the corpus at {corpus.path}."
            raise ValueError(msg)
        self.epoch, self.start_batch = 0, 0
        self._shards: dict[int, object] = {}

    # ------------------------------------------------------------------ plan
    def _plan_segments(self) -> tuple[list[tuple[int, int, int]], list[str], np.ndarray]:
        """(shard, start, stop) row ranges of the chosen samples, the shard names and each shard's first global id."""
        wanted = set(self.samples)
        shards = self.corpus.shards
        names = list(shards.index.astype(str))
        counts = shards["n_spots"].to_numpy(dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        segments = []
        for i, name in enumerate(names):
            in_shard = [str(s) for s in shards["samples"].iloc[i]]
            if not wanted.intersection(in_shard):
                continue
            if set(in_shard) <= wanted:
                segments.append((i, 0, int(counts[i])))
                continue
            sample_of_row = self.corpus.shard(name).obs["sample_id"].astype(str).to_numpy()
            keep = np.isin(sample_of_row, list(wanted))
            edges = np.flatnonzero(np.diff(np.concatenate([[0], keep.view(np.int8), [0]])))
            segments.extend((i, int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True))
        return segments, names, offsets

    def for_rank(self, num_replicas: int, rank: int) -> CorpusStream:
        """A copy of this stream for one DDP rank."""
        import copy

        out = copy.copy(self)
        out.num_replicas, out.rank = int(num_replicas), int(rank)
        out._shards = {}
        return out

    @property
    def per_rank(self) -> int:
        """Spots per rank and epoch."""
        if self.pad:
            return math.ceil(self.n_spots / self.num_replicas)
        start, stop = self._rank_range()
        return stop - start

    def _rank_range(self) -> tuple[int, int]:
        if self.pad:
            per = math.ceil(self.n_spots / self.num_replicas)
            return self.rank * per, (self.rank + 1) * per
        edges = np.linspace(0, self.n_spots, self.num_replicas + 1).round().astype(int)
        return int(edges[self.rank]), int(edges[self.rank + 1])

    def __len__(self) -> int:
        """Batches per rank and epoch."""
        n = self.per_rank
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its first batch."""
        self.set_position(epoch, 0)

    def set_position(self, epoch: int, batch: int) -> None:
        """Start at batch ``batch`` of epoch ``epoch`` (a whole epoch done rolls over to the next one)."""
        epoch, batch = int(epoch), int(batch)
        if batch >= len(self) > 0:
            epoch, batch = epoch + 1, 0
        self.epoch, self.start_batch = epoch, batch

    def _epoch_stream(self, epoch: int, skip: int = 0) -> Iterator[tuple[int, int]]:
        """(shard, row) of every spot of the epoch in the epoch's order, from position ``skip``, wrapping around."""
        order = (
            np.random.default_rng([self.seed, epoch]).permutation(len(self._segments))
            if self.shuffle
            else np.arange(len(self._segments))
        )
        skip = int(skip) % self.n_spots
        while True:
            for j in order.tolist():
                shard, a, b = self._segments[j]
                if skip >= b - a:  # skipped without reading anything but the segment's length
                    skip -= b - a
                    continue
                rows = np.arange(a, b)
                if self.shuffle:
                    rows = np.random.default_rng([self.seed, epoch, shard, a]).permutation(rows)
                for r in rows[skip:].tolist():
                    yield shard, r
                skip = 0

    def _rank_items(self, epoch: int) -> Iterator[tuple[int, int]]:
        """The share of this rank of the epoch, through the shuffle buffer."""
        start, stop = self._rank_range()
        stream = self._epoch_stream(epoch, skip=start)
        share = (next(stream) for _ in range(stop - start))
        if not self.shuffle or self.buffer_size <= 1:
            yield from share
            return
        rng = np.random.default_rng([self.seed, epoch, self.rank, 7])
        buffer: list[tuple[int, int]] = []
        for item in share:
            if len(buffer) < self.buffer_size:
                buffer.append(item)
                continue
            j = int(rng.integers(len(buffer)))
            buffer[j], item = item, buffer[j]
            yield item
        for j in rng.permutation(len(buffer)).tolist():
            yield buffer[j]

    def batches(self, epoch: int | None = None) -> Iterator[list[tuple[int, int]]]:
        """The rank's batches of an epoch, as lists of (shard, row) (no reading)."""
        epoch = self.epoch if epoch is None else epoch
        n_batches = len(self)
        batch: list[tuple[int, int]] = []
        k = 0
        for item in self._rank_items(epoch):
            batch.append(item)
            if len(batch) == self.batch_size:
                yield batch
                batch, k = [], k + 1
                if k >= n_batches:
                    return
        if batch and k < n_batches:
            yield batch

    # ------------------------------------------------------------------ reading
    def _shard(self, i: int):
        if i not in self._shards:
            self._shards[i] = self.corpus.shard(self._shard_names[i])
        return self._shards[i]

    def _groups(self, items: Sequence[tuple[int, int]]):
        """(shard, positions in the batch, rows sorted) for each shard a batch touches."""
        n = len(items)
        shard_of = np.fromiter((s for s, _ in items), dtype=np.int64, count=n)
        row_of = np.fromiter((r for _, r in items), dtype=np.int64, count=n)
        for s in np.unique(shard_of):
            pos = np.flatnonzero(shard_of == s)
            srt = np.argsort(row_of[pos], kind="stable")
            yield int(s), pos[srt], row_of[pos[srt]]

    def read_expression(
        self, items: Sequence[tuple[int, int]]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Panel expression (log-normalised), its mask (gene measured by the spot's sample), depth and global ids.

        Reads counts only, no tiles.
        """
        n = len(items)
        expr = np.zeros((n, len(self.genes)), dtype=np.float32)
        mask = np.zeros((n, len(self.genes)), dtype=bool)
        depth = np.zeros(n, dtype=np.float32)
        ids = np.zeros(n, dtype=np.int64)
        for s, pos, rows in self._groups(items):
            shard = self._shard(s)
            counts = shard.counts(rows)[:, self.columns].toarray().astype(np.float32)
            obs = shard.obs.iloc[rows]
            total = obs["total_counts"].to_numpy(dtype=np.float32)
            scale = np.divide(C.TARGET_SUM, total, out=np.zeros_like(total), where=total > 0)
            expr[pos] = np.log1p(counts * scale[:, None])
            depth[pos] = np.log1p(total)
            sample_rows = np.array([self._sample_pos[str(x)] for x in obs["sample_id"].astype(str)], dtype=np.int64)
            mask[pos] = self.measured[sample_rows]
            ids[pos] = self._offsets[s] + rows
        return expr, mask, depth, ids

    def read_tiles(self, items: Sequence[tuple[int, int]]) -> np.ndarray:
        """uint8 tiles ``(n, P, P, 3)`` of these (shard, row) spots, in order."""
        p = self.tile_size_px
        tiles = np.empty((len(items), p, p, 3), dtype=np.uint8)
        for s, pos, rows in self._groups(items):
            tiles[pos] = self._shard(s).tiles(rows)
        return tiles

    def read(self, items: Sequence[tuple[int, int]], epoch: int) -> dict[str, torch.Tensor]:
        """The batch of these (shard, row) spots: tiles, sentences, panel expression and its mask, depth, ids."""
        expr, mask, depth, ids = self.read_expression(items)
        img = torch.from_numpy(self.read_tiles(items)).permute(0, 3, 1, 2).float().div_(255.0)
        if self.augment:
            img = torch.cat(
                [
                    augment_tiles(
                        img[j : j + 1],
                        np.random.default_rng([self.seed, epoch, int(ids[j])]),
                        colour_jitter=self.colour_jitter,
                    )
                    for j in range(len(items))
                ]
            )
        gene_idx, gene_val, gene_mask = gene_sentences(expr, self.sentence_length)
        return {
            "index": torch.from_numpy(ids),
            "image": img.contiguous(),
            "gene_idx": torch.from_numpy(gene_idx),
            "gene_val": torch.from_numpy(gene_val),
            "gene_mask": torch.from_numpy(gene_mask),
            "expr": torch.from_numpy(expr),
            "expr_mask": torch.from_numpy(mask),
            "depth": torch.from_numpy(depth),
        }

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        epoch, start = self.epoch, self.start_batch
        for b, items in enumerate(self.batches(epoch)):
            # batches start, start + 1, ... are dealt to workers 0, 1, ... in turn: the DataLoader's round-robin
            # then returns them in order, also after a resume at batch ``start``
            if b < start or (b - start) % n_workers != worker:
                continue
            yield self.read(items, epoch)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_shards"] = {}  # each worker opens its own
        return state
