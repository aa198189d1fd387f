"""Corpora on disk: spots' tiles and raw counts of many samples, in shards, for streaming training.

:func:`write_corpus` (also ``ct.pp.write_corpus``) writes SpatialData objects and HEST-1k samples to a folder;
:func:`read_corpus` (also ``ct.io.read_corpus``) opens it as a :class:`Corpus` (also ``ct.Corpus``), whose
:class:`Shard` objects read tiles and counts by row. Layer: io -> pp -> corpus -> data.
"""

from ._format import CorpusError
from ._read import Corpus, Shard, read_corpus
from ._write import write_corpus

__all__ = ["Corpus", "CorpusError", "Shard", "read_corpus", "write_corpus"]
