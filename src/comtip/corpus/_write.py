"""Writing a corpus: samples of SpatialData objects and HEST folders -> tile shards, raw counts, gene statistics.

The sources are expanded in ``_sources``, each sample is extracted and checked in ``_sample``; this module
packs the samples' spots into shards and keeps the manifest.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
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
from ._sample import _prepare, _Sample, _stats
from ._sources import _Source, _sources

log = logger

READ_BATCH = 256  # tiles read per call of the tile reader


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
