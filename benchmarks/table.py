"""Render the JSON of ``accuracy.py`` as the Markdown table of ``benchmarks/README.md``.

Usage: python benchmarks/table.py results/accuracy_c6_cpu_default.json
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

COLUMNS = [
    "pcc_hvg50",
    "pcc_heg250",
    "pcc_hvg50_adj",
    "pcc_heg250_adj",
    "spearman_hvg50",
    "spearman_heg250",
    "mse_hvg50",
    "recall_at5",
]


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.3f}"


def render(result: dict) -> str:
    """One row per method, EVAL.md's columns, then the run's machine and times."""
    lines = ["| method | " + " | ".join(COLUMNS) + " |", "| --- |" + " --- |" * len(COLUMNS)]
    for name, row in result["methods"].items():
        lines.append(f"| `{name}` | " + " | ".join(_fmt(row.get(c)) for c in COLUMNS) + " |")
    m = result.get("machine", {})
    lines.append("")
    lines.append(
        f"Train {', '.join(result['train'])} ({result.get('n_train_spots')} spots) → evaluate "
        f"{', '.join(result['eval'])} ({result.get('n_eval_spots')} spots). Machine: {m.get('cpus')} CPU cores "
        f"({m.get('cpu_model')}), GPU {m.get('gpu')}, torch {m.get('torch')}, comtip {m.get('comtip')}. "
        f"Training {result.get('train_s')} s; whole run {result.get('wall_s')} s; peak RSS {result.get('peak_rss_mb')} MB. "
        f"Spatial context {result.get('spatial_context', 0.0)} for every method (0: each spot alone)."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(json.loads(Path(sys.argv[1]).read_text())))
