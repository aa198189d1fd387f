"""What :func:`write_corpus` reads: SpatialData objects and HEST-1k folders, expanded into one source per sample."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import _constants as C
from ._format import CorpusError


@dataclass
class _Source:
    """One SpatialData (in memory, or a HEST sample read when needed) and what it yields."""

    label: str
    sdata: Any = None
    hest: tuple[Path, str] | None = None
    sample_ids: list[str] = field(default_factory=list)
    _cache: dict[str, Any] = field(default_factory=dict)

    def get(self):
        if self.sdata is not None:
            return self.sdata
        from ..io._hest import hest

        root, sid = self.hest
        # one HEST sample at a time: memory stays that of one sample however large the folder
        return hest(root, [sid])


def _is_hest_root(x) -> bool:
    return isinstance(x, str | os.PathLike) and (Path(x) / "st").is_dir()


def _hest_ids(root: Path) -> list[str]:
    ids = sorted(p.name[: -len(".h5ad")] for p in (root / "st").glob("*.h5ad"))
    if not ids:
        msg = f"HEST folder {str(root)!r} holds no sample (st/*.h5ad). Download HEST-1k samples there first."
        raise CorpusError(msg)
    return ids


def _hest_available() -> bool:
    try:
        from ..io import _hest  # noqa: F401
    except ImportError:  # pragma: no cover - comtip without the HEST reader
        return False
    return True


def _sources(sources, *, table_key: str) -> list[_Source]:
    """Expand ``sources`` into one :class:`_Source` per SpatialData or HEST sample, with their sample ids."""
    from spatialdata import SpatialData

    def is_pair(x) -> bool:
        return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str | os.PathLike) and isinstance(x[1], str)

    if isinstance(sources, SpatialData | str | os.PathLike) or is_pair(sources):
        sources = [sources]
    out: list[_Source] = []
    for i, src in enumerate(sources):
        if isinstance(src, SpatialData):
            table = _table(src, table_key, label=f"source {i}")
            ids = _section_values(table, label=f"source {i}")
            label = f"spatialdata:{src.path}" if src.path is not None else "spatialdata"
            out.append(_Source(label=label, sdata=src, sample_ids=ids))
        elif is_pair(src) or isinstance(src, str | os.PathLike):
            root, sid = (Path(src[0]), src[1]) if is_pair(src) else (Path(src), None)
            if not _hest_available():  # pragma: no cover
                msg = "HEST sources need comtip.io.hest, which this comtip lacks; read the samples into SpatialData first."
                raise CorpusError(msg)
            if not _is_hest_root(root):
                msg = (
                    f"Source {i} ({str(root)!r}) is not a HEST folder (no st/ inside). Pass SpatialData objects, HEST "
                    "folders, or (HEST folder, sample id) pairs."
                )
                raise CorpusError(msg)
            ids = [sid] if sid is not None else _hest_ids(root)
            for s in ids:
                if not (root / "st" / f"{s}.h5ad").is_file():
                    msg = f"HEST sample {s!r} not found: {str(root / 'st' / (s + '.h5ad'))!r} does not exist. Check the id."
                    raise CorpusError(msg)
                out.append(_Source(label=f"hest:{root}", hest=(root, s), sample_ids=[s]))
        else:
            msg = (
                f"Source {i} is a {type(src).__name__}; write_corpus takes SpatialData objects, HEST folders (str or "
                "Path) and (HEST folder, sample id) pairs."
            )
            raise CorpusError(msg)
    seen: dict[str, int] = {}
    for i, s in enumerate(out):
        for sid in s.sample_ids:
            if sid in seen:
                where = "the same source" if seen[sid] == i else f"sources {seen[sid]} and {i}"
                msg = (
                    f"Sample id {sid!r} appears twice ({where}); sample ids must be unique in a corpus. Rename the "
                    f"sections (table.obs[{C.SECTION_KEY!r}]) of one of them."
                )
                raise CorpusError(msg)
            seen[sid] = i
    if not out:
        msg = "No source given: pass SpatialData objects and/or HEST folders."
        raise CorpusError(msg)
    return out


def _table(sdata, table_key: str, *, label: str):
    if table_key not in sdata.tables:
        msg = f"{label}: no table {table_key!r} (tables: {list(sdata.tables) or 'none'}); pass table_key=."
        raise CorpusError(msg)
    return sdata.tables[table_key]


def _section_values(table, *, label: str) -> list[str]:
    if C.SECTION_KEY not in table.obs:
        msg = (
            f"{label}: table has no obs[{C.SECTION_KEY!r}], which names the sample of each spot. Add it (one value per "
            "sample), or read the data with a comtip reader."
        )
        raise CorpusError(msg)
    values = table.obs[C.SECTION_KEY].astype(str).to_numpy()
    ids = list(dict.fromkeys(values))
    if not ids:
        msg = f"{label}: the table has no spots; there is nothing to write."
        raise CorpusError(msg)
    return ids
