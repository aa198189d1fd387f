"""torch Datasets built from SpatialData: batched tile reads, augmentation, gene sentences (no model code here)."""

from ._augment import augment, dihedral
from ._dataset import SpotDataset, make_loader, worker_init_fn
from ._reader import TileReader
from ._sentences import gene_sentences

__all__ = ["SpotDataset", "TileReader", "augment", "dihedral", "gene_sentences", "make_loader", "worker_init_fn"]
