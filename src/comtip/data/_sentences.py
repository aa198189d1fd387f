"""Gene sentences: a spot's top-L panel genes by normalised expression, as padded index/value/mask arrays."""

from __future__ import annotations

import numpy as np


def gene_sentences(values: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``length`` genes of each row, sorted by value (descending), zeros left out.

    Parameters
    ----------
    values
        ``(n, G)`` log-normalised expression over the gene panel.
    length
        Sentence length L.

    Returns
    -------
    ``gene_idx`` int64 ``(n, L)`` (panel indices, 0 where padded), ``gene_val`` float32 ``(n, L)`` and
    ``gene_mask`` bool ``(n, L)`` (True for real tokens). Ties are broken by panel order.
    """
    values = np.asarray(values, dtype=np.float32)
    n, g = values.shape
    k = min(length, g)
    # stable order: value descending, then panel index
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]
    val = np.take_along_axis(values, order, axis=1)
    mask = val > 0
    idx = np.where(mask, order, 0).astype(np.int64)
    val = np.where(mask, val, 0).astype(np.float32)
    if k < length:
        pad = length - k
        idx = np.pad(idx, ((0, 0), (0, pad)))
        val = np.pad(val, ((0, 0), (0, pad)))
        mask = np.pad(mask, ((0, 0), (0, pad)))
    return idx, val, mask
