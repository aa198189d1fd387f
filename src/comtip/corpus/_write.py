"""Writing a corpus: samples of SpatialData objects and HEST folders -> tile shards, raw counts, gene statistics."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from .. import _constants as C
from .._logging import logger
from ._format import (
    MANIFEST,
    SAMPLES_DIR,
    SHARD_FILES,
    SHARDS_DIR,
    TMP_SUFFIX,
    CorpusError,
    combine_digests,
    new_manifest,
    sample_file_name,
    sha256_file,
    shard_file,
    shard_name,
    write_json,
    write_npy,
    write_npz,
)
from ._read import Corpus, _load_manifest, check_manifest

log = logger

META_KEYS = ("species", "technology", "organ")
META_COLUMNS = {"species": ("species",), "technology": ("technology", "st_technology"), "organ": ("organ",)}
HEST_META = {"species": "species", "technology": "st_technology", "organ": "organ"}
READ_BATCH = 256  # tiles read per call of the tile reader
_TMP_TILES_KEY = "_comtip_corpus_tiles"


# --- sources ------------------------------------------------------------------------------------------------------
@dataclass
class _Source:
    """One SpatialData (in memory, or a HEST sample read when needed) and what it yields."""

    label: str
    sdata: Any = None
    hest: tuple[Path, str] | None = None
    sample_ids: list[str] = field(default_factory=list)
    _cache: dict[str, Any] = field(default_factory=dict)

    def get(self):
        if self.sdata is not None:
            return self.sdata
        from ..io import hest

        root, sid = self.hest
        # one HEST sample at a time: memory stays that of one sample however large the folder
        return hest(root, [sid])


def _is_hest_root(x) -> bool:
    return isinstance(x, str | os.PathLike) and (Path(x) / "st").is_dir()


def _hest_ids(root: Path) -> list[str]:
    ids = sorted(p.name[: -len(".h5ad")] for p in (root / "st").glob("*.h5ad"))
    if not ids:
        msg = f"HEST folder {str(root)!r} holds no sample (st/*.h5ad). Download HEST-1k samples there first."
        raise CorpusError(msg)
    return ids


def _hest_available() -> bool:
    try:
        from ..io import _hest  # noqa: F401
    except ImportError:  # pragma: no cover - comtip without the HEST reader
        return False
    return True


def _sources(sources, *, table_key: str) -> list[_Source]:
    """Expand ``sources`` into one :class:`_Source` per SpatialData or HEST sample, with their sample ids."""
    from spatialdata import SpatialData

    def is_pair(x) -> bool:
        return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str | os.PathLike) and isinstance(x[1], str)

    if isinstance(sources, SpatialData | str | os.PathLike) or is_pair(sources):
        sources = [sources]
    out: list[_Source] = []
    for i, src in enumerate(sources):
        if isinstance(src, SpatialData):
            table = _table(src, table_key, label=f"source {i}")
            ids = _section_values(table, label=f"source {i}")
            label = f"spatialdata:{src.path}" if src.path is not None else "spatialdata"
            out.append(_Source(label=label, sdata=src, sample_ids=ids))
        elif is_pair(src) or isinstance(src, str | os.PathLike):
            root, sid = (Path(src[0]), src[1]) if is_pair(src) else (Path(src), None)
            if not _hest_available():  # pragma: no cover
                msg = "HEST sources need comtip.io.hest, which this comtip lacks; read the samples into SpatialData first."
                raise CorpusError(msg)
            if not _is_hest_root(root):
                msg = (
                    f"Source {i} ({str(root)!r}) is not a HEST folder (no st/ inside). Pass SpatialData objects, HEST "
                    "folders, or (HEST folder, sample id) pairs."
                )
                raise CorpusError(msg)
            ids = [sid] if sid is not None else _hest_ids(root)
            for s in ids:
                if not (root / "st" / f"{s}.h5ad").is_file():
                    msg = f"HEST sample {s!r} not found: {str(root / 'st' / (s + '.h5ad'))!r} does not exist. Check the id."
                    raise CorpusError(msg)
                out.append(_Source(label=f"hest:{root}", hest=(root, s), sample_ids=[s]))
        else:
            msg = (
                f"Source {i} is a {type(src).__name__}; write_corpus takes SpatialData objects, HEST folders (str or "
                "Path) and (HEST folder, sample id) pairs."
            )
            raise CorpusError(msg)
    seen: dict[str, int] = {}
    for i, s in enumerate(out):
        for sid in s.sample_ids:
            if sid in seen:
                where = "the same source" if seen[sid] == i else f"sources {seen[sid]} and {i}"
                msg = (
                    f"Sample id {sid!r} appears twice ({where}); sample ids must be unique in a corpus. Rename the "
                    f"sections (table.obs[{C.SECTION_KEY!r}]) of one of them."
                )
                raise CorpusError(msg)
            seen[sid] = i
    if not out:
        msg = "No source given: pass SpatialData objects and/or HEST folders."
        raise CorpusError(msg)
    return out


def _table(sdata, table_key: str, *, label: str):
    if table_key not in sdata.tables:
        msg = f"{label}: no table {table_key!r} (tables: {list(sdata.tables) or 'none'}); pass table_key=."
        raise CorpusError(msg)
    return sdata.tables[table_key]


def _section_values(table, *, label: str) -> list[str]:
    if C.SECTION_KEY not in table.obs:
        msg = (
            f"{label}: table has no obs[{C.SECTION_KEY!r}], which names the sample of each spot. Add it (one value per "
            "sample), or read the data with a comtip reader."
        )
        raise CorpusError(msg)
    values = table.obs[C.SECTION_KEY].astype(str).to_numpy()
    ids = list(dict.fromkeys(values))
    if not ids:
        msg = f"{label}: the table has no spots; there is nothing to write."
        raise CorpusError(msg)
    return ids


# --- one sample ---------------------------------------------------------------------------------------------------
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


# --- shards -------------------------------------------------------------------------------------------------------
def _write_shard(root: Path, name: str, tiles: np.ndarray, rows: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Write a shard's files (each through a temporary name, then renamed); ``{suffix: {bytes, sha256}}``."""
    write_npy(shard_file(root, name, "tiles.npy"), tiles)
    write_npz(shard_file(root, name, "rows.npz"), rows)
    files = {}
    for suffix in SHARD_FILES:
        path = shard_file(root, name, suffix)
        files[suffix] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return files


class _TileSource:
    """Reads a sample's tiles (uint8 ``(k, P, P, 3)``) in the reader's chunk-friendly order."""

    def __init__(self, s: _Sample) -> None:
        from ..data._reader import TileReader

        self.reader = TileReader(s.sdata, s.tiles)
        order = self.reader.read_order()
        self.rank = np.empty(len(order), dtype=np.int64)
        self.rank[order] = np.arange(len(order))

    def read(self, a: int, b: int, out: np.ndarray) -> None:
        rows = np.arange(a, b)
        rows = rows[np.argsort(self.rank[rows], kind="stable")]
        for i in range(0, len(rows), READ_BATCH):
            part = rows[i : i + READ_BATCH]
            out[part - a] = self.reader.read(part).permute(0, 2, 3, 1).numpy()


def _sample_entry(s: _Sample, stats_file: str, stats_sha: str) -> dict[str, Any]:
    return {
        "sample_id": s.sample_id,
        "n_spots": 0,
        "complete": False,
        "n_spots_total": s.n,
        "species": s.meta["species"],
        "technology": s.meta["technology"],
        "organ": s.meta["organ"],
        "source": s.source,
        "source_pixel_size_um": s.meta["source_pixel_size_um"],
        "n_genes": len(s.genes),
        "shards": [],
        "stats": stats_file,
        "stats_sha256": stats_sha,
        "fingerprint": s.fingerprint,
    }


def _open_corpus(root: Path, *, mode: str, tile_size_um: float, tile_size_px: int, shard_size: int) -> dict:
    if mode not in ("a", "w"):
        msg = f"mode must be 'a' (append to an existing corpus) or 'w' (replace it), got {mode!r}."
        raise ValueError(msg)
    if (root / MANIFEST).is_file():
        manifest = _load_manifest(root)
        if mode == "w":
            return new_manifest(tile_size_px=tile_size_px, tile_size_um=tile_size_um, shard_size=shard_size)
        check_manifest(manifest, where=repr(str(root)))
        if manifest["tile_size_px"] != int(tile_size_px) or not np.isclose(manifest["tile_size_um"], tile_size_um):
            msg = (
                f"Corpus {str(root)!r} holds tiles of {manifest['tile_size_um']:g} µm at {manifest['tile_size_px']} px; "
                f"appending {tile_size_um:g} µm at {tile_size_px} px would mix pixel sizes. Pass "
                f"tile_size_um={manifest['tile_size_um']:g}, tile_size_px={manifest['tile_size_px']}, or write to a new folder."
            )
            raise CorpusError(msg)
        return manifest
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        msg = (
            f"{str(root)!r} exists and is not a comtip corpus (no {MANIFEST}); write the corpus to a new or empty "
            "folder."
        )
        raise CorpusError(msg)
    return new_manifest(tile_size_px=tile_size_px, tile_size_um=tile_size_um, shard_size=shard_size)


def _clear(root: Path) -> None:
    """Remove a corpus's own files (mode='w'); nothing else in the folder."""
    for sub in (SHARDS_DIR, SAMPLES_DIR):
        if (root / sub).is_dir():
            shutil.rmtree(root / sub)
    (root / MANIFEST).unlink(missing_ok=True)


def _segments(pending: list[tuple[_Source, str, int]], prepare) -> Iterator[tuple[_Sample, int]]:
    for source, sid, start in pending:
        yield prepare(source, sid), start


def write_corpus(
    sources,
    path: str | os.PathLike,
    *,
    tile_size_um: float = C.TILE_SIZE_UM,
    tile_size_px: int = C.TILE_SIZE_PX,
    shard_size: int = 4096,
    table_key: str = C.TABLE_KEY,
    tiles_key: str | None = C.TILES_KEY,
    layer: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    mode: Literal["a", "w"] = "a",
    show_progress_bar: bool | None = None,
) -> Corpus:
    """Write spots' tiles and raw counts to a corpus on disk, in shards, for streaming training.

    One sample is one value of the table's ``obs['section']``. Spots of consecutive samples are packed in order into
    shards of ``shard_size`` spots: tiles as raw uint8 ``.npy`` (``(n, P, P, 3)``), raw counts as sparse rows over the
    union of the samples' harmonised gene symbols, and, per sample, the statistics of its genes. Appending (the
    default) adds new samples in new shards and never rewrites a shard; samples already in the corpus are skipped
    when identical. Each shard is written under a temporary name and renamed, then the manifest is rewritten
    atomically: a killed write leaves a readable corpus of the finished shards, and re-running the same call
    completes it, with the same bytes as an uninterrupted write.

    Parameters
    ----------
    sources
        A SpatialData object (tiles of ``ct.pp.spot_tiles`` or computed here), a HEST-1k folder (all its samples, read
        one at a time with :func:`comtip.io.hest`), a ``(HEST folder, sample id)`` pair, or a list of these.
    path
        The corpus folder (created; a new or empty folder, or an existing corpus).
    tile_size_um
        Physical side of a tile in µm; all tiles of a corpus share it.
    tile_size_px
        Side of a tile in pixels.
    shard_size
        Spots per shard (the last shard of a call holds the rest). 4096 tiles of 224 px are 617 MB.
    table_key
        Table of the spots.
    tiles_key
        Shapes element with the tiles of ``ct.pp.spot_tiles``, used when present (its tile size must match);
        otherwise (or with ``None``) the tiles are computed for the write and not kept in ``sdata``.
    layer
        Layer with the raw counts (default: ``layers['counts']``, else ``X``).
    metadata
        Per-sample ``species``, ``technology``, ``organ``: ``{sample_id: {"species": ...}}`` or one dict for all.
        By default taken from ``obs`` columns ``species``, ``technology`` (or ``st_technology``), ``organ`` when
        constant within the sample, and from HEST's metadata.
    mode
        ``"a"``: append to the corpus at ``path`` (or create it); ``"w"``: replace the corpus there.
    show_progress_bar
        Progress bar over the shards; ``None`` follows :attr:`comtip.settings.show_progress_bar`.

    Returns
    -------
    The written :class:`comtip.Corpus` (as :func:`comtip.io.read_corpus` opens it).

    Raises
    ------
    CorpusError
        Duplicated sample ids; a sample id already in the corpus with other content; a sample without tiles, without
        spots, without any non-zero count, or without raw counts; tiles (or a corpus) of another pixel size; a path
        that is not a corpus; a corpus whose manifest does not match its shards. All checked before anything is
        written.

    Notes
    -----
    Spots without a tile (e.g. HEST spots without a patch) are left out, with a logged warning that counts them. A
    sample's genes (:meth:`comtip.Corpus.sample_genes`) are those with a count above 0 in at least one of its spots:
    a table of several sections zero-fills the genes a section lacks, so "measured" cannot be told from "never
    detected". Sample identity (skip or refuse on append) is judged on counts, genes, spot names, positions and tile
    boxes, not on the pixels.

    Examples
    --------
    >>> sdata = ct.datasets.her2st(sections=["C2", "C3", "C4", "C5", "C6"])
    >>> corpus = ct.pp.write_corpus(sdata, "her2st_corpus/")
    >>> corpus = ct.pp.write_corpus("hest_data/", "her2st_corpus/")  # append HEST samples
    """
    from .._progress import progress

    if int(shard_size) < 1:
        msg = f"shard_size must be at least 1, got {shard_size}."
        raise ValueError(msg)
    if not tile_size_um > 0 or int(tile_size_px) < 8:
        msg = f"tile_size_um must be positive and tile_size_px at least 8, got {tile_size_um} and {tile_size_px}."
        raise ValueError(msg)
    tile_size_um, tile_size_px, shard_size = float(tile_size_um), int(tile_size_px), int(shard_size)
    root = Path(path)
    manifest = _open_corpus(
        root, mode=mode, tile_size_um=tile_size_um, tile_size_px=tile_size_px, shard_size=shard_size
    )
    srcs = _sources(sources, table_key=table_key)

    def prepare(source: _Source, sid: str) -> _Sample:
        return _prepare(
            source,
            sid,
            table_key=table_key,
            tiles_key=tiles_key,
            layer=layer,
            tile_size_um=tile_size_um,
            tile_size_px=tile_size_px,
            metadata=metadata,
        )

    # 1. check every sample before writing anything
    existing = {s["sample_id"]: s for s in manifest["samples"]}
    pending: list[tuple[_Source, str, int]] = []
    n_new = 0
    items = [(src, sid) for src in srcs for sid in src.sample_ids]
    for src, sid in progress(items, desc="checking samples", show=show_progress_bar):
        s = prepare(src, sid)
        old = existing.get(sid)
        if old is not None and old["fingerprint"] != s.fingerprint:
            msg = (
                f"Sample id {sid!r} is already in corpus {str(root)!r} ({old['n_spots_total']} spots from "
                f"{old['source']}) with other content than {s.source}'s sample {sid!r} ({s.n} spots). Sample ids must "
                "be unique: rename this sample's section, or write to another corpus."
            )
            raise CorpusError(msg)
        if old is not None and old["complete"]:
            log.info("sample %s is already in the corpus (identical): skipped", sid)
            continue
        start = 0 if old is None else int(old["n_spots"])
        if old is not None:
            log.info("sample %s: %d of %d spots were written before; resuming", sid, start, s.n)
        pending.append((src, sid, start))
        n_new += s.n - start
        if src.hest is not None:
            src._cache.clear()  # HEST samples are read again when written: memory of one sample at a time
    called = {sid for _, sid in items}
    for sid, old in existing.items():
        if not old["complete"] and sid not in called:
            log.warning(
                "sample %s is incomplete (%d of %d spots; an interrupted write): pass its source again to complete it",
                sid,
                old["n_spots"],
                old["n_spots_total"],
            )

    # 2. write
    if mode == "w":
        _clear(root)
    for sub in (SHARDS_DIR, SAMPLES_DIR):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for tmp in (root / sub).glob(f"*{TMP_SUFFIX}"):  # left by a killed write
            tmp.unlink()
    write_json(root / MANIFEST, manifest)
    if not pending:
        log.info("nothing to add to corpus %s: every sample is already there", root)
        return Corpus(root)

    gene_index = {g: i for i, g in enumerate(manifest["genes"])}
    entries = {s["sample_id"]: s for s in manifest["samples"]}
    n_shards = -(-n_new // shard_size)
    bar = progress(total=n_shards, desc="writing shards", show=show_progress_bar)
    p = tile_size_px
    buf_tiles = np.empty((min(shard_size, n_new), p, p, 3), dtype=np.uint8)
    buf: list[tuple[_Sample, int, int]] = []  # (sample, a, b) segments of the shard being filled
    filled = 0
    columns: dict[str, np.ndarray] = {}
    written_shards = 0

    def flush() -> None:
        nonlocal filled, written_shards
        name = shard_name(len(manifest["shards"]))
        obs = {k: [] for k in ("obs_name", "sample_id", "sample_row", "x", "y", "total_counts")}
        mats, rows_of = [], {}
        for s, a, b in buf:
            obs["obs_name"].append(s.obs_names[a:b])
            obs["sample_id"].append(np.full(b - a, s.sample_id))
            obs["sample_row"].append(np.arange(a, b, dtype=np.int64))
            obs["x"].append(s.x[a:b])
            obs["y"].append(s.y[a:b])
            obs["total_counts"].append(s.total[a:b].astype(np.float32))
            X = s.X[a:b]
            mats.append(
                sparse.csr_matrix((X.data, columns[s.sample_id][X.indices], X.indptr), shape=(b - a, len(gene_index)))
            )
            rows_of[s.sample_id] = [a, b]
        arrays = {k: np.concatenate(v) for k, v in obs.items()}
        arrays["obs_name"] = arrays["obs_name"].astype(str)
        arrays["sample_id"] = arrays["sample_id"].astype(str)
        counts = sparse.vstack(mats, format="csr")
        counts.sort_indices()
        arrays["indptr"] = counts.indptr.astype(np.int64)
        arrays["indices"] = counts.indices.astype(np.int32)
        arrays["data"] = counts.data.astype(np.float32)
        files = _write_shard(root, name, buf_tiles[:filled], arrays)
        manifest["shards"].append(
            {
                "name": name,
                "n_spots": filled,
                "samples": list(rows_of),
                "rows": rows_of,
                "bytes": sum(f["bytes"] for f in files.values()),
                "sha256": combine_digests(files),
                "files": files,
            }
        )
        for s, a, b in buf:
            e = entries[s.sample_id]
            e["n_spots"] += b - a
            e["complete"] = e["n_spots"] == e["n_spots_total"]
            e["shards"].append(name)
        manifest["n_spots"] += filled
        manifest["genes"] = list(gene_index)
        write_json(root / MANIFEST, manifest)
        log.info("wrote %s (%d spots of %s) to %s", name, filled, list(rows_of), root / SHARDS_DIR)
        buf.clear()
        filled = 0
        written_shards += 1
        bar.update(1)

    try:
        for s, start in _segments(pending, prepare):
            for g in s.genes:
                gene_index.setdefault(g, len(gene_index))
            columns[s.sample_id] = np.asarray([gene_index[g] for g in s.genes], dtype=np.int64)
            stats_file = sample_file_name(s.sample_id)
            write_npz(root / SAMPLES_DIR / stats_file, _stats(s, columns[s.sample_id]))
            stats_sha = sha256_file(root / SAMPLES_DIR / stats_file)
            if s.sample_id not in entries:
                entries[s.sample_id] = _sample_entry(s, stats_file, stats_sha)
                manifest["samples"].append(entries[s.sample_id])
            tiles = _TileSource(s)
            a = start
            while a < s.n:
                b = min(s.n, a + shard_size - filled)
                tiles.read(a, b, buf_tiles[filled : filled + b - a])
                buf.append((s, a, b))
                filled += b - a
                a = b
                if filled == shard_size:
                    flush()
            del tiles
            for src, sid, _ in pending:
                if sid == s.sample_id and src.hest is not None:
                    src._cache.clear()
        if filled:
            flush()
    finally:
        bar.close()
    log.info(
        "wrote %d spots of %d samples in %d shards to corpus %s (%d spots, %d samples, %d genes in all)",
        n_new,
        len(pending),
        written_shards,
        root,
        manifest["n_spots"],
        len(manifest["samples"]),
        len(manifest["genes"]),
    )
    return Corpus(root)
