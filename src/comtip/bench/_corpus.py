"""Gene statistics and the gene panel of a corpus, as :func:`comtip.tl.pretrain` chooses them (for the benchmarks)."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd


def gene_statistics(corpus, samples: Sequence[str]) -> pd.DataFrame:
    """Per gene of a corpus's gene union, over ``samples``: spots that measured it, share detected, mean, variance.

    Computed from the per-sample statistics of the manifest, without reading a shard; a gene that a sample did not
    measure does not count for that sample.

    Parameters
    ----------
    corpus
        A :class:`comtip.Corpus` (:func:`comtip.io.read_corpus`).
    samples
        Sample ids to pool.

    Returns
    -------
    DataFrame indexed by gene with ``n_measured``, ``frac_detected``, ``mean`` and ``var``.
    """
    from ..tl._pretrain_corpus import gene_statistics as _gene_statistics

    return _gene_statistics(corpus, samples)


def corpus_panel(stats: pd.DataFrame, *, n_top: int, with_text: set[str] | None = None) -> tuple[list[str], list[str]]:
    """The gene panel :func:`comtip.tl.pretrain` takes from a corpus: candidates by mean and by variance, interleaved.

    Parameters
    ----------
    stats
        From :func:`gene_statistics`.
    n_top
        Panel size.
    with_text
        Keep only these genes (e.g. those of :func:`comtip.pp.gene_text_table`); ``None``: no such filter.

    Returns
    -------
    ``(panel, dropped)``: the panel, and the candidates dropped for not being in ``with_text``.
    """
    from ..tl._pretrain_corpus import corpus_panel as _corpus_panel

    return _corpus_panel(stats, n_top=n_top, with_text=with_text)
