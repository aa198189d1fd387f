"""Preprocessing: spot tiles, expression normalisation, gene panels, gene text (descriptions and embeddings)."""

from .._gene_text import gene_text_table, harmonize_symbols
from ..corpus import write_corpus
from ._expression import candidate_genes, eval_panels, gene_panel, log_depth, log_normalized, value_levels
from ._grid import grid_spots, tissue_mask
from ._text import gene_text, gene_text_embeddings
from ._tiles import spot_tiles

__all__ = [
    "candidate_genes",
    "eval_panels",
    "gene_panel",
    "gene_text",
    "gene_text_embeddings",
    "gene_text_table",
    "grid_spots",
    "harmonize_symbols",
    "log_depth",
    "log_normalized",
    "spot_tiles",
    "tissue_mask",
    "value_levels",
    "write_corpus",
]
