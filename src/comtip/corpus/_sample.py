"""One sample made ready for a corpus: its tiles, harmonised raw counts, metadata, fingerprint and gene statistics."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from .. import _constants as C
from .._logging import logger
from ._format import CorpusError
from ._sources import _section_values, _Source, _table

log = logger

META_KEYS = ("species", "technology", "organ")
META_COLUMNS = {"species": ("species",), "technology": ("technology", "st_technology"), "organ": ("organ",)}
HEST_META = {"species": "species", "technology": "st_technology", "organ": "organ"}
_TMP_TILES_KEY = "_comtip_corpus_tiles"


@dataclass
class _Sample:
    sample_id: str
    source: str
    sdata: Any
    tiles: pd.DataFrame  # one row per spot, in spot order (image, level, x0, y0, size, tile_size_px)
    obs_names: np.ndarray
    x: np.ndarray
    y: np.ndarray
    total: np.ndarray  # float64 total count of the source row
    X: sparse.csr_matrix  # spots x genes (detected genes, harmonised, duplicates summed), float32
    genes: list[str]
    meta: dict[str, Any]
    fingerprint: str = ""

    @property
    def n(self) -> int:
        return len(self.obs_names)


def _tiles_element(
    sdata, cache: dict, *, tiles_key: str | None, table_key: str, tile_size_um: float, tile_size_px: int
):
    """``(frame, transformations)`` of the tiles: the ``tiles_key`` element when present, else computed (not kept)."""
    if "tiles" in cache:
        return cache["tiles"]
    from spatialdata.transformations import get_transformation

    if tiles_key is not None and tiles_key in sdata.shapes:
        element = sdata.shapes[tiles_key]
    else:
        from ..pp._tiles import spot_tiles

        key = _TMP_TILES_KEY
        while key in sdata.shapes:
            key += "_"
        try:
            spot_tiles(sdata, tile_size_um=tile_size_um, tile_size_px=tile_size_px, table_key=table_key, key_added=key)
        except ValueError as e:
            msg = f"The tiles of {list(cache.get('ids', []))[:5]} cannot be computed: {e}"
            raise CorpusError(msg) from e
        element = sdata.shapes[key]
        del sdata.shapes[key]
    frame = pd.DataFrame(element.drop(columns="geometry"))
    bounds = element.geometry.bounds
    frame["cx"] = ((bounds["minx"] + bounds["maxx"]) / 2).to_numpy()
    frame["cy"] = ((bounds["miny"] + bounds["maxy"]) / 2).to_numpy()
    frame["obs_name"] = frame["obs_name"].astype(str)
    frame = frame.drop_duplicates("obs_name").set_index("obs_name")
    cache["tiles"] = (frame, get_transformation(element, get_all=True))
    return cache["tiles"]


def _pixel_size_um(sdata, transforms: dict, regions: Sequence[str]) -> float | None:
    """µm per unit of the tiles' own coordinates (the space of ``x``, ``y``), through a µm coordinate system."""
    from spatialdata.transformations import get_transformation

    from .._spatial import affine_matrix, get_units, pixel_size

    cs_regions: set[str] = set()
    for r in regions:
        if r in sdata.shapes:
            cs_regions |= set(get_transformation(sdata.shapes[r], get_all=True))
    for cs in sorted(transforms):
        if get_units(sdata, cs) == "um" and (cs in cs_regions or len(transforms) == 1):
            return float(pixel_size(affine_matrix(transforms[cs])))
    return None


def _meta(sdata, obs: pd.DataFrame, sample_id: str, metadata) -> dict[str, Any]:
    out: dict[str, Any] = dict.fromkeys(META_KEYS)
    hest_meta = sdata.attrs.get(C.ATTRS_KEY, {}).get("hest", {}).get(sample_id, {})
    for key in META_KEYS:
        v = hest_meta.get(HEST_META[key])
        if isinstance(v, str) and v:
            out[key] = v
        for col in META_COLUMNS[key]:
            if col in obs:
                vals = obs[col].dropna().astype(str).unique()
                if len(vals) == 1:
                    out[key] = str(vals[0])
                    break
    if metadata:
        given = metadata.get(sample_id, metadata) if isinstance(metadata, Mapping) else None
        if isinstance(given, Mapping):
            for key, v in given.items():
                if key in META_KEYS:
                    out[key] = None if v is None else str(v)
    return out


def _fingerprint(s: _Sample, tile_size_um: float, tile_size_px: int) -> str:
    """Content identity of a sample (counts, genes, spot names and positions, tile boxes; not the pixels)."""
    h = hashlib.sha256(b"comtip-corpus-sample-v1\n")
    h.update(json.dumps([s.sample_id, s.genes, float(tile_size_um), int(tile_size_px)]).encode())
    X = s.X
    for a in (X.indptr.astype(np.int64), X.indices.astype(np.int32), X.data.astype(np.float32), s.x, s.y):
        h.update(np.ascontiguousarray(a).tobytes())
    h.update("\n".join(s.obs_names).encode())
    t = s.tiles
    h.update("\n".join(t["image"].astype(str)).encode())
    for col in ("level", "x0", "y0", "size"):
        h.update(t[col].to_numpy(np.int64).tobytes())
    return h.hexdigest()


def _prepare(
    source: _Source,
    sample_id: str,
    *,
    table_key: str,
    tiles_key: str | None,
    layer: str | None,
    tile_size_um: float,
    tile_size_px: int,
    metadata,
) -> _Sample:
    """Extract one sample and check it; raises :class:`CorpusError` naming the sample and the fix."""
    from .._checks import check_counts
    from .._gene_text import harmonize_symbols
    from ..pp._expression import _counts_matrix

    cache = source._cache
    sdata = cache.get("sdata")
    if sdata is None:
        sdata = source.get()
        if source.hest is None:
            cache["sdata"] = sdata
    table = _table(sdata, table_key, label=f"Sample {sample_id!r}")
    if C.SECTION_KEY not in table.obs:
        _section_values(table, label=f"Sample {sample_id!r}")
    mask = (table.obs[C.SECTION_KEY].astype(str) == sample_id).to_numpy()
    if not mask.any():
        msg = f"Sample {sample_id!r} has no spots in table {table_key!r} of {source.label}."
        raise CorpusError(msg)
    cache.setdefault("ids", source.sample_ids)
    frame, transforms = _tiles_element(
        sdata, cache, tiles_key=tiles_key, table_key=table_key, tile_size_um=tile_size_um, tile_size_px=tile_size_px
    )
    sub = table[mask]
    obs_names = sub.obs_names.astype(str).to_numpy()
    pos = frame.index.get_indexer(obs_names)
    have = pos >= 0
    if not have.any():
        msg = (
            f"Sample {sample_id!r} has no tiles (its spots lie on no image: a count-only section?); compute them with "
            "ct.pp.spot_tiles (the spots must lie on an H&E image), or leave the sample out."
        )
        raise CorpusError(msg)
    if not have.all():
        log.warning(
            "sample %s: %d of %d spots have no tile (e.g. %s) and are left out of the corpus",
            sample_id,
            int((~have).sum()),
            len(have),
            list(obs_names[~have][:3]),
        )
        sub, obs_names, pos = sub[have], obs_names[have], pos[have]
    X, is_counts = _counts_matrix(sub, layer)
    if not is_counts:
        msg = (
            f"Sample {sample_id!r}: its table holds no raw counts (X is log-normalised and there is no "
            f"layers[{C.COUNTS_LAYER!r}]); a corpus stores raw counts. Pass layer= with the raw counts."
        )
        raise CorpusError(msg)
    X = sparse.csr_matrix(X, dtype=np.float32)
    X.sum_duplicates()
    X.sort_indices()
    try:
        check_counts(X, element=f"sample {sample_id!r}")
    except ValueError as e:
        raise CorpusError(str(e)) from e
    if "symbols" not in cache:
        cache["symbols"] = harmonize_symbols(list(table.var_names))
    symbols = cache["symbols"]
    total = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    detected = np.flatnonzero(np.asarray((X > 0).sum(axis=0)).ravel() > 0)
    if not len(detected):
        msg = (
            f"Sample {sample_id!r} has no gene with a count above 0 in any of its {sub.n_obs} spots: nothing to "
            "learn from. Check the layer (pass layer= with the raw counts) or leave the sample out."
        )
        raise CorpusError(msg)
    codes, genes = pd.factorize(pd.Index(symbols[detected]), sort=False)
    agg = sparse.csr_matrix(
        (np.ones(len(codes), dtype=np.float32), (np.arange(len(codes)), codes)), shape=(len(codes), len(genes))
    )
    Xs = (X[:, detected] @ agg).tocsr()
    Xs.sum_duplicates()
    Xs.sort_indices()
    Xs.eliminate_zeros()

    tiles = frame.iloc[pos].reset_index()
    um, px = tiles["tile_size_um"].to_numpy(float), tiles["tile_size_px"].to_numpy(np.int64)
    if not (np.allclose(um, tile_size_um, rtol=1e-6) and (px == tile_size_px).all()):
        msg = (
            f"Sample {sample_id!r} has tiles of {um[0]:g} µm at {int(px[0])} px, the corpus takes "
            f"{tile_size_um:g} µm at {tile_size_px} px: every tile of a corpus has the same pixel size. Pass "
            f"tile_size_um={um[0]:g}, tile_size_px={int(px[0])} to write a corpus of those (a new folder), or recompute "
            f"the tiles: ct.pp.spot_tiles(sdata, tile_size_um={tile_size_um:g}, tile_size_px={tile_size_px}, overwrite=True)."
        )
        raise CorpusError(msg)
    regions = list(dict.fromkeys(tiles["region"].astype(str))) if "region" in tiles else []
    meta = _meta(sdata, sub.obs, sample_id, metadata)
    meta["source_pixel_size_um"] = _pixel_size_um(sdata, transforms, regions)
    s = _Sample(
        sample_id=sample_id,
        source=source.label,
        sdata=sdata,
        tiles=tiles,
        obs_names=obs_names,
        x=tiles["cx"].to_numpy(np.float64),
        y=tiles["cy"].to_numpy(np.float64),
        total=total,
        X=Xs,
        genes=[str(g) for g in genes],
        meta=meta,
    )
    s.fingerprint = _fingerprint(s, tile_size_um, tile_size_px)
    return s


def _stats(s: _Sample, columns: np.ndarray) -> dict[str, np.ndarray]:
    """Per-gene statistics of a sample over all its spots, genes as indices into the union (sorted)."""
    X = s.X.astype(np.float64)
    scale = np.divide(C.TARGET_SUM, s.total, out=np.zeros_like(s.total), where=s.total > 0)
    Xn = sparse.csr_matrix(sparse.diags(scale) @ X)
    Xn.data = np.log1p(Xn.data)
    order = np.argsort(columns, kind="stable")
    n_detected = np.asarray((s.X > 0).sum(axis=0)).ravel().astype(np.int64)
    return {
        "genes": columns[order].astype(np.int64),
        "n_detected": n_detected[order],
        "sum": np.asarray(Xn.sum(axis=0)).ravel()[order],
        "sumsq": np.asarray(Xn.multiply(Xn).sum(axis=0)).ravel()[order],
        "n_spots": np.asarray(s.n, dtype=np.int64),
    }
