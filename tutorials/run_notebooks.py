"""Execute the tutorials in place with nbclient, so that they are committed (and rendered in the docs) with outputs.

Usage (from the repository root; ``make docs-notebooks`` runs the first line)::

    python tutorials/run_notebooks.py                 # all notebooks, normal mode (the real settings)
    python tutorials/run_notebooks.py --fast          # reduced sizes (COMTIP_TUTORIAL_FAST=1), for a quick check
    python tutorials/run_notebooks.py --only 01 03    # pick notebooks by name prefix
    python tutorials/run_notebooks.py --fast --no-write   # execute but keep the committed files unchanged

Each notebook reads ``COMTIP_TUTORIAL_FAST`` in its first (parameters) cell. The data come from ``$COMTIP_DATA_DIR``
(default ``../shared/data`` when it exists). Notebooks run one after the other, each in a fresh kernel started from
this Python. Widget state and execution timings are stripped; the mode, wall time and machine are recorded in the
notebook's metadata (``comtip_tutorial``) and printed.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _env(fast: bool) -> None:
    os.environ["COMTIP_TUTORIAL_FAST"] = "1" if fast else "0"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.pop("MPLBACKEND", None)  # the kernel draws figures inline (the Makefile exports MPLBACKEND=agg)
    if "COMTIP_DATA_DIR" not in os.environ:
        default = HERE.parent.parent / "shared" / "data"
        if default.is_dir():
            os.environ["COMTIP_DATA_DIR"] = str(default)


def clean(nb) -> None:
    """Drop widget state and per-cell execution metadata (noise in diffs and in the rendered docs)."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        cell.metadata.pop("widgets", None)
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            data.pop("application/vnd.jupyter.widget-view+json", None)


def run(path: Path, *, fast: bool, timeout: int, write: bool) -> float:
    """Execute one notebook (in its own folder as working directory); return the wall time in seconds."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        record_timing=False,
    )
    t0 = time.perf_counter()
    client.execute()
    wall = time.perf_counter() - t0
    clean(nb)
    nb.metadata["comtip_tutorial"] = {
        "mode": "fast" if fast else "normal",
        "wall_s": round(wall, 1),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    if write:
        nbformat.write(nb, path)
    return wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fast", action="store_true", help="reduced sizes (COMTIP_TUTORIAL_FAST=1)")
    p.add_argument("--only", nargs="+", default=None, help="notebook name prefixes, e.g. 01 03")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per cell (default 3600)")
    p.add_argument("--no-write", action="store_true", help="do not save the executed notebooks")
    args = p.parse_args(argv)
    _env(args.fast)
    notebooks = sorted(HERE.glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        notebooks = [nb for nb in notebooks if any(nb.name.startswith(o) for o in args.only)]
    if not notebooks:
        print("no notebook matches", args.only, file=sys.stderr)
        return 1
    mode = "fast" if args.fast else "normal"
    for nb in notebooks:
        print(f"[{time.strftime('%H:%M:%S')}] {nb.name} ({mode} mode) ...", flush=True)
        wall = run(nb, fast=args.fast, timeout=args.timeout, write=not args.no_write)
        print(f"[{time.strftime('%H:%M:%S')}] {nb.name}: {wall:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
