"""Readers that return SpatialData: legacy ST folders (HER2ST), Visium, AnnData with ``uns['spatial']``, whole slides.

Every reader puts each section (library, slide) in its own coordinate system, in micrometres.
"""

from ..corpus import read_corpus
from ._anndata import from_anndata
from ._hest import hest
from ._st import read_st
from ._visium import visium
from ._wsi import wsi

__all__ = ["from_anndata", "hest", "read_corpus", "read_st", "visium", "wsi"]
