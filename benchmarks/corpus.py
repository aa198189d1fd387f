"""A corpus of 100k and 200k spots on this machine: write speed, size, loader speed, training speed, peak memory.

The corpus is synthetic but made of real data: the tiles of HER2ST C2–C6 (910 spots), cut at 128 µm / 256 px and
changed per copy by a random 224 px crop (112 µm at 0.5 µm/px), one of the 8 flips/rotations and a colour change
(per-channel gain 0.9–1.1 and offset ±10), each with the real raw counts of its spot. The copies are split into
samples of ``--spots-per-sample`` spots (50 samples at 100k, 100 at 200k); each sample leaves out a random 2 % of the
genes (not measured there, so the loader masks them). The samples are written in HEST-1k's layout (``st/``,
``metadata/``, ``patches/``: the path a user's HEST download takes), and the corpus is written from that folder with
``ct.pp.write_corpus``.

For each size, in its own processes (so that one size's memory does not hide in the other's):

1. ``write``: ``ct.pp.write_corpus(hest_folder, corpus)``: tiles/s, size on disk, shards, peak RSS;
2. ``loader``: the training stream alone (``comtip.data.CorpusStream``, shuffle buffer 4096, augmentation, 256-gene
   sentences, batches of 32) through a DataLoader with ``--workers`` workers, shards evicted from the page cache
   first (``posix_fadvise(DONTNEED)``, as a corpus larger than memory reads): tiles/s of all workers and per worker;
3. ``train``: ``comtip.train.fit`` with the CPU preset (EfficientNet-Lite0, last stage trainable, no feature cache:
   the streamed path) for ``--train-steps`` steps: samples/s and the median step time (data wait included), first
   and second half of the run.

Peak RSS is that of the main process (``ru_maxrss``) and, separately, of its DataLoader workers. Goals (issue 15):
peak RSS < 4 GB and at most 1.1x when the corpus doubles; loader-alone throughput at least 2x what training
consumes; step time flat. Run it alone: the ratios are wrong when another heavy process shares the cores.

Usage: python benchmarks/corpus.py [--data-dir D] [--sizes 100000 200000] [--workdir DIR] [--json OUT]
The last line printed is one JSON object. Disk: about 2 x 150 KB per spot of the largest size (HEST patches and
the corpus), deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit, machine

SECTIONS = ["C2", "C3", "C4", "C5", "C6"]
PATCH_PX, SRC_PX, MPP = 224, 256, 0.5
PITCH_PX = 400  # spot centre distance in "WSI" pixels (200 µm, as legacy ST)
SEED = 0


def _rss() -> dict:
    """Peak RSS (MB) of this process and of its finished children (DataLoader workers)."""
    return {
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_workers_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }


def _du_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 1)


def _evict(path: Path) -> None:
    """Drop the files under ``path`` from the page cache: the next reads come from the disk."""
    for p in path.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# --- 0. the real tiles and counts -----------------------------------------------------------------------------------
def phase_source(work: Path, data_dir: str | None) -> dict:
    import pandas as pd
    from scipy import sparse

    import comtip as ct
    from comtip.data import TileReader

    t0 = time.perf_counter()
    sdata = ct.datasets.her2st(SECTIONS, data_dir=data_dir, download=False)
    ct.pp.spot_tiles(sdata, tile_size_um=SRC_PX * MPP, tile_size_px=SRC_PX)
    table = sdata.tables["table"]
    tiles = pd.DataFrame(sdata.shapes["comtip_tiles"].drop(columns="geometry"))
    tiles = tiles.drop_duplicates("obs_name").set_index("obs_name").loc[table.obs_names.astype(str)].reset_index()
    reader = TileReader(sdata, tiles, cache_mb=400)
    order = reader.read_order()
    out = np.empty((len(tiles), SRC_PX, SRC_PX, 3), dtype=np.uint8)
    for i in range(0, len(order), 128):
        rows = order[i : i + 128]
        out[rows] = reader.read(rows).permute(0, 2, 3, 1).numpy()
    counts = table.layers.get("counts", table.X)
    counts = sparse.csr_matrix(counts, dtype=np.float32)
    np.save(work / "source_tiles.npy", out)
    sparse.save_npz(work / "source_counts.npz", counts)
    (work / "source_genes.json").write_text(json.dumps(list(map(str, table.var_names))))
    return {"n_source_spots": len(out), "n_genes": counts.shape[1], "wall_s": round(time.perf_counter() - t0, 1)}


# --- 1. synthetic HEST samples --------------------------------------------------------------------------------------
def _write_sample(root: Path, sid: str, i: int, n: int, src: np.ndarray, counts, genes: list[str]) -> None:
    import anndata as ad
    import h5py
    import pandas as pd

    rng = np.random.default_rng([SEED, i])
    pick = rng.integers(0, len(src), n)
    keep = np.sort(rng.permutation(len(genes))[: int(round(0.98 * len(genes)))])
    side = int(np.ceil(np.sqrt(n)))
    grid = np.stack(np.divmod(np.arange(n), side), axis=1)[:, ::-1]  # (col, row)
    centres = (grid + 1.0) * PITCH_PX
    barcodes = [f"{sid}_{k:05d}" for k in range(n)]
    adata = ad.AnnData(
        X=counts[pick][:, keep],
        obs=pd.DataFrame({"in_tissue": 1, "array_col": grid[:, 0], "array_row": grid[:, 1]}, index=barcodes),
        var=pd.DataFrame(index=[genes[g] for g in keep]),
        obsm={"spatial": centres},
    )
    adata.write_h5ad(root / "st" / f"{sid}.h5ad")
    meta = {
        "id": sid,
        "dataset_title": "synthetic HER2ST copies (comtip benchmarks/corpus.py)",
        "organ": "Breast",
        "species": "Homo sapiens",
        "st_technology": "Spatial Transcriptomics",
        "spot_diameter": 100.0,
        "inter_spot_dist": 200.0,
        "pixel_size_um_estimated": MPP,
    }
    (root / "metadata" / f"{sid}.json").write_text(json.dumps(meta, indent=1))
    with h5py.File(root / "patches" / f"{sid}.h5", "w") as f:
        img = f.create_dataset(
            "img", shape=(n, PATCH_PX, PATCH_PX, 3), dtype=np.uint8, chunks=(1, PATCH_PX, PATCH_PX, 3)
        )
        for a in range(0, n, 256):
            b = min(n, a + 256)
            k = b - a
            off = rng.integers(0, SRC_PX - PATCH_PX + 1, (k, 2))
            view = rng.integers(0, 8, k)
            gain = rng.uniform(0.9, 1.1, (k, 1, 1, 3)).astype(np.float32)
            shift = rng.uniform(-10, 10, (k, 1, 1, 3)).astype(np.float32)
            block = np.empty((k, PATCH_PX, PATCH_PX, 3), dtype=np.uint8)
            for j in range(k):
                t = src[pick[a + j], off[j, 0] : off[j, 0] + PATCH_PX, off[j, 1] : off[j, 1] + PATCH_PX]
                t = np.rot90(t, view[j] % 4)
                block[j] = t[:, ::-1] if view[j] >= 4 else t
            img[a:b] = np.clip(block * gain + shift, 0, 255).astype(np.uint8)
        f.create_dataset("barcode", data=np.array([[b.encode()] for b in barcodes]))
        f.create_dataset("coords", data=(centres - PATCH_PX // 2).astype(np.int64))


def phase_hest(work: Path, n_samples: int, per_sample: int) -> dict:
    from scipy import sparse

    root = work / "hest"
    for d in ("st", "metadata", "patches"):
        (root / d).mkdir(parents=True, exist_ok=True)
    src = np.load(work / "source_tiles.npy")
    counts = sparse.load_npz(work / "source_counts.npz").tocsr()
    genes = json.loads((work / "source_genes.json").read_text())
    t0 = time.perf_counter()
    made = 0
    for i in range(n_samples):
        sid = f"SYN{i:03d}"
        if (root / "patches" / f"{sid}.h5").is_file() and (root / "st" / f"{sid}.h5ad").is_file():
            continue  # the 200k folder extends the 100k one: the first samples are the same
        _write_sample(root, sid, i, per_sample, src, counts, genes)
        made += 1
    return {"samples_made": made, "wall_s": round(time.perf_counter() - t0, 1), "hest_disk_mb": _du_mb(root)}


# --- 2. write the corpus --------------------------------------------------------------------------------------------
def phase_write(work: Path, n_samples: int, corpus: Path, shard_size: int) -> dict:
    import comtip as ct

    ct.settings.show_progress_bar = False
    root = work / "hest"
    ids = [f"SYN{i:03d}" for i in range(n_samples)]
    shutil.rmtree(corpus, ignore_errors=True)
    t0 = time.perf_counter()
    c = ct.pp.write_corpus([(root, s) for s in ids], corpus, shard_size=shard_size, mode="w")
    wall = time.perf_counter() - t0
    return {
        "n_spots": int(c.n_spots),
        "n_samples": len(c.samples),
        "n_genes": len(c.genes),
        "n_shards": len(c.shards),
        "disk_mb": _du_mb(corpus),
        "write_s": round(wall, 1),
        "write_tiles_per_s": round(c.n_spots / wall, 1),
        **_rss(),
    }


def _panel(corpus, n_genes: int) -> list[str]:
    from comtip.bench import corpus_panel, gene_statistics
    from comtip.pp import gene_text_table

    stats = gene_statistics(corpus, list(corpus.samples.index.astype(str)))
    panel, _ = corpus_panel(stats, n_top=n_genes, with_text=set(gene_text_table().index))
    return panel


# --- 3. the loader alone --------------------------------------------------------------------------------------------
def phase_loader(corpus_path: Path, workers: int, n_batches: int, batch_size: int, n_genes: int) -> dict:
    import torch

    import comtip as ct
    from comtip.data import CorpusStream, worker_init_fn

    corpus = ct.io.read_corpus(corpus_path)
    panel = _panel(corpus, n_genes)
    stream = CorpusStream(
        corpus, panel, sentence_length=64, batch_size=batch_size, buffer_size=4096, augment=True, seed=SEED
    )
    out = {}
    for w in sorted({1, workers}):
        _evict(corpus_path)
        stream.set_position(w, 0)  # another epoch per setting: another order, cold pages
        loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=w, worker_init_fn=worker_init_fn, prefetch_factor=4
        )
        it = iter(loader)
        warm = 5 * w  # the workers' start and their first batches
        for _ in range(warm):
            next(it)
        t0 = time.perf_counter()
        tiles = 0
        for _ in range(n_batches):
            tiles += len(next(it)["index"])
        wall = time.perf_counter() - t0
        del it, loader
        out[w] = round(tiles / wall, 1)
    return {
        "loader_workers": workers,
        "loader_tiles_per_s": out[workers],
        "loader_tiles_per_s_per_worker": round(out[workers] / workers, 1),
        "loader_tiles_per_s_1_worker": out[1],
        "loader_batches_timed": n_batches,
        **_rss(),
    }


# --- 4. training --------------------------------------------------------------------------------------------------
def phase_train(corpus_path: Path, workers: int, steps: int, batch_size: int, n_genes: int) -> dict:
    import torch

    import comtip as ct
    from comtip.data import CorpusStream
    from comtip.model import CoMTIP
    from comtip.pp import gene_text_embeddings, value_levels
    from comtip.train import fit

    ct.settings.show_progress_bar = False
    corpus = ct.io.read_corpus(corpus_path)
    panel = _panel(corpus, n_genes)
    config = ct.CoMTIPConfig.cpu()
    stream = CorpusStream(
        corpus,
        panel,
        sentence_length=config.sentence_length,
        batch_size=batch_size,
        buffer_size=4096,
        augment=True,
        drop_last=True,
        seed=SEED,
    )
    items = next(iter(CorpusStream(corpus, panel, batch_size=2048, buffer_size=1, seed=SEED).batches(0)))
    expr, mask, _, _ = stream.read_expression(items)
    levels = value_levels(np.where(mask, expr, 0.0), n_levels=config.n_value_levels)
    text = gene_text_embeddings(panel, fallback=True)
    torch.manual_seed(SEED)
    model = CoMTIP(config, panel, text, levels)
    _evict(corpus_path)
    t0 = time.perf_counter()
    summary = fit(
        model,
        stream,
        None,
        max_epochs=1,
        max_steps=steps,
        batch_size=batch_size,
        accelerator="cpu",
        num_workers=workers,
        show_progress_bar=False,
        monitor=None,
        seed=SEED,
    )
    wall = time.perf_counter() - t0
    return {
        "train_steps": summary["steps"],
        "train_batch_size": batch_size,
        "train_workers": workers,
        "train_wall_s": round(wall, 1),
        "s_per_step": summary["s_per_step"],
        "train_samples_per_s": round(batch_size / summary["s_per_step"], 2),
        "train_threads": torch.get_num_threads(),
        **{f"train_{k}": v for k, v in _rss().items()},
    }


# --- driver ---------------------------------------------------------------------------------------------------------
def _child(args: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--phase", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"phase {args} failed ({proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("COMTIP_DATA_DIR"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 200_000])
    ap.add_argument("--spots-per-sample", type=int, default=2000)
    ap.add_argument("--shard-size", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--loader-batches", type=int, default=150)
    ap.add_argument("--train-steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--n-genes", type=int, default=1000)
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the HEST folder and the last corpus")
    ap.add_argument("--json", default=None)
    ap.add_argument("--phase", nargs="+", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.phase:  # a child process: one phase
        name, *rest = a.phase
        work = Path(rest[0])
        if name == "source":
            res = phase_source(work, rest[1] if len(rest) > 1 and rest[1] else None)
        elif name == "hest":
            res = phase_hest(work, int(rest[1]), int(rest[2]))
        elif name == "write":
            res = phase_write(work, int(rest[1]), Path(rest[2]), int(rest[3]))
        elif name == "loader":
            res = phase_loader(Path(rest[1]), *map(int, rest[2:6]))
        elif name == "train":
            res = phase_train(Path(rest[1]), *map(int, rest[2:6]))
        else:
            raise SystemExit(f"unknown phase {name}")
        print(json.dumps(res))
        return

    t_start = time.perf_counter()
    tmp = None
    if a.workdir is None:
        tmp = tempfile.mkdtemp(prefix="comtip_corpus_bench_")
        work = Path(tmp)
    else:
        work = Path(a.workdir)
        work.mkdir(parents=True, exist_ok=True)
    runs = []
    try:
        source = _child(["source", str(work), a.data_dir or ""])
        print(f"source: {source}", file=sys.stderr)
        for size in sorted(a.sizes):
            n_samples = -(-size // a.spots_per_sample)
            hest = _child(["hest", str(work), str(n_samples), str(a.spots_per_sample)])
            corpus = work / f"corpus_{size}"
            run = {"target_spots": size, "spots_per_sample": a.spots_per_sample, "hest_make_s": hest["wall_s"]}
            run.update(_child(["write", str(work), str(n_samples), str(corpus), str(a.shard_size)]))
            run["hest_disk_mb"] = _du_mb(work / "hest")
            loader = _child(
                [
                    "loader",
                    str(work),
                    str(corpus),
                    str(a.workers),
                    str(a.loader_batches),
                    str(a.batch_size),
                    str(a.n_genes),
                ]
            )
            run.update({k: v for k, v in loader.items() if not k.startswith("peak")})
            run["loader_peak_rss_mb"] = loader["peak_rss_mb"]
            run["loader_peak_rss_workers_mb"] = loader["peak_rss_workers_mb"]
            run["write_peak_rss_mb"] = run.pop("peak_rss_mb")
            run.pop("peak_rss_workers_mb")
            run.update(
                _child(
                    [
                        "train",
                        str(work),
                        str(corpus),
                        str(a.workers),
                        str(a.train_steps),
                        str(a.batch_size),
                        str(a.n_genes),
                    ]
                )
            )
            run["peak_rss_mb"] = max(run["write_peak_rss_mb"], run["loader_peak_rss_mb"], run["train_peak_rss_mb"])
            run["peak_rss_workers_mb"] = max(run["loader_peak_rss_workers_mb"], run["train_peak_rss_workers_mb"])
            run["loader_over_train"] = round(run["loader_tiles_per_s"] / run["train_samples_per_s"], 1)
            runs.append(run)
            print(json.dumps(run), file=sys.stderr)
            if not (a.keep and size == max(a.sizes)):
                shutil.rmtree(corpus, ignore_errors=True)
    finally:
        if not a.keep:
            shutil.rmtree(work / "hest", ignore_errors=True)
            for f in ("source_tiles.npy", "source_counts.npz", "source_genes.json"):
                (work / f).unlink(missing_ok=True)
        if tmp is not None and not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    result = {
        "benchmark": "corpus",
        "machine": machine(),
        "source": {"dataset": "HER2ST", "sections": SECTIONS, **source},
        "runs": runs,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    if len(runs) >= 2:
        small, big = runs[0], runs[-1]
        result["ratio_big_over_small"] = {
            "n_spots": round(big["n_spots"] / small["n_spots"], 2),
            "peak_rss_mb": round(big["peak_rss_mb"] / small["peak_rss_mb"], 3),
            "peak_rss_workers_mb": round(big["peak_rss_workers_mb"] / small["peak_rss_workers_mb"], 3),
            "s_per_step": round(big["s_per_step"] / small["s_per_step"], 3),
            "loader_tiles_per_s": round(big["loader_tiles_per_s"] / small["loader_tiles_per_s"], 3),
        }
        result["goals"] = {
            "peak_rss_below_4gb": all(r["peak_rss_mb"] < 4096 for r in runs),
            "peak_rss_flat_1_1x": result["ratio_big_over_small"]["peak_rss_mb"] <= 1.1,
            "loader_at_least_2x_training": all(r["loader_over_train"] >= 2 for r in runs),
            "step_time_flat_1_1x": result["ratio_big_over_small"]["s_per_step"] <= 1.1,
        }
    emit(result, a.json)


if __name__ == "__main__":
    main()
