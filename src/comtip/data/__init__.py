"""torch Datasets built from SpatialData: batched tile reads, augmentation, gene sentences (no model code here)."""

from .._images import level_arrays
from ._augment import augment, dihedral
from ._dataset import SpotDataset, make_loader, worker_init_fn
from ._reader import TileReader, resize_tiles
from ._sentences import gene_sentences

__all__ = [
    "CorpusStream",
    "SpotDataset",
    "TileReader",
    "augment",
    "dihedral",
    "gene_sentences",
    "level_arrays",
    "make_loader",
    "resize_tiles",
    "worker_init_fn",
]


def __getattr__(name: str):
    # the corpus stream subclasses torch's IterableDataset: imported on first use, so `import comtip` stays light
    if name == "CorpusStream":
        from ._stream import CorpusStream

        return CorpusStream
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
