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


def git_blob_sha1(path: str | os.PathLike) -> str:
    r"""Git's blob SHA-1 of a file, ``sha1(b"blob <size>\0" + content)``: the id a git repository lists it by."""
    size = os.path.getsize(path)
    h = hashlib.sha1(b"blob %d\0" % size, usedforsecurity=False)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_git_sha1(
    path: str | os.PathLike, expected: str, *, size: int | None = None, source: str = "", name: str | None = None
) -> None:
    """Refuse a file whose size or git blob SHA-1 is not the expected one (a truncated or altered download).

    ``source`` (the URL) and ``name`` (the file's name in messages, default its own) only word the error.
    """
    path = Path(path)
    got_size = path.stat().st_size
    where = f" from {source}" if source else ""
    label = name or path.name
    if size is not None and got_size != size:
        msg = (
            f"{label}{where} has {got_size} bytes, not the {size} of the published file: the download is "
            "truncated or altered. Download it again (delete the file first), or copy the file there by hand."
        )
        raise ValueError(msg)
    got = git_blob_sha1(path)
    if got != expected.lower():
        msg = (
            f"{label}{where} has git blob SHA-1 {got}, not the published {expected}: the download is corrupted "
            "or altered. Download it again (delete the file first), or copy the file there by hand."
        )
        raise ValueError(msg)


def _download(url: str, dest: Path, *, known_hash: str | None) -> None:
    """Download ``url`` to ``dest`` with :mod:`pooch` (retries; writes a temporary file before moving it in place)."""
    import pooch

    pooch.retrieve(
        url,
        known_hash=None if known_hash is None else f"sha256:{known_hash}",
        fname=dest.name,
        path=dest.parent,
        progressbar=False,
    )


def fetch(
    url: str, dest: Path, *, known_hash: str | None, git_sha1: str | None = None, size: int | None = None
) -> Path:
    """Download ``url`` to ``dest`` and check its SHA-256 and/or git blob SHA-1; an existing file is returned as is.

    The file is downloaded next to ``dest`` (``<name>.part``) and moved in place only once every given checksum
    matches, so a failed or corrupted download never leaves a file at ``dest``.
    """
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    part.unlink(missing_ok=True)  # a stale partial file would be taken as downloaded
    logger.warning("downloading %s -> %s", url, dest)
    try:
        _download(url, part, known_hash=known_hash)
    except Exception as e:
        part.unlink(missing_ok=True)
        msg = (
            f"Could not download {url} to {dest} ({type(e).__name__}: {e}). Without network access, copy the file "
            f"there by hand, or point comtip.settings.data_dir / $COMTIP_DATA_DIR at a folder that holds it."
        )
        raise OSError(msg) from e
    if git_sha1 is not None:
        try:
            check_git_sha1(part, git_sha1, size=size, source=url, name=dest.name)
        except ValueError:
            part.unlink(missing_ok=True)
            raise
    os.replace(part, dest)
    return dest
