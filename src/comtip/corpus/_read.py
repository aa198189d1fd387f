"""Reading a corpus: :class:`Corpus` (the manifest, per-sample gene statistics) and :class:`Shard` (tiles, counts)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from ._format import (
    FORMAT,
    MANIFEST,
    SAMPLES_DIR,
    SHARD_FILES,
    VERSION,
    CorpusError,
    combine_digests,
    npy_layout,
    npz_members,
    sha256_file,
    shard_file,
)

OBS_COLUMNS = ("obs_name", "sample_id", "sample_row", "x", "y", "total_counts")
COUNT_MEMBERS = ("indptr", "indices", "data")
REWRITE = "write it again with ct.pp.write_corpus (same sources, a new folder)"


def _load_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not path.is_dir():
        msg = (
            f"No corpus at {str(path)!r}: the folder does not exist. Write one with ct.pp.write_corpus(sources, path)."
        )
        raise CorpusError(msg)
    if not file.is_file():
        msg = (
            f"No corpus at {str(path)!r}: {MANIFEST} is missing. Point to the folder ct.pp.write_corpus wrote, or "
            "write one there."
        )
        raise CorpusError(msg)
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        msg = f"The manifest of corpus {str(path)!r} cannot be read ({e}); {REWRITE}."
        raise CorpusError(msg) from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        msg = f"{str(file)!r} is not a comtip corpus manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r}, expected {FORMAT!r})."
        raise CorpusError(msg)
    if manifest.get("version") != VERSION:
        msg = (
            f"Corpus {str(path)!r} has format version {manifest.get('version')!r}; this comtip reads version {VERSION}. "
            "Install the comtip version that wrote it, or write the corpus again."
        )
        raise CorpusError(msg)
    return manifest


def check_manifest(manifest: dict[str, Any], *, where: str) -> None:
    """Refuse a manifest whose samples and shards disagree (spot counts, unknown samples, duplicated names)."""
    fix = f"the manifest does not match its shards; {REWRITE}"
    samples = {s["sample_id"]: s for s in manifest["samples"]}
    if len(samples) != len(manifest["samples"]):
        msg = f"Corpus {where}: duplicated sample ids in the manifest; {fix}."
        raise CorpusError(msg)
    names = [sh["name"] for sh in manifest["shards"]]
    if len(set(names)) != len(names):
        msg = f"Corpus {where}: duplicated shard names in the manifest; {fix}."
        raise CorpusError(msg)
    per_sample: dict[str, int] = dict.fromkeys(samples, 0)
    total = 0
    for sh in manifest["shards"]:
        rows = sh.get("rows", {})
        n = 0
        for sid in sh["samples"]:
            if sid not in samples:
                msg = f"Corpus {where}: shard {sh['name']!r} holds sample {sid!r}, which the manifest does not list; {fix}."
                raise CorpusError(msg)
            if sid in rows:
                a, b = rows[sid]
                per_sample[sid] += b - a
                n += b - a
        if rows and n != sh["n_spots"]:
            msg = f"Corpus {where}: shard {sh['name']!r} lists {sh['n_spots']} spots but its rows per sample add up to {n}; {fix}."
            raise CorpusError(msg)
        total += sh["n_spots"]
    if total != manifest["n_spots"]:
        msg = f"Corpus {where}: the manifest says {manifest['n_spots']} spots but its shards hold {total}; {fix}."
        raise CorpusError(msg)
    for sid, s in samples.items():
        if any("rows" in sh for sh in manifest["shards"]) and per_sample[sid] != s["n_spots"]:
            msg = f"Corpus {where}: sample {sid!r} lists {s['n_spots']} spots but its shards hold {per_sample[sid]}; {fix}."
            raise CorpusError(msg)


class Shard:
    """One shard of a corpus: ``n`` spots of one or more consecutive samples, with their tiles and raw counts.

    Opened lazily: nothing is read until :attr:`obs`, :meth:`tiles` or :meth:`counts` is used; file handles are
    opened per process and dropped when pickled (DataLoader workers).

    Attributes
    ----------
    name
        ``"shard-000000"``.
    n
        Number of spots (rows).
    """

    def __init__(self, root: str | os.PathLike, entry: dict[str, Any], *, n_genes: int, tile_size_px: int) -> None:
        self.root = Path(root)
        self.entry = entry
        self.name: str = entry["name"]
        self.n: int = int(entry["n_spots"])
        self.n_genes = int(n_genes)
        self.tile_size_px = int(tile_size_px)
        self._reset()

    def _reset(self) -> None:
        self._fd: int | None = None
        self._pid: int | None = None
        self._tiles_offset: int | None = None
        self._members: dict[str, tuple] | None = None
        self._obs: pd.DataFrame | None = None
        self._csr_cache: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"Shard({self.name!r}, n={self.n}, samples={self.entry['samples']})"

    def __getstate__(self) -> dict[str, Any]:
        return {k: self.__dict__[k] for k in ("root", "entry", "name", "n", "n_genes", "tile_size_px")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Close the tile file (it reopens on the next read)."""
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None and getattr(self, "_pid", None) == os.getpid():
            with contextlib.suppress(OSError):
                os.close(fd)

    @property
    def files(self) -> dict[str, Path]:
        """``{suffix: path}`` of the shard's files."""
        return {suffix: shard_file(self.root, self.name, suffix) for suffix in SHARD_FILES}

    def check_files(self) -> None:
        """Cheap check: every file is there with the size the manifest records (no hashing; see :meth:`Corpus.verify`)."""
        fix = f"the write was interrupted or the files were damaged; re-run the same ct.pp.write_corpus call, or {REWRITE}"
        for suffix, path in self.files.items():
            if not path.is_file():
                msg = f"Shard {self.name!r} of corpus {str(self.root)!r}: file {path.name} is missing; {fix}."
                raise CorpusError(msg)
            want = self.entry.get("files", {}).get(suffix, {}).get("bytes")
            size = path.stat().st_size
            if want is not None and size != want:
                msg = (
                    f"Shard {self.name!r} of corpus {str(self.root)!r}: {path.name} has {size} bytes, the manifest "
                    f"says {want} (truncated or replaced); {fix}."
                )
                raise CorpusError(msg)

    # -- lazy opening --------------------------------------------------------------------------------------------
    def _tile_fd(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self.check_files()
            path = self.files["tiles.npy"]
            try:
                shape, dtype, offset = npy_layout(path)
            except ValueError as e:
                msg = f"Shard {self.name!r}: {path.name} is not a readable .npy file ({e}); {REWRITE}."
                raise CorpusError(msg) from e
            p = self.tile_size_px
            if shape != (self.n, p, p, 3) or dtype != np.uint8:
                msg = (
                    f"Shard {self.name!r}: {path.name} holds {dtype} {shape}, the manifest says uint8 "
                    f"{(self.n, p, p, 3)}; {REWRITE}."
                )
                raise CorpusError(msg)
            if path.stat().st_size != offset + self.n * p * p * 3:
                msg = f"Shard {self.name!r}: {path.name} is truncated ({path.stat().st_size} bytes); {REWRITE}."
                raise CorpusError(msg)
            self._fd = os.open(path, os.O_RDONLY)
            self._pid = os.getpid()
            self._tiles_offset = offset
        return self._fd

    def _rows_members(self) -> dict[str, tuple]:
        if self._members is None:
            self.check_files()
            path = self.files["rows.npz"]
            try:
                members = npz_members(path)
            except (ValueError, OSError, EOFError) as e:
                msg = f"Shard {self.name!r}: {path.name} is not a readable comtip .npz ({e}); {REWRITE}."
                raise CorpusError(msg) from e
            lacking = [k for k in (*OBS_COLUMNS, *COUNT_MEMBERS) if k not in members]
            if lacking:
                msg = f"Shard {self.name!r}: {path.name} lacks {lacking}; {REWRITE}."
                raise CorpusError(msg)
            self._members = members
        return self._members

    def _member(self, key: str) -> np.ndarray:
        shape, dtype, offset = self._rows_members()[key]
        if not int(np.prod(shape)):
            return np.zeros(shape, dtype=dtype)
        return np.memmap(self.files["rows.npz"], dtype=dtype, mode="r", offset=offset, shape=shape)

    def _rows(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n):
            msg = f"Rows of shard {self.name!r} must lie in [0, {self.n}); got {int(rows.min())}..{int(rows.max())}."
            raise IndexError(msg)
        return rows

    # -- reads -------------------------------------------------------------------------------------------------------
    @property
    def obs(self) -> pd.DataFrame:
        """The rows of the shard, one per spot.

        Columns: ``obs_name``, ``sample_id``, ``sample_row`` (row within its sample), ``x``, ``y`` (spot centre in
        the sample's own pixel space; µm per unit: the sample's ``source_pixel_size_um``), ``total_counts`` (float32,
        all genes of the source row).
        """
        if self._obs is None:
            cols = {k: np.asarray(self._member(k)) for k in OBS_COLUMNS}
            if any(len(v) != self.n for v in cols.values()):
                msg = f"Shard {self.name!r}: its rows file does not hold {self.n} rows as the manifest says; {REWRITE}."
                raise CorpusError(msg)
            obs = pd.DataFrame(cols)
            obs["obs_name"] = obs["obs_name"].astype(str)
            obs["sample_id"] = obs["sample_id"].astype(str)
            self._obs = obs
        return self._obs

    def tiles(self, rows) -> np.ndarray:
        """uint8 tiles ``(k, P, P, 3)`` of the given rows, in that order (runs of consecutive rows in one read)."""
        rows = self._rows(rows)
        fd = self._tile_fd()
        p = self.tile_size_px
        size = p * p * 3
        out = np.empty((len(rows), p, p, 3), dtype=np.uint8)
        flat = out.reshape(len(rows), size)
        i = 0
        while i < len(rows):
            j = i + 1
            while j < len(rows) and rows[j] == rows[j - 1] + 1:
                j += 1
            want = (j - i) * size
            got = os.preadv(fd, [flat[i:j]], self._tiles_offset + int(rows[i]) * size)
            if got != want:
                msg = f"Shard {self.name!r}: short read of its tiles ({got} of {want} bytes): the file was truncated; {REWRITE}."
                raise CorpusError(msg)
            i = j
        return out

    def _csr(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._csr_cache is None:
            indptr, indices, data = (self._member(k) for k in COUNT_MEMBERS)
            if len(indptr) != self.n + 1 or int(indptr[-1]) != len(indices) or len(indices) != len(data):
                msg = f"Shard {self.name!r}: its counts do not form {self.n} rows (corrupt rows file); {REWRITE}."
                raise CorpusError(msg)
            self._csr_cache = (np.asarray(indptr), indices, data)
        return self._csr_cache

    def counts(self, rows) -> sparse.csr_matrix:
        """Raw counts of the given rows over the corpus's gene union: CSR float32 ``(k, len(corpus.genes))``."""
        rows = self._rows(rows)
        indptr, indices, data = self._csr()
        starts, stops = indptr[rows], indptr[rows + 1]
        lengths = stops - starts
        out_indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=out_indptr[1:])
        take = np.repeat(starts - out_indptr[:-1], lengths) + np.arange(out_indptr[-1])
        return sparse.csr_matrix(
            (np.asarray(data[take], dtype=np.float32), np.asarray(indices[take]), out_indptr),
            shape=(len(rows), self.n_genes),
        )

    def verify(self) -> None:
        """Re-hash the shard's files against the manifest; :class:`CorpusError` names the file and the fix."""
        self.check_files()
        files = self.entry.get("files", {})
        for suffix, path in self.files.items():
            want = files.get(suffix, {}).get("sha256")
            if want is not None and sha256_file(path) != want:
                msg = (
                    f"Shard {self.name!r} of corpus {str(self.root)!r}: {path.name} does not match its checksum "
                    f"(corrupt); delete it and re-run the same ct.pp.write_corpus call, or {REWRITE}."
                )
                raise CorpusError(msg)
        if files and combine_digests(files) != self.entry["sha256"]:
            msg = f"Shard {self.name!r}: the manifest's checksums disagree with each other; {REWRITE}."
            raise CorpusError(msg)


class Corpus:
    """A corpus of spots on disk, written by :func:`comtip.pp.write_corpus`: tiles, raw counts, per-sample statistics.

    Opening reads the manifest only. Shards open lazily (:meth:`shard`); a ``Corpus`` and its shards pickle without
    open files, for DataLoader workers.

    Parameters
    ----------
    path
        The corpus folder.

    Examples
    --------
    >>> corpus = ct.io.read_corpus("her2st_corpus/")
    >>> shard = corpus.shard(0)
    >>> tiles = shard.tiles([0, 5, 7])  # (3, 224, 224, 3) uint8
    >>> counts = shard.counts([0, 5, 7])  # CSR (3, len(corpus.genes)) raw counts
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.manifest: dict[str, Any] = _load_manifest(self.path)
        check_manifest(self.manifest, where=repr(str(self.path)))
        self._shards: dict[str, Shard] = {}
        self._stats: dict[str, dict[str, Any]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "manifest": self.manifest}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._shards = {}
        self._stats = {}

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"Corpus({str(self.path)!r}): {m['n_spots']} spots of {len(m['samples'])} samples in {len(m['shards'])} "
            f"shards, {len(m['genes'])} genes, tiles {m['tile_size_um']:g} µm at {m['tile_size_px']} px"
        )

    def __len__(self) -> int:
        return self.n_spots

    # -- manifest views ----------------------------------------------------------------------------------------------
    @property
    def genes(self) -> list[str]:
        """The gene union (harmonised symbols); counts columns index into it."""
        return list(self.manifest["genes"])

    @property
    def n_spots(self) -> int:
        return int(self.manifest["n_spots"])

    @property
    def tile_size_px(self) -> int:
        return int(self.manifest["tile_size_px"])

    @property
    def tile_size_um(self) -> float:
        return float(self.manifest["tile_size_um"])

    @property
    def mpp(self) -> float:
        """µm per pixel of the tiles: ``tile_size_um / tile_size_px``."""
        return self.tile_size_um / self.tile_size_px

    @property
    def samples(self) -> pd.DataFrame:
        """One row per sample (index ``sample_id``), in write order.

        Columns: ``n_spots`` (in finished shards), ``complete`` (False while an interrupted write has not finished the
        sample), ``n_spots_total``, ``species``, ``technology``, ``organ``, ``source``, ``source_pixel_size_um``,
        ``n_genes``, ``shards``, ``stats_sha256``, ``fingerprint``.
        """
        rows = [{k: v for k, v in s.items() if k != "stats"} for s in self.manifest["samples"]]
        df = pd.DataFrame(rows)
        if df.empty:
            df = pd.DataFrame(columns=["sample_id", "n_spots", "species", "technology", "organ", "source"])
        return df.set_index("sample_id")

    @property
    def shards(self) -> pd.DataFrame:
        """One row per shard (index ``name``), in order: ``n_spots``, ``samples``, ``bytes``, ``sha256``, ``rows``."""
        rows = [{k: v for k, v in s.items() if k != "files"} for s in self.manifest["shards"]]
        df = pd.DataFrame(rows)
        if df.empty:
            df = pd.DataFrame(columns=["name", "n_spots", "samples", "bytes", "sha256"])
        return df.set_index("name")

    def shard(self, name_or_i: str | int) -> Shard:
        """The shard of that name or position (opened lazily)."""
        entries = self.manifest["shards"]
        if isinstance(name_or_i, int | np.integer):
            if not -len(entries) <= int(name_or_i) < len(entries):
                msg = f"Corpus {str(self.path)!r} has {len(entries)} shards; shard {int(name_or_i)} does not exist."
                raise IndexError(msg)
            entry = entries[int(name_or_i)]
        else:
            entry = next((e for e in entries if e["name"] == name_or_i), None)
            if entry is None:
                msg = f"No shard {name_or_i!r} in corpus {str(self.path)!r} (shards: {[e['name'] for e in entries][:5]}...)."
                raise KeyError(msg)
        shard = self._shards.get(entry["name"])
        if shard is None:
            shard = Shard(self.path, entry, n_genes=len(self.manifest["genes"]), tile_size_px=self.tile_size_px)
            self._shards[entry["name"]] = shard
        return shard

    def _sample_entry(self, sample_id: str) -> dict[str, Any]:
        for s in self.manifest["samples"]:
            if s["sample_id"] == sample_id:
                return s
        msg = f"No sample {sample_id!r} in corpus {str(self.path)!r} (samples: {[s['sample_id'] for s in self.manifest['samples']][:10]})."
        raise KeyError(msg)

    def sample_stats(self, sample_id: str) -> dict[str, Any]:
        """Gene statistics of a sample, over all its spots.

        Returns
        -------
        ``genes`` (int64 indices into :attr:`genes` of the genes detected in the sample, sorted), ``n_detected``
        (int64, spots with count > 0), ``sum`` and ``sumsq`` (float64) of ``log1p(1e4 * count / total_counts)`` per
        gene, and ``n_spots`` (int).
        """
        if sample_id not in self._stats:
            entry = self._sample_entry(sample_id)
            path = self.path / SAMPLES_DIR / entry["stats"]
            fix = f"re-run the same ct.pp.write_corpus call, or {REWRITE}"
            if not path.is_file():
                msg = f"Statistics of sample {sample_id!r} ({SAMPLES_DIR}/{path.name}) are missing from corpus {str(self.path)!r}; {fix}."
                raise CorpusError(msg)
            try:
                z = np.load(path, allow_pickle=False)
                with z:
                    stats = {k: z[k] for k in ("genes", "n_detected", "sum", "sumsq", "n_spots")}
            except (OSError, ValueError, KeyError, EOFError) as e:
                msg = f"Statistics of sample {sample_id!r} ({SAMPLES_DIR}/{path.name}) cannot be read ({e}); {fix}."
                raise CorpusError(msg) from e
            stats["n_spots"] = int(stats["n_spots"])
            self._stats[sample_id] = stats
        return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in self._stats[sample_id].items()}

    def sample_genes(self, sample_id: str) -> np.ndarray:
        """int64 indices into :attr:`genes` of the genes detected in the sample (count > 0 in some spot)."""
        return self.sample_stats(sample_id)["genes"]

    def verify(self, *, show_progress_bar: bool | None = None) -> None:
        """Re-hash every shard (and the statistics files) against the manifest.

        Raises
        ------
        CorpusError
            Naming the first missing, truncated or corrupt file and the fix.
        """
        from .._progress import progress

        for i in progress(range(len(self.manifest["shards"])), desc="verifying shards", show=show_progress_bar):
            self.shard(i).verify()
        for s in self.manifest["samples"]:
            path = self.path / SAMPLES_DIR / s["stats"]
            if not path.is_file() or ("stats_sha256" in s and sha256_file(path) != s["stats_sha256"]):
                msg = (
                    f"Statistics of sample {s['sample_id']!r} ({SAMPLES_DIR}/{path.name}) are missing or corrupt; "
                    f"re-run the same ct.pp.write_corpus call, or {REWRITE}."
                )
                raise CorpusError(msg)


def read_corpus(path: str | os.PathLike) -> Corpus:
    """Open a corpus written by :func:`comtip.pp.write_corpus` (reads the manifest only).

    Parameters
    ----------
    path
        The corpus folder.

    Returns
    -------
    The :class:`comtip.Corpus`.

    Raises
    ------
    CorpusError
        No manifest, another format or version, or a manifest whose samples and shards disagree.
    """
    return Corpus(path)
