"""Checksummed downloads of public dataset files into the data folder (users' machines only)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .._logging import logger


def sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(url: str, dest: Path, *, known_hash: str | None) -> Path:
    """Download ``url`` to ``dest`` (atomically) and check its SHA-256; an existing file is returned as is.

    Uses :mod:`pooch`, which retries and writes to a temporary file before moving it in place.
    """
    if dest.is_file():
        return dest
    import pooch

    dest.parent.mkdir(parents=True, exist_ok=True)
    logger.warning("downloading %s -> %s", url, dest)
    try:
        pooch.retrieve(
            url,
            known_hash=None if known_hash is None else f"sha256:{known_hash}",
            fname=dest.name,
            path=dest.parent,
            progressbar=False,
        )
    except Exception as e:
        msg = (
            f"Could not download {url} to {dest} ({type(e).__name__}: {e}). Without network access, copy the file "
            f"there by hand, or point comtip.settings.data_dir / $COMTIP_DATA_DIR at a folder that holds it."
        )
        raise OSError(msg) from e
    return dest
