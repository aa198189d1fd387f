"""Shared fixtures: the real data folder (skipped with a reason when absent) and tiny synthetic data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import comtip as ct

os.environ.setdefault("MPLBACKEND", "agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _quiet_settings(tmp_path_factory):
    """No progress bars in tests, a private cache folder, and no current model leaking between tests."""
    ct.settings.show_progress_bar = False
    old_model = ct.settings.model
    yield
    ct.settings._model = old_model


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    # gene-text embeddings are cached per session, not in the user's home
    if "COMTIP_CACHE_DIR" not in os.environ:
        ct.settings.cache_dir = tmp_path_factory.mktemp("comtip_cache")
    yield


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``$COMTIP_DATA_DIR`` (CI: ``../shared/data``); tests that need it are skipped when it is absent."""
    env = os.environ.get("COMTIP_DATA_DIR")
    if not env:
        default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
        env = str(default) if default.is_dir() else ""
    if not env or not Path(env).is_dir():
        pytest.skip("real data not available: set COMTIP_DATA_DIR to comtip's data folder (CI: ../shared/data)")
    return Path(env)


@pytest.fixture(scope="session")
def her2st_dir(data_dir) -> Path:
    path = data_dir / "her2st"
    if not (path / "ST-cnts" / "C2.tsv.gz").is_file():
        pytest.skip(f"HER2ST not found under {data_dir}")
    return data_dir


@pytest.fixture
def rng():
    return np.random.default_rng(0)
