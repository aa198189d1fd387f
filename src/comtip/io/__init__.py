"""Readers that return SpatialData: legacy ST folders (HER2ST), Visium, AnnData with ``uns['spatial']``, whole slides.

Every reader puts each section (library, slide) in its own coordinate system, in micrometres.
"""

from ._st import read_st

__all__ = ["read_st"]
