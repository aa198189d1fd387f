"""Tile-shard formats for a corpus on disk: write speed, random-batch read speed, size, and byte-identical rewrites.

Real HER2ST tiles (C2–C6, 112 µm at 224 px, ~910 tiles), repeated under random flips/rotations to ``--n-tiles``,
written in shards of ``--shard-size`` tiles in each candidate format:

- ``npy``: one raw uncompressed ``.npy`` per shard (uint8 ``(n, P, P, 3)``), read through a memory map;
- ``npy_pread``: the same files, read with one ``pread`` per tile (no memory map);
- ``zarr_zstd``: one zarr v3 array per shard, one chunk per tile, zstd (level 3), all chunks in one zarr shard file;
- ``hdf5_lzf``: one HDF5 file per shard (h5py), one chunk per tile, LZF (h5py's built-in fast codec),
  ``track_times=False``;
- ``tar_png``: a WebDataset-style tar of lossless PNG tiles per shard (``mtime=0``), read at random through an
  index of member offsets.

For each: write tiles/s, random-batch read tiles/s (batches of 32 random rows of one random shard) with the files in
the page cache (``warm``) and evicted from it before every batch (``cold``: ``posix_fadvise(DONTNEED)``, as a corpus
larger than memory reads), sequential read tiles/s (whole shards), bytes per tile, whether two writes of the same
tiles are byte-identical, and whether the tiles read back equal the ones written.

Usage: python benchmarks/corpus_format.py [--data-dir D] [--n-tiles 4096] [--shard-size 1024] [--json OUT]
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import Timer, emit, machine, peak_rss_mb


# --- formats ---------------------------------------------------------------------------------------------------
class Npy:
    name = "npy"

    def write(self, tiles: np.ndarray, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, tiles, allow_pickle=False)
        os.replace(tmp, path.with_suffix(".npy"))

    def open(self, path: Path):
        return np.load(path.with_suffix(".npy"), mmap_mode="r")

    def read(self, handle, rows: np.ndarray) -> np.ndarray:
        return handle[rows]

    def close(self, handle) -> None:
        handle._mmap.close()  # unmap, so that evicted pages are really read again

    def files(self, path: Path) -> list[Path]:
        return [path.with_suffix(".npy")]


class NpyPread(Npy):
    """The same ``.npy`` files, read with one ``pread`` per tile into the output (no memory map)."""

    name = "npy_pread"

    def open(self, path: Path):
        f = path.with_suffix(".npy")
        with open(f, "rb") as fh:
            major, _ = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, _ = read_header(fh)
            offset = fh.tell()
        return os.open(f, os.O_RDONLY), offset, shape

    def read(self, handle, rows: np.ndarray) -> np.ndarray:
        fd, offset, shape = handle
        out = np.empty((len(rows), *shape[1:]), dtype=np.uint8)
        size = out[0].nbytes
        for i, r in enumerate(rows):
            os.preadv(fd, [out[i]], offset + int(r) * size)
        return out

    def close(self, handle) -> None:
        os.close(handle[0])


class ZarrZstd:
    name = "zarr_zstd"

    def write(self, tiles: np.ndarray, path: Path) -> None:
        import zarr
        from zarr.codecs import ZstdCodec

        n, p = tiles.shape[0], tiles.shape[1]
        arr = zarr.create_array(
            store=str(path.with_suffix(".zarr")),
            shape=tiles.shape,
            chunks=(1, p, p, 3),
            shards=(n, p, p, 3),
            dtype="uint8",
            compressors=ZstdCodec(level=3),
            zarr_format=3,
            overwrite=True,
        )
        arr[:] = tiles

    def open(self, path: Path):
        import zarr

        return zarr.open_array(str(path.with_suffix(".zarr")), mode="r")

    def read(self, handle, rows: np.ndarray) -> np.ndarray:
        # one chunk per call: get_orthogonal_selection over a sharded array measured ~10x slower (56 vs 650 tiles/s)
        return np.stack([handle[int(r)] for r in rows])

    def close(self, handle) -> None:
        pass

    def files(self, path: Path) -> list[Path]:
        return sorted(p for p in path.with_suffix(".zarr").rglob("*") if p.is_file())


class Hdf5Lzf:
    name = "hdf5_lzf"

    def write(self, tiles: np.ndarray, path: Path) -> None:
        import h5py

        p = tiles.shape[1]
        with h5py.File(path.with_suffix(".h5"), "w") as f:
            f.create_dataset("tiles", data=tiles, chunks=(1, p, p, 3), compression="lzf", track_times=False)

    def open(self, path: Path):
        import h5py

        return h5py.File(path.with_suffix(".h5"), "r")["tiles"]

    def read(self, handle, rows: np.ndarray) -> np.ndarray:
        # one chunk per call: h5py's fancy indexing (ds[list]) measured ~150x slower (68 vs 10k tiles/s)
        return np.stack([handle[int(r)] for r in rows])

    def close(self, handle) -> None:
        handle.file.close()

    def files(self, path: Path) -> list[Path]:
        return [path.with_suffix(".h5")]


class TarPng:
    name = "tar_png"

    def write(self, tiles: np.ndarray, path: Path) -> None:
        from PIL import Image

        index = []
        with tarfile.open(path.with_suffix(".tar"), "w", format=tarfile.USTAR_FORMAT) as tar:
            for i, t in enumerate(tiles):
                buf = io.BytesIO()
                Image.fromarray(t).save(buf, format="PNG", compress_level=1)
                data = buf.getvalue()
                info = tarfile.TarInfo(f"{i:06d}.png")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                index.append((tar.offset + tarfile.BLOCKSIZE, len(data)))  # one 512-byte USTAR header per member
                tar.addfile(info, io.BytesIO(data))
        np.save(path.with_suffix(".idx.npy"), np.asarray(index, dtype=np.int64))

    def open(self, path: Path):
        return open(path.with_suffix(".tar"), "rb"), np.load(path.with_suffix(".idx.npy"))

    def read(self, handle, rows: np.ndarray) -> np.ndarray:
        from PIL import Image

        fh, index = handle
        out = []
        for r in rows:
            off, size = index[r]
            fh.seek(off)
            out.append(np.asarray(Image.open(io.BytesIO(fh.read(size))).convert("RGB")))
        return np.stack(out)

    def close(self, handle) -> None:
        handle[0].close()

    def files(self, path: Path) -> list[Path]:
        return [path.with_suffix(".tar"), path.with_suffix(".idx.npy")]


FORMATS = {f.name: f for f in (Npy(), NpyPread(), ZarrZstd(), Hdf5Lzf(), TarPng())}


# --- measurement ---------------------------------------------------------------------------------------------------
def _evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (advisory; Linux honours it for clean pages)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _write_all(fmt, shards: list[np.ndarray], folder: Path) -> float:
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    for i, s in enumerate(shards):
        fmt.write(s, folder / f"shard-{i:06d}")
    return time.perf_counter() - t0


def bench(fmt, shards: list[np.ndarray], root: Path, *, n_batches: int, n_cold: int, batch: int, seed: int) -> dict:
    n = sum(len(s) for s in shards)
    a, b = root / f"{fmt.name}_a", root / f"{fmt.name}_b"
    t_write = _write_all(fmt, shards, a)
    t_write_b = _write_all(fmt, shards, b)
    identical = _digest(a) == _digest(b)
    shutil.rmtree(b)
    paths = [a / f"shard-{i:06d}" for i in range(len(shards))]
    files = [f for p in paths for f in fmt.files(p)]
    nbytes = sum(f.stat().st_size for f in files)
    handles = [fmt.open(p) for p in paths]
    rng = np.random.default_rng(seed)
    # correctness: a random batch of every shard equals what was written
    equal = all(
        np.array_equal(fmt.read(h, r), s[r])
        for h, s in zip(handles, shards, strict=True)
        for r in [rng.choice(len(s), size=min(batch, len(s)), replace=False)]
    )
    plan = [(int(rng.integers(len(shards))), None) for _ in range(n_batches)]
    plan = [(i, rng.choice(len(shards[i]), size=batch, replace=False)) for i, _ in plan]
    fmt.read(handles[0], plan[0][1])  # warm-up
    t0 = time.perf_counter()
    for i, rows in plan:
        fmt.read(handles[i], rows)
    t_warm = time.perf_counter() - t0
    t_cold = 0.0
    for i, rows in plan[:n_cold]:
        fmt.close(handles[i])  # a mapped page is not evicted: unmap, evict, reopen (the open is not timed)
        _evict(files)
        handles[i] = fmt.open(paths[i])
        t1 = time.perf_counter()
        fmt.read(handles[i], rows)
        t_cold += time.perf_counter() - t1
    t0 = time.perf_counter()
    for h, s in zip(handles, shards, strict=True):
        for j in range(0, len(s), 256):
            fmt.read(h, np.arange(j, min(j + 256, len(s))))
    t_seq = time.perf_counter() - t0
    for h in handles:
        fmt.close(h)
    shutil.rmtree(a)
    return {
        "write_tiles_per_s": round(n / t_write, 1),
        "write_tiles_per_s_second_write": round(n / t_write_b, 1),
        "random_read_tiles_per_s_warm": round(n_batches * batch / t_warm, 1),
        "random_read_tiles_per_s_cold": round(n_cold * batch / t_cold, 1),
        "sequential_read_tiles_per_s": round(n / t_seq, 1),
        "bytes_per_tile": round(nbytes / n, 1),
        "raw_bytes_per_tile": int(np.prod(shards[0].shape[1:])),
        "compression_ratio": round(np.prod(shards[0].shape[1:]) * n / nbytes, 3),
        "n_files": len(files),
        "byte_identical_rewrite": identical,
        "read_equals_written": equal,
    }


def load_tiles(data_dir: str | None, sections: list[str]) -> np.ndarray:
    """All spot tiles of the sections, 112 µm at 224 px, as uint8 ``(n, 224, 224, 3)``."""
    import comtip as ct
    from comtip.data import TileReader

    sdata = ct.datasets.her2st(sections, data_dir=data_dir, download=False)
    ct.pp.spot_tiles(sdata, tile_size_um=112, tile_size_px=224)
    import pandas as pd

    tiles = pd.DataFrame(sdata.shapes["comtip_tiles"].drop(columns="geometry"))
    reader = TileReader(sdata, tiles, cache_mb=400)
    order = reader.read_order()
    out = np.empty((len(tiles), 224, 224, 3), dtype=np.uint8)
    for i in range(0, len(order), 128):
        rows = order[i : i + 128]
        out[rows] = reader.read(rows).permute(0, 2, 3, 1).numpy()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("COMTIP_DATA_DIR"))
    ap.add_argument("--sections", nargs="+", default=["C2", "C3", "C4", "C5", "C6"])
    ap.add_argument("--n-tiles", type=int, default=4096)
    ap.add_argument("--shard-size", type=int, default=1024)
    ap.add_argument("--formats", nargs="+", default=list(FORMATS))
    ap.add_argument("--batches", type=int, default=200, help="random batches timed warm")
    ap.add_argument("--cold-batches", type=int, default=50, help="random batches timed with the page cache evicted")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--tmp", default=None, help="folder to write in (default: the system's temporary folder)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    with Timer() as total:
        with Timer() as t_load:
            base = load_tiles(args.data_dir, args.sections)
        rng = np.random.default_rng(0)
        reps = []
        k = 0
        while sum(len(r) for r in reps) < args.n_tiles:  # repeats under random flips / rotations
            r = np.rot90(base, k=k % 4, axes=(1, 2))
            reps.append(np.ascontiguousarray(r[:, ::-1] if (k // 4) % 2 else r)[rng.permutation(len(base))])
            k += 1
        tiles = np.concatenate(reps)[: args.n_tiles]
        shards = [tiles[i : i + args.shard_size] for i in range(0, len(tiles), args.shard_size)]
        results = {}
        with tempfile.TemporaryDirectory(dir=args.tmp, prefix="comtip_corpus_bench_") as tmp:
            for name in args.formats:
                with Timer() as t:
                    results[name] = bench(
                        FORMATS[name],
                        shards,
                        Path(tmp),
                        n_batches=args.batches,
                        n_cold=args.cold_batches,
                        batch=args.batch_size,
                        seed=1,
                    )
                results[name]["bench_s"] = round(t.s, 1)
                print(name, json.dumps(results[name]), file=sys.stderr, flush=True)
    import zarr

    emit(
        {
            "benchmark": "corpus_format",
            "machine": machine(),
            "versions": {"zarr": zarr.__version__, "h5py": __import__("h5py").__version__, "numpy": np.__version__},
            "sections": args.sections,
            "source_tiles": len(base),
            "n_tiles": len(tiles),
            "tile_shape": list(tiles.shape[1:]),
            "shard_size": args.shard_size,
            "batch_size": args.batch_size,
            "formats": results,
            "load_tiles_s": round(t_load.s, 1),
            "wall_s": round(total.s, 1),
            "peak_rss_mb": peak_rss_mb(),
        },
        args.json,
    )


if __name__ == "__main__":
    main()
