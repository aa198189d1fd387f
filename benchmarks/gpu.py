"""GPU training throughput of the CoMTIP model alone, on synthetic batches, and whether the data loader keeps up.

For each preset and batch size, a fresh model takes ``--warmup`` optimizer steps, then a timed loop of optimizer steps
(the same step as ``comtip.train.fit``: bf16 autocast on CUDA around ``model.training_losses``, backward, gradient
clipping at 1.0, AdamW with the module's parameter groups), on batches already on the device: random images and random
gene sentences / expression of a ``--genes`` panel. Batch sizes are tried in increasing order, and a preset stops at
the first one that does not fit in GPU memory (reported as ``"oom"``).

Presets: ``paper`` (``CoMTIPConfig.paper(image_pretrained=None)``: ViT-B/32, whole tower trained) and ``cpu``
(``CoMTIPConfig.cpu(image_pretrained=None)``: EfficientNet-Lite0, last stage trained). Random weights: throughput
does not depend on them, and nothing is downloaded.

The loader: a ``DataLoader`` with ``--workers`` processes over an in-memory pool of random uint8 tiles
(``(P, P, 3)``, as a corpus shard hands them out), which per batch does what comtip's data path does on the CPU:
uint8 -> float in [0, 1], channels first, ``comtip.data.augment`` (dihedral transform + colour jitter, one RNG per
sample), gene sentences, and the default collate of per-sample dicts. Its samples/s is compared with each step's
samples/s: ``loader_bound`` is true when the loader is the slower of the two (more workers, or fewer augmentations,
needed). ``workers_needed`` assumes the loader scales linearly with workers.

Imports: ``import comtip`` runs ``comtip/__init__.py``, which imports the scverse stack (anndata, spatialdata). This
script needs only torch, timm, Lightning, numpy, pandas and scipy: it imports the public packages ``comtip.model``,
``comtip.train`` and ``comtip.data`` (none of which imports the scverse stack) through a stub of the ``comtip``
package that skips ``comtip/__init__.py`` (see ``_import_comtip``), and finds ``src/`` itself when comtip is not
installed.

Usage
-----
On a GPU (one command, <= 8 minutes)::

    python benchmarks/gpu.py --json benchmarks/results/gpu_h200.json

Smoke test on a CPU (seconds; what ``tests/test_benchmarks_gpu.py`` runs)::

    python benchmarks/gpu.py --tiny --device cpu

The last line printed is one JSON object. Samples/s are per GPU (one process, no DDP all-reduce).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import math
import os
import platform
import sys
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit

SRC = Path(__file__).resolve().parents[1] / "src"
TEXT_DIM = 384  # all-MiniLM-L6-v2, the gene-text encoder's default


# ------------------------------------------------------------------------------------------- imports
def _stub_package(name: str) -> None:
    """Register package ``name`` without running its ``__init__.py`` (its submodules still import normally)."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        msg = f"cannot find the package {name!r}: install comtip or run from the repository."
        raise ImportError(msg)
    module = types.ModuleType(name)
    module.__path__ = list(spec.submodule_search_locations)
    module.__spec__ = spec
    module.__file__ = spec.origin
    sys.modules[name] = module


def _import_comtip() -> dict:
    """comtip's torch-only packages, without the scverse stack that ``comtip/__init__.py`` imports."""
    if importlib.util.find_spec("comtip") is None:
        sys.path.insert(0, str(SRC))
    _stub_package("comtip")
    model = importlib.import_module("comtip.model")
    train = importlib.import_module("comtip.train")
    data = importlib.import_module("comtip.data")
    return {"CoMTIP": model.CoMTIP, "CoMTIPConfig": model.CoMTIPConfig, "Module": train.CoMTIPModule, "aug": data}


# ------------------------------------------------------------------------------------------- synthetic data
def _panel(n_genes: int, n_levels: int, seed: int = 0):
    """Gene names, unit-norm text embeddings (G, TEXT_DIM) and ascending prompt levels (G, K) starting at 0."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    genes = [f"GENE{i}" for i in range(n_genes)]
    text = torch.nn.functional.normalize(torch.randn(n_genes, TEXT_DIM, generator=gen), dim=1)
    pos = (torch.rand(n_genes, n_levels - 1, generator=gen) * 4 + 0.05).sort(dim=1).values
    levels = torch.cat([torch.zeros(n_genes, 1), pos], dim=1)
    return genes, text, levels


def _genes_of(rng: np.random.Generator, n: int, n_genes: int, length: int) -> dict[str, np.ndarray]:
    """Gene sentences (top-``length`` expressed genes, values descending, a few padded) and the panel expression."""
    expr = np.where(rng.random((n, n_genes)) < 0.2, rng.gamma(2.0, 1.0, (n, n_genes)), 0.0).astype(np.float32)
    order = np.argsort(-expr, axis=1)[:, :length]
    val = np.take_along_axis(expr, order, axis=1)
    mask = val > 0
    return {
        "gene_idx": np.where(mask, order, 0).astype(np.int64),
        "gene_val": np.where(mask, val, 0.0).astype(np.float32),
        "gene_mask": mask,
        "expr": expr,
        "depth": np.log1p(rng.uniform(500, 20000, n)).astype(np.float32),
    }


def _device_batch(batch_size: int, image_size: int, n_genes: int, length: int, device, seed: int) -> dict:
    import torch

    rng = np.random.default_rng(seed)
    batch = {k: torch.from_numpy(v).to(device) for k, v in _genes_of(rng, batch_size, n_genes, length).items()}
    gen = torch.Generator().manual_seed(seed)
    batch["image"] = torch.rand(batch_size, 3, image_size, image_size, generator=gen).to(device)
    return batch


class SyntheticTiles:
    """uint8 tiles (P, P, 3) from an in-memory pool, decoded and augmented per batch like comtip's data path."""

    def __init__(self, augment_fn, *, n: int, tile_px: int, n_genes: int, length: int, pool: int = 256) -> None:
        rng = np.random.default_rng(0)
        self.augment = augment_fn
        self.n = n
        self.tiles = rng.integers(0, 256, (min(pool, n), tile_px, tile_px, 3), dtype=np.uint8)
        self.genes = _genes_of(rng, min(pool, n), n_genes, length)

    def __len__(self) -> int:
        return self.n

    def __getitems__(self, indices) -> list[dict]:
        import torch

        idx = np.asarray(indices, dtype=np.int64)
        rows = idx % len(self.tiles)
        img = torch.from_numpy(self.tiles[rows]).permute(0, 3, 1, 2).float().div_(255.0)
        img = torch.cat(
            [self.augment(img[j : j + 1], np.random.default_rng([0, int(i)])) for j, i in enumerate(idx)]
        ).contiguous()
        batch = {k: torch.from_numpy(v[rows]) for k, v in self.genes.items()}
        batch["image"] = img
        return [{k: v[j] for k, v in batch.items()} for j in range(len(idx))]

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]


def measure_loader(
    augment_fn, *, workers: int, batch_size: int, tile_px: int, n_genes: int, length: int, seconds: float
) -> dict:
    """Samples/s of the loader after its first batch (worker start-up excluded)."""
    from torch.utils.data import DataLoader

    n = batch_size * 100_000
    ds = SyntheticTiles(augment_fn, n=n, tile_px=tile_px, n_genes=n_genes, length=length)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, persistent_workers=False, shuffle=False)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    batches = 0
    while True:
        next(it)
        batches += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and batches >= max(2, workers):
            break
    del it
    sps = batches * batch_size / elapsed
    return {
        "workers": workers,
        "batch_size": batch_size,
        "tile_px": tile_px,
        "batches": batches,
        "seconds": round(elapsed, 2),
        "samples_per_s": round(sps, 1),
        "samples_per_s_per_worker": round(sps / max(workers, 1), 1),
    }


# ------------------------------------------------------------------------------------------- training steps
def _is_oom(err: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(err, oom) or "out of memory" in str(err).lower()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(
    mods: dict,
    config,
    *,
    batch_size: int,
    device,
    precision: str,
    n_genes: int,
    warmup: int,
    steps: int,
    seconds: float,
) -> dict:
    import torch

    torch.manual_seed(0)
    genes, text, levels = _panel(n_genes, config.n_value_levels)
    model = mods["CoMTIP"](config, genes, text, levels).to(device).train()
    opt = mods["Module"](model, lr=1e-4, total_steps=10_000).configure_optimizers()["optimizer"]
    params = [p for group in opt.param_groups for p in group["params"]]
    batch = _device_batch(batch_size, config.image_size, n_genes, config.sentence_length, device, seed=1)
    bf16 = precision == "bf16-mixed"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model.training_losses(batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(warmup):
        loss = step()
    _sync(device)
    times: list[float] = []
    t_all = time.perf_counter()
    while len(times) < steps and (time.perf_counter() - t_all < seconds or len(times) < 2):
        t0 = time.perf_counter()
        loss = step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    out = {
        "batch_size": batch_size,
        "steps": len(times),
        "step_s": round(step_s, 4),
        "step_s_mean": round(float(np.mean(times)), 4),
        "samples_per_s": round(batch_size / step_s, 1),
        "loss": round(float(loss), 4),
        "loss_finite": bool(torch.isfinite(loss)),
    }
    if device.type == "cuda":
        out["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def measure_steps(mods: dict, config, *, batch_size: int, device, **kw) -> dict:
    """Step time of ``fit``'s optimizer step on one fixed batch on ``device``; ``{"oom": True}`` if it does not fit.

    The step time is the median over the timed steps (each ended by a device synchronisation); a fresh model and
    optimizer per call, so that one batch size's memory does not weigh on the next.
    """
    import torch

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    out = None
    try:
        out = _time_steps(mods, config, batch_size=batch_size, device=device, **kw)
    except (RuntimeError, MemoryError) as e:
        if not (cuda and _is_oom(e)):
            raise
    # outside the except block: the traceback (and the model it holds) is gone before memory is freed
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out if out is not None else {"batch_size": batch_size, "oom": True}


# ------------------------------------------------------------------------------------------- the run
def machine_info(device) -> dict:
    import torch

    info: dict = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
    }
    for name in ("timm", "lightning"):
        try:
            info[name] = importlib.import_module(name).__version__
        except ImportError:
            info[name] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            {
                "gpu": torch.cuda.get_device_name(device),
                "gpu_count": torch.cuda.device_count(),
                "gpu_memory_gb": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}",
                "cudnn": torch.backends.cudnn.version(),
                "bf16_supported": bool(torch.cuda.is_bf16_supported()),
            }
        )
    else:
        info["gpu"] = None
        info["torch_threads"] = torch.get_num_threads()
    return info


def _configs(mods: dict, tiny: bool) -> dict:
    cfg = mods["CoMTIPConfig"]
    if tiny:
        return {"tiny": cfg.tiny()}
    return {"paper": cfg.paper(image_pretrained=None), "cpu": cfg.cpu(image_pretrained=None)}


def run(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    deadline = t_start + args.max_minutes * 60
    mods = _import_comtip()
    import torch

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            msg = "--device cuda: torch sees no CUDA device here; pass --device cpu (with --tiny) to test on a CPU."
            raise SystemExit(msg)
    precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32-true")
    if precision == "bf16-mixed" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        msg = "--precision bf16-mixed: this GPU has no bf16; pass --precision 32-true."
        raise SystemExit(msg)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    configs = _configs(mods, args.tiny)
    if args.presets:
        configs = {k: v for k, v in configs.items() if k in args.presets}
    batch_sizes = sorted(args.batch_sizes)
    result: dict = {
        "benchmark": "gpu",
        "machine": machine_info(device),
        "precision": precision,
        "n_genes": args.genes,
        "text_dim": TEXT_DIM,
        "warmup_steps": args.warmup,
        "max_minutes": args.max_minutes,
    }

    # the loader first: its worker processes fork before CUDA is initialised
    tile_px = max(c.image_size for c in configs.values())
    length = max(c.sentence_length for c in configs.values())
    loader = measure_loader(
        mods["aug"].augment,
        workers=args.workers,
        batch_size=args.loader_batch_size,
        tile_px=tile_px,
        n_genes=args.genes,
        length=length,
        seconds=args.loader_seconds,
    )
    result["loader"] = loader

    presets: dict = {}
    n_left = len(configs) * len(batch_sizes)
    for name, config in configs.items():
        rows: list[dict] = []
        presets[name] = {
            "image_encoder": config.image_encoder,
            "image_size": config.image_size,
            "image_trainable_blocks": config.image_trainable_blocks,
            "sentence_length": config.sentence_length,
            "results": rows,
        }
        for bs in batch_sizes:
            left = deadline - time.perf_counter() - args.reserve_seconds
            if left < args.min_seconds_per_config:
                rows.append({"batch_size": bs, "skipped": "time budget (--max-minutes)"})
                n_left -= 1
                continue
            seconds = min(args.seconds, left / max(n_left, 1))
            row = measure_steps(
                mods,
                config,
                batch_size=bs,
                device=device,
                precision=precision,
                n_genes=args.genes,
                warmup=args.warmup,
                steps=args.steps,
                seconds=seconds,
            )
            n_left -= 1
            if not row.get("oom"):
                row["loader_bound"] = bool(loader["samples_per_s"] < row["samples_per_s"])
                per_worker = loader["samples_per_s_per_worker"]
                row["workers_needed"] = math.ceil(row["samples_per_s"] / per_worker) if per_worker > 0 else None
            rows.append(row)
            print(f"{name} batch {bs}: {row}", file=sys.stderr, flush=True)
            if row.get("oom"):
                n_left -= sum(1 for b in batch_sizes if b > bs)
                break  # larger batches do not fit either
        ok = [r for r in rows if "samples_per_s" in r]
        if ok:
            best = max(ok, key=lambda r: r["samples_per_s"])
            presets[name]["best"] = {k: best[k] for k in ("batch_size", "samples_per_s", "step_s", "loader_bound")}
    result["presets"] = presets
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CoMTIPConfig.tiny() on small batches: a CPU smoke test")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:1, cpu")
    p.add_argument("--presets", nargs="+", choices=["paper", "cpu", "tiny"], help="subset of the presets")
    p.add_argument("--batch-sizes", nargs="+", type=int, help="tried in increasing order (default 64 .. 1024)")
    p.add_argument("--precision", choices=["bf16-mixed", "32-true"], help="default: bf16-mixed on CUDA, else 32-true")
    p.add_argument("--genes", type=int, help="panel size G (default 2000; 12 with --tiny)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 5; 1 with --tiny)")
    p.add_argument("--steps", type=int, help="timed steps at most (default 30; 2 with --tiny)")
    p.add_argument("--seconds", type=float, default=20.0, help="timed seconds at most per batch size")
    p.add_argument("--workers", type=int, help="loader worker processes (default min(8, cores); 1 with --tiny)")
    p.add_argument("--loader-batch-size", type=int, help="loader batch (default 128; 8 with --tiny)")
    p.add_argument("--loader-seconds", type=float, help="timed seconds of the loader (default 15; 1 with --tiny)")
    p.add_argument("--max-minutes", type=float, default=8.0, help="whole-run budget; later configs are skipped")
    p.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark (Lightning: off)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    tiny = args.tiny
    defaults = {
        "batch_sizes": [4, 8] if tiny else [64, 128, 256, 512, 1024],
        "genes": 12 if tiny else 2000,
        "warmup": 1 if tiny else 5,
        "steps": 2 if tiny else 30,
        "workers": 1 if tiny else min(8, os.cpu_count() or 1),
        "loader_batch_size": 8 if tiny else 128,
        "loader_seconds": 1.0 if tiny else 15.0,
    }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if tiny and args.device == "auto":
        args.device = "cpu"
    args.reserve_seconds = 5.0 if tiny else 20.0  # JSON output, teardown
    args.min_seconds_per_config = 0.0 if tiny else 15.0
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
