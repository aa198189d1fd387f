"""The corpus layout on disk: manifest, shard files, deterministic array files, checksums and atomic writes.

A corpus is a folder::

    manifest.json                   what is there (rewritten atomically after every finished shard)
    shards/shard-000000.tiles.npy   uint8 (n, P, P, 3) tiles, raw .npy (read with one pread per tile, or mapped)
    shards/shard-000000.rows.npz    per row: obs_name, sample_id, sample_row, x, y, total_counts, and the raw counts
                                    over the gene union as CSR (indptr, indices, data)
    samples/<sample>.npz            per-sample gene statistics (genes, n_detected, sum, sumsq, n_spots)

``.npz`` files here are zip archives of ``.npy`` members written by :func:`write_npz`: members stored uncompressed, in
a fixed order, with a fixed timestamp, so that the same arrays give the same bytes (``np.savez`` stamps the time).
Stored members can be memory-mapped (:func:`npz_members`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "comtip-corpus"
VERSION = 1
MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
SAMPLES_DIR = "samples"
SHARD_FILES = ("tiles.npy", "rows.npz")  # suffixes of a shard's files, in checksum order
TILES_FORMAT = "npy"  # chosen by benchmarks/corpus_format.py (docs: "Corpora on disk")
TMP_SUFFIX = ".tmp"
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip can hold: no time in the bytes
HASH_BLOCK = 8 << 20


class CorpusError(ValueError):
    """A corpus on disk that cannot be read as its manifest says (missing, truncated or corrupt files), or bad input."""


def shard_name(i: int) -> str:
    """Name of the ``i``-th shard (``shard-000000``)."""
    return f"shard-{i:06d}"


def shard_file(root: Path, name: str, suffix: str) -> Path:
    return root / SHARDS_DIR / f"{name}.{suffix}"


def sample_file_name(sample_id: str) -> str:
    """File name of a sample's statistics: the id where it is a safe file name, else a readable stem + a hash."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", sample_id) and not sample_id.endswith(TMP_SUFFIX):
        return f"{sample_id}.npz"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", sample_id)[:60].strip("._") or "sample"
    return f"{stem}-{hashlib.sha256(sample_id.encode()).hexdigest()[:12]}.npz"


# --- atomic, deterministic writes -----------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes | None = None, *, writer=None) -> None:
    """Write ``path`` through a temporary name in the same folder, fsync, then rename (a reader sees old or new)."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as fh:
        if writer is not None:
            writer(fh)
        else:
            fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Atomic JSON write; the same object gives the same bytes."""
    text = json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode())


def write_npy(path: Path, array: np.ndarray) -> None:
    """Atomic ``.npy`` write (no pickles)."""
    atomic_write_bytes(path, writer=lambda fh: np.save(fh, np.asarray(array, order="C"), allow_pickle=False))


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Atomic, deterministic ``.npz``: members stored (not compressed), sorted by name, with a fixed timestamp."""

    def writer(fh):
        with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED) as zf:
            for key in sorted(arrays):
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.asarray(arrays[key], order="C"), allow_pickle=False)
                info = zipfile.ZipInfo(f"{key}.npy", date_time=ZIP_DATE)
                info.compress_type = zipfile.ZIP_STORED
                info.external_attr = 0o644 << 16
                info.create_system = 3
                zf.writestr(info, buf.getvalue())

    atomic_write_bytes(path, writer=writer)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """All members of an ``.npz`` into memory (no pickles)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _npy_header(fh) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """``(shape, dtype, fortran_order, header_length)`` of the ``.npy`` data starting at ``fh``'s position."""
    start = fh.tell()
    major, _ = np.lib.format.read_magic(fh)
    read = {1: np.lib.format.read_array_header_1_0, 2: np.lib.format.read_array_header_2_0}.get(major)
    if read is None:
        msg = f"unsupported .npy format version {major}"
        raise ValueError(msg)
    shape, fortran, dtype = read(fh)
    return tuple(shape), np.dtype(dtype), bool(fortran), fh.tell() - start


def npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, data offset)`` of a C-ordered ``.npy`` file."""
    with open(path, "rb") as fh:
        shape, dtype, fortran, offset = _npy_header(fh)
    if fortran:
        msg = f"{path.name}: Fortran-ordered arrays are not written by comtip"
        raise ValueError(msg)
    return shape, dtype, offset


def npz_members(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype, int]]:
    """``{name: (shape, dtype, offset of the data in the file)}`` of the stored members of an ``.npz``."""
    out = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as fh:
        for info in zf.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                msg = f"{path.name}: member {info.filename} is compressed; comtip writes stored members"
                raise ValueError(msg)
            fh.seek(info.header_offset)
            local = fh.read(30)
            sig, *_, name_len, extra_len = struct.unpack("<IHHHHHIIIHH", local)
            if sig != 0x04034B50:
                msg = f"{path.name}: bad zip local header for {info.filename}"
                raise ValueError(msg)
            fh.seek(info.header_offset + 30 + name_len + extra_len)
            shape, dtype, fortran, hlen = _npy_header(fh)
            if fortran:
                msg = f"{path.name}: member {info.filename} is Fortran-ordered"
                raise ValueError(msg)
            out[info.filename.removesuffix(".npy")] = (
                shape,
                dtype,
                info.header_offset + 30 + name_len + extra_len + hlen,
            )
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def combine_digests(files: dict[str, dict[str, Any]]) -> str:
    """The shard's sha256: over one line ``"<suffix> <sha256 of the file>"`` per file in :data:`SHARD_FILES` order."""
    text = "".join(f"{suffix} {files[suffix]['sha256']}\n" for suffix in SHARD_FILES)
    return hashlib.sha256(text.encode()).hexdigest()


def new_manifest(*, tile_size_px: int, tile_size_um: float, shard_size: int) -> dict[str, Any]:
    """An empty manifest (the key order is part of the file's bytes)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "tile_size_px": int(tile_size_px),
        "tile_size_um": float(tile_size_um),
        "tiles_format": TILES_FORMAT,
        "shard_size": int(shard_size),
        "n_spots": 0,
        "genes": [],
        "samples": [],
        "shards": [],
    }
