"""Shared by the benchmarks: machine facts, peak memory, JSON output (one object on the last line)."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time


def machine() -> dict:
    """Cores, CPU model, GPU (if any), Python and torch versions."""
    info = {
        "cpus": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    try:
        import comtip

        info["comtip"] = comtip.__version__
    except ImportError:
        pass
    return info


def peak_rss_mb() -> float:
    """Peak resident memory of this process (and its finished children) in MB."""
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(self_kb, child_kb) / 1024, 1)


class Timer:
    """``with Timer() as t: ...; t.s`` — wall seconds."""

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0


def emit(result: dict, path: str | None = None) -> None:
    """Print the result as one JSON object on the last line (and write it to ``path``)."""
    text = json.dumps(result, default=float)
    if path:
        with open(path, "w") as fh:
            fh.write(json.dumps(result, indent=2, default=float) + "\n")
    print(text)
