"""benchmarks/gpu.py on a CPU (--tiny): it runs without the scverse stack and reports the documented JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"

# the GPU machine has torch, timm and Lightning but not anndata/spatialdata/scanpy: make them unimportable
RUN_WITHOUT_SCVERSE = """
import runpy, sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("anndata", "spatialdata", "scanpy", "squidpy"):
            raise ImportError(f"{name} is blocked in this test")

sys.meta_path.insert(0, Block())
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_gpu_benchmark_tiny_on_cpu_without_scverse(tmp_path):
    out = tmp_path / "gpu.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [str(SCRIPT), "--tiny", "--device", "cpu", "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, "-c", RUN_WITHOUT_SCVERSE, *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == json.loads(out.read_text())
    assert {"machine", "precision", "loader", "presets", "wall_s"} <= set(result)
    assert {"gpu", "torch", "cuda", "device"} <= set(result["machine"])
    assert result["machine"]["device"] == "cpu" and result["precision"] == "32-true"
    loader = result["loader"]
    assert loader["workers"] == 1 and loader["samples_per_s"] > 0
    rows = result["presets"]["tiny"]["results"]
    assert [r["batch_size"] for r in rows] == [4, 8]
    for r in rows:
        assert {"step_s", "samples_per_s", "loader_bound", "workers_needed", "loss_finite"} <= set(r)
        assert r["loss_finite"] and r["samples_per_s"] > 0
        assert r["loader_bound"] == (loader["samples_per_s"] < r["samples_per_s"])
    assert result["presets"]["tiny"]["best"]["batch_size"] in (4, 8)
