"""The shipped human gene-text table and gene-symbol harmonisation (used by ``io`` and ``pp``)."""

from __future__ import annotations

import functools
from importlib.resources import files

import numpy as np
import pandas as pd

from ._logging import logger

GENE_TEXT_FILE = "gene_text_hs.tsv.gz"


@functools.cache
def gene_text_table() -> pd.DataFrame:
    """The human gene-text table shipped with comtip, indexed by upper-case symbol.

    Columns ``entrez_id, full_name, gene_type, ensembl_ids, aliases, description``; see
    ``comtip/_data/ATTRIBUTION.md`` for its sources and licences.
    """
    path = files("comtip") / "_data" / GENE_TEXT_FILE
    with path.open("rb") as fh:
        df = pd.read_csv(fh, sep="\t", dtype=str, keep_default_na=False, compression="gzip")
    df["symbol"] = df["symbol"].str.upper()
    df = df.drop_duplicates("symbol").set_index("symbol")
    return df


@functools.cache
def _alias_map() -> dict[str, str]:
    """Unambiguous alias -> current symbol (aliases that are themselves current symbols are left out)."""
    df = gene_text_table()
    current = set(df.index)
    pairs: dict[str, set[str]] = {}
    for symbol, aliases in zip(df.index, df["aliases"], strict=True):
        if not aliases:
            continue
        for alias in aliases.upper().split(","):
            if alias and alias not in current:
                pairs.setdefault(alias, set()).add(symbol)
    return {alias: next(iter(s)) for alias, s in pairs.items() if len(s) == 1}


@functools.cache
def _ensembl_map() -> dict[str, str]:
    df = gene_text_table()
    out: dict[str, str] = {}
    for symbol, ids in zip(df.index, df["ensembl_ids"], strict=True):
        for eid in ids.split(","):
            if eid:
                out.setdefault(eid, symbol)
    return out


def looks_human(names: list[str]) -> bool:
    """Whether gene symbols look human (upper case) rather than mouse/rat style (``Gapdh``)."""
    letters = [n for n in names if n[:1].isalpha() and not n.upper().startswith("ENS")]
    if not letters:
        return True
    title = sum(1 for n in letters if n[:1].isupper() and any(c.islower() for c in n[1:]))
    return title < 0.5 * len(letters)


def harmonize_symbols(names: pd.Index | list[str], *, aliases: bool | None = None) -> np.ndarray:
    """Map gene names to current upper-case HGNC symbols.

    Upper-cases every name, strips Ensembl version suffixes, maps human Ensembl IDs and old symbols
    (aliases of exactly one current symbol) to the current symbol and leaves unknown names as they
    are (upper-cased).

    Parameters
    ----------
    names
        Gene names as found in the data.
    aliases
        Map old human symbols through the aliases of the gene-text table. By default only when the
        names look human (upper case): mouse symbols (``Tac2``) are only upper-cased, since a human
        alias of the same spelling may name another gene.

    Returns
    -------
    The harmonised symbol of each name, in order.
    """
    names = [str(n) for n in names]
    table = gene_text_table()
    alias_map = _alias_map() if (aliases if aliases is not None else looks_human(names)) else {}
    ensembl = _ensembl_map()
    out = []
    n_alias = 0
    for name in names:
        up = name.strip().upper()
        if up.startswith("ENSG"):
            up = ensembl.get(up.split(".")[0], up)
        elif up not in table.index and up in alias_map:
            up = alias_map[up]
            n_alias += 1
        out.append(up)
    if n_alias:
        logger.info("mapped %d old gene symbols to current ones through aliases", n_alias)
    return np.asarray(out, dtype=object)


def gene_descriptions(genes: list[str] | pd.Index, *, extra: dict[str, str] | None = None) -> pd.Series:
    """Description sentence of each gene; missing genes are ``NaN``.

    Parameters
    ----------
    genes
        Gene symbols (harmonised on the fly).
    extra
        User-given descriptions that take precedence, ``{symbol: text}``.
    """
    table = gene_text_table()
    symbols = harmonize_symbols(list(genes))
    desc = table["description"].reindex(symbols).to_numpy(dtype=object)
    if extra:
        upper = {k.upper(): v for k, v in extra.items()}
        for i, (g, s) in enumerate(zip(genes, symbols, strict=True)):
            if str(g).upper() in upper:
                desc[i] = upper[str(g).upper()]
            elif s in upper:
                desc[i] = upper[s]
    return pd.Series(desc, index=pd.Index(list(genes), dtype=object), name="description")
