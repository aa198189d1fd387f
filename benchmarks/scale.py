"""Scale: embed every spot of a whole slide streamed from a pyramidal TIFF, in bounded memory.

A synthetic slide is built by tiling real HER2ST H&E: blocks of tissue cut from the C2-C5 images (0.688 µm/px),
each placed with one of the 8 flips/rotations, chosen at random (seeded), written tile by tile (512 px,
JPEG) into a pyramidal TIFF (levels 2x smaller, as top-level reduced pages) without ever holding the slide in
memory. Then, for each slide side, in a fresh process (so that its peak memory is its own):

    ct.io.wsi -> ct.pp.grid_spots(tissue_only=False) -> ct.pp.spot_tiles (112 µm at 224 px) -> ct.tl.embed

with the CPU default model (``CoMTIPConfig.cpu()``: ImageNet ``tf_efficientnet_lite0``). The model is NOT trained:
a small made-up gene panel is enough for throughput (the image tower is the cost). Reported per side: spots/s of
``ct.tl.embed``, wall time of each step, peak RSS (``getrusage`` maxrss, and psutil sampled every 50 ms when it
is installed), seconds per spot (constant across sides = time linear in spots), and a bare forward pass of the same
tower and heads on pre-made tensors of real tiles (same batch size, same number of spots): the pipeline's share
of that throughput (goal >= 0.8). Goals: peak RSS under 3 GB, flat when the slide area doubles.

Usage
-----
Full (>= 20,000 spots at 40k; the doubled area shows flat memory; takes a while on a CPU)::

    python benchmarks/scale.py --sides 40000 56569

Smoke (a few minutes on 1 core)::

    python benchmarks/scale.py --sides 8000 11314 --spacing-um 250 --threads 1 --malloc default tuned

``--malloc tuned`` runs the embedding process with glibc's ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``
raised, so that the activations of each CPU forward pass reuse heap pages instead of mapping fresh ones.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import Timer, emit, machine, peak_rss_mb

HER2ST_MPP = 0.688  # µm per pixel of the HER2ST images (the slide keeps the tissue's real scale)
TILE = 512  # TIFF tile side
BLOCK = 2048  # side of the tissue blocks the slide is tiled with


# ------------------------------------------------------------------------------------------- the synthetic slide
def tissue_blocks(data_dir: Path, sections: list[str], per_image: int = 2, block: int = BLOCK) -> list[np.ndarray]:
    """``per_image`` blocks (block x block x 3, uint8) with the most tissue from each HER2ST H&E image."""
    from PIL import Image

    from comtip.pp import tissue_mask

    Image.MAX_IMAGE_PIXELS = None
    blocks = []
    for section in sections:
        files = sorted((data_dir / "her2st" / "ST-imgs").glob(f"{section}_*.jpg"))
        if not files:
            msg = f"No H&E image of HER2ST section {section!r} under {data_dir / 'her2st' / 'ST-imgs'}."
            raise FileNotFoundError(msg)
        with Image.open(files[0]) as img:
            rgb = np.asarray(img.convert("RGB"))
        f = 16
        thumb = rgb[::f, ::f]
        mask = tissue_mask(np.moveaxis(thumb, -1, 0)).astype(np.float32)
        integral = np.pad(mask.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        b = block // f
        h, w = rgb.shape[0] // f, rgb.shape[1] // f  # whole blocks only
        scores = []
        for y in range(0, h - b + 1, max(1, b // 4)):
            for x in range(0, w - b + 1, max(1, b // 4)):
                s = integral[y + b, x + b] - integral[y, x + b] - integral[y + b, x] + integral[y, x]
                scores.append((s, y, x))
        taken: list[tuple[int, int]] = []
        for _, y, x in sorted(scores, reverse=True):
            if all(abs(y - ty) >= b or abs(x - tx) >= b for ty, tx in taken):
                taken.append((y, x))
                blocks.append(np.ascontiguousarray(rgb[y * f : y * f + block, x * f : x * f + block]))
            if len(taken) == per_image:
                break
        del rgb
    return blocks


def _downsample(block: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return block
    h, w, c = block.shape
    return block.reshape(h // factor, factor, w // factor, factor, c).mean(axis=(1, 3)).round().astype(np.uint8)


def _dihedral(block: np.ndarray, k: int) -> np.ndarray:
    out = np.rot90(block, k % 4, axes=(0, 1))
    return out[:, ::-1] if k >= 4 else out


def _layout(side: int, n_blocks: int, seed: int) -> np.ndarray:
    """``(rows, cols, 2)`` block id and dihedral transform of every block position of the slide."""
    n = -(-side // BLOCK)
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, n_blocks, (n, n)), rng.integers(0, 8, (n, n))], axis=-1)


def _tiles(blocks: list[np.ndarray], layout: np.ndarray, shape: tuple[int, int], factor: int):
    """The level's 512 px tiles in row-major order, each assembled from the (downsampled) blocks it overlaps."""
    small = [_downsample(b, factor) for b in blocks]
    bs = BLOCK // factor
    h, w = shape
    for y0 in range(0, h, TILE):
        for x0 in range(0, w, TILE):
            tile = np.full((TILE, TILE, 3), 255, dtype=np.uint8)  # past the edge: white glass
            for by in range(y0 // bs, min(h - 1, y0 + TILE - 1) // bs + 1):
                for bx in range(x0 // bs, min(w - 1, x0 + TILE - 1) // bs + 1):
                    m, k = layout[by, bx]
                    src = _dihedral(small[m], int(k))
                    ya, yb = max(y0, by * bs), min(y0 + TILE, (by + 1) * bs, h)
                    xa, xb = max(x0, bx * bs), min(x0 + TILE, (bx + 1) * bs, w)
                    tile[ya - y0 : yb - y0, xa - x0 : xb - x0] = src[
                        ya - by * bs : yb - by * bs, xa - bx * bs : xb - bx * bs
                    ]
            yield tile


def write_slide(path: Path, side: int, blocks: list[np.ndarray], *, seed: int = 0, min_side: int = 1024) -> dict:
    """A pyramidal, tiled, JPEG-compressed TIFF of ``side`` x ``side`` px, written tile by tile."""
    import tifffile

    try:
        import imagecodecs  # noqa: F401

        compression, args = "jpeg", {"level": 90}
    except ImportError:
        compression, args = "zlib", {"level": 6}
    layout = _layout(side, len(blocks), seed)
    levels = [side]
    while levels[-1] // 2 >= min_side and BLOCK // 2 ** len(levels) >= 1:
        levels.append(-(-levels[-1] // 2))
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, s in enumerate(levels):
            f = 2**i
            tw.write(
                _tiles(blocks, layout, (s, s), f),
                shape=(s, s, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                photometric="rgb",
                compression=compression,
                compressionargs=args,
                subfiletype=1 if i else 0,
                resolution=(1e4 / (HER2ST_MPP * f), 1e4 / (HER2ST_MPP * f)),
                resolutionunit="CENTIMETER",
                metadata=None,
            )
    return {"levels": levels, "compression": compression, "file_mb": round(path.stat().st_size / 2**20, 1)}


# ------------------------------------------------------------------------------------------- memory sampling
class RssSampler:
    """Peak RSS of this process and its children, sampled in a background thread (psutil; absent: no sampling)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.peak = 0
        self.interval = interval
        self._stop = threading.Event()
        try:
            import psutil

            self._proc = psutil.Process()
        except ImportError:
            self._proc = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        total = self._proc.memory_info().rss
        for c in self._proc.children(recursive=True):
            with contextlib.suppress(Exception):  # a child that just ended
                total += c.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __enter__(self):
        if self._proc is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._proc is not None:
            self._thread.join()
            self.peak = max(self.peak, self._rss())

    @property
    def peak_mb(self) -> float | None:
        return round(self.peak / 2**20, 1) if self._proc is not None else None


# ------------------------------------------------------------------------------------------- one size, one process
def untrained_cpu_model(n_genes: int = 16):
    """The CPU default architecture with ImageNet weights, an untrained gene side and a made-up panel."""
    import torch

    import comtip as ct

    torch.manual_seed(0)
    genes = [f"GENE{i}" for i in range(n_genes)]
    text = torch.nn.functional.normalize(torch.randn(n_genes, 384), dim=1)
    levels = torch.linspace(0, 4, 16).repeat(n_genes, 1)
    return ct.CoMTIP(ct.CoMTIPConfig.cpu(), genes, text, levels).eval()


def bare_forward(model, images, n_spots: int) -> float:
    """Seconds of the same inference loop as ``ct.tl.embed`` (tower + head + normalise) on pre-made batches."""
    from comtip.model import embed_images

    b = images.shape[0]
    batches = [{"image": images[: min(b, n_spots - i)]} for i in range(0, n_spots, b)]
    embed_images(model, batches[:1], prompt=False)  # warm-up, as the pipeline's first batch is not timed apart
    with Timer() as t:
        embed_images(model, batches, prompt=False)
    return t.s


def run_size(
    path: str, *, spacing_um: float, max_spots: int | None, batch_size: int, threads: int, bare_spots: int | None = None
) -> dict:
    """Open the slide, place spots, tile and embed them; then the bare forward pass. Runs in its own process."""
    import torch

    torch.set_num_threads(threads)
    with RssSampler() as sampler:
        import comtip as ct
        from comtip.data import SpotDataset

        ct.settings.show_progress_bar = False
        model = untrained_cpu_model()
        rss_model = peak_rss_mb()
        with Timer() as t_open:
            sdata = ct.io.wsi(path, section="slide")
        with Timer() as t_grid:
            ct.pp.grid_spots(sdata, spacing_um=spacing_um, tissue_only=False)
            if max_spots is not None and sdata.tables["table"].n_obs > max_spots:
                sdata.tables["table"] = sdata.tables["table"][:max_spots].copy()
        n = int(sdata.tables["table"].n_obs)
        with Timer() as t_tiles:
            ct.pp.spot_tiles(sdata, tile_size_um=112, tile_size_px=224)
        tiles = sdata.shapes["comtip_tiles"]
        with Timer() as t_embed:
            ct.tl.embed(sdata, model, batch_size=batch_size, num_workers=0)
        emb = sdata.tables["table"].obsm["X_comtip_image"]
        ok = bool(np.isfinite(emb).all())
        rss_embed = peak_rss_mb()
        # pre-made tensors: one batch of real tiles of this slide, read once
        ds = SpotDataset(sdata, genes=None, obs_names=list(sdata.tables["table"].obs_names[:batch_size]))
        images = ds.images(np.arange(len(ds)))
        n_bare = n if bare_spots is None else min(n, bare_spots)  # throughput per spot: a sample is enough
        t_bare = bare_forward(model, images, n_bare)
    level = int(tiles["level"].iloc[0])
    return {
        "n_spots": n,
        "all_embedded_finite": ok,
        "tile": {"um": 112, "px": 224, "native_px": int(tiles["size"].iloc[0]), "level": level},
        "spots_per_s": round(n / t_embed.s, 2),
        "s_per_spot": round(t_embed.s / n, 5),
        "bare_forward_spots_per_s": round(n_bare / t_bare, 2),
        "bare_forward_n_spots": n_bare,
        "pipeline_vs_bare": round((n / t_embed.s) / (n_bare / t_bare), 3),
        "seconds": {
            "wsi_open": round(t_open.s, 2),
            "grid_spots": round(t_grid.s, 2),
            "spot_tiles": round(t_tiles.s, 2),
            "embed": round(t_embed.s, 2),
            "bare_forward": round(t_bare, 2),
        },
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_mb_sampled": sampler.peak_mb,
        "rss_mb_after_model": rss_model,
        "peak_rss_mb_after_embed": rss_embed,
        "torch_threads": torch.get_num_threads(),
    }


#: glibc malloc settings that keep freed activations in the heap: without them every CPU forward pass of a batch of
#: 64 tiles maps fresh pages for its activations (measured here: 2x-4x slower, mostly system time)
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**36)}


def make_slide(path: str, side: int, data_dir: str, sections: list[str]) -> dict:
    """Cut the tissue blocks and write one slide (runs in its own process, see :func:`_child`)."""
    with Timer() as t:
        blocks = tissue_blocks(Path(data_dir), sections)
        info = write_slide(Path(path), side, blocks)
    return {**info, "write_s": round(t.s, 1)}


def _child(argv: dict, *, malloc: str = "default", task: str = "embed") -> dict:
    """Run one step in a fresh process.

    Everything heavy (decoding the H&E images, writing the slide, embedding) runs in children, so this process
    stays small: a child's ``ru_maxrss`` starts from its parent's peak on Linux (``vfork`` + ``exec``), which would
    otherwise add the slide writer's memory to the embedding's.
    """
    cmd = [sys.executable, __file__, "--_child", json.dumps({"task": task, **argv})]
    env = dict(os.environ, **(TUNED_MALLOC if malloc == "tuned" else {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        msg = f"size run failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        raise RuntimeError(msg)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summary(runs: list[dict]) -> dict:
    """Across slide sides: spots/s, peak RSS and its growth, seconds per spot (linearity), share of bare forward."""
    s_per_spot = [r["s_per_spot"] for r in runs]
    rss = [r["peak_rss_mb"] for r in runs]
    return {
        "sides": [r["side_px"] for r in runs],
        "spots": [r["n_spots"] for r in runs],
        "spots_per_s": [r["spots_per_s"] for r in runs],
        "peak_rss_mb": rss,
        "peak_rss_growth": round(rss[-1] / rss[0], 3) if len(rss) > 1 else None,
        # time linear in spots: seconds per spot stays the same (ratio ~1) as the slide grows
        "s_per_spot_ratio_last_first": round(s_per_spot[-1] / s_per_spot[0], 3) if len(runs) > 1 else None,
        "pipeline_vs_bare": [r["pipeline_vs_bare"] for r in runs],
        "goals": {
            "peak_rss_under_3gb": all(r < 3072 for r in rss),
            "pipeline_at_least_80pct_of_bare": all(r["pipeline_vs_bare"] >= 0.8 for r in runs),
            "at_least_20000_spots": max(r["n_spots"] for r in runs) >= 20000,
        },
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sides", type=int, nargs="+", default=[40000, 56569], help="slide sides in px (level 0)")
    p.add_argument("--spacing-um", type=float, default=180.0, help="grid pitch (180 µm: 23,104 spots at 40k px)")
    p.add_argument("--max-spots", type=int, default=None, help="embed at most this many spots per slide")
    p.add_argument(
        "--bare-spots",
        type=int,
        default=4096,
        help="spots of the bare forward pass (throughput per spot; 0 = as many as the slide)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--data-dir", default=os.environ.get("COMTIP_DATA_DIR", "../shared/data"))
    p.add_argument("--sections", nargs="+", default=["C2", "C3", "C4", "C5"], help="HER2ST images to cut tissue from")
    p.add_argument("--workdir", default=None, help="where the TIFFs go (default: a temporary folder, removed)")
    p.add_argument(
        "--malloc",
        nargs="+",
        choices=["default", "tuned"],
        default=["default"],
        help="glibc malloc of the embedding process: as is, and/or with MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ raised",
    )
    p.add_argument("--json", default=None)
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child is not None:  # one size in a fresh process
        kw = json.loads(args._child)
        task = kw.pop("task")
        print(json.dumps(run_size(**kw) if task == "embed" else make_slide(**kw)))
        return {}

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="comtip_scale_")
        workdir = Path(tmp.name)
    else:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    try:
        with Timer() as t_all:
            runs = []
            for side in args.sides:
                path = workdir / f"slide_{side}.tif"
                info = _child(
                    {"path": str(path), "side": side, "data_dir": str(args.data_dir), "sections": args.sections},
                    task="slide",
                )
                write_s = info.pop("write_s")
                for malloc in args.malloc:
                    res = _child(
                        {
                            "path": str(path),
                            "spacing_um": args.spacing_um,
                            "max_spots": args.max_spots,
                            "bare_spots": args.bare_spots or None,
                            "batch_size": args.batch_size,
                            "threads": args.threads,
                        },
                        malloc=malloc,
                    )
                    res.update(
                        {
                            "side_px": side,
                            "megapixels": round(side * side / 1e6, 1),
                            "malloc": malloc,
                            "write_s": write_s,
                            "slide": info,
                        }
                    )
                    runs.append(res)
                    print(json.dumps(res), file=sys.stderr)
                if args.workdir is None:
                    path.unlink()
    finally:
        if tmp is not None:
            tmp.cleanup()
    summary = {malloc: _summary([r for r in runs if r["malloc"] == malloc]) for malloc in args.malloc}
    result = {
        "benchmark": "scale",
        "model": "CoMTIPConfig.cpu() (tf_efficientnet_lite0, ImageNet weights), untrained heads, 16 made-up genes",
        "source": f"HER2ST {args.sections} H&E blocks ({BLOCK} px, 8 dihedral variants) at {HER2ST_MPP} µm/px",
        "spacing_um": args.spacing_um,
        "batch_size": args.batch_size,
        "runs": runs,
        "summary": summary,
        "wall_s": round(t_all.s, 1),
        "machine": machine(),
    }
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
