"""Global settings: device, workers, progress bars, data and cache folders, verbosity, current model."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._logging import logger, set_verbosity

if TYPE_CHECKING:
    from .model import CoMTIP


class Settings:
    """comtip's settings, available as :data:`comtip.settings`.

    Attributes
    ----------
    device
        ``None`` picks CUDA when available, else the CPU (MPS is never picked automatically).
    num_workers
        Default number of DataLoader workers.
    show_progress_bar
        Show tqdm progress bars on long work.
    cpu_chunk_size
        Images per pass of the image tower on the CPU when no gradient is needed (embedding, prediction, cached
        features). Batches of the DataLoader are split into chunks of this size: on the CPU a few images per pass
        are faster and need far less memory than 64 (the results are the same). ``0`` or ``None``: no splitting.
    data_dir
        Folder of the named datasets (``$COMTIP_DATA_DIR``, else ``~/.cache/comtip/data``).
    cache_dir
        Folder for downloads and cached gene-text embeddings (``$COMTIP_CACHE_DIR``, else ``~/.cache/comtip``).
    model
        The current model, set by :func:`comtip.tl.pretrain` and :func:`comtip.tl.load_model`;
        every function with ``model=None`` uses it.
    """

    def __init__(self) -> None:
        self.device: str | None = None
        self.num_workers: int = 0
        self.show_progress_bar: bool = True
        self._cpu_chunk_size: int | None = 4
        self._data_dir: Path | None = None
        self._cache_dir: Path | None = None
        self._model: CoMTIP | None = None
        self._verbosity = "warning"

    @property
    def cache_dir(self) -> Path:
        if self._cache_dir is not None:
            return self._cache_dir
        env = os.environ.get("COMTIP_CACHE_DIR")
        return Path(env).expanduser() if env else Path.home() / ".cache" / "comtip"

    @cache_dir.setter
    def cache_dir(self, value: str | os.PathLike | None) -> None:
        self._cache_dir = None if value is None else Path(value).expanduser()

    @property
    def data_dir(self) -> Path:
        if self._data_dir is not None:
            return self._data_dir
        env = os.environ.get("COMTIP_DATA_DIR")
        return Path(env).expanduser() if env else self.cache_dir / "data"

    @data_dir.setter
    def data_dir(self, value: str | os.PathLike | None) -> None:
        self._data_dir = None if value is None else Path(value).expanduser()

    @property
    def cpu_chunk_size(self) -> int | None:
        return self._cpu_chunk_size

    @cpu_chunk_size.setter
    def cpu_chunk_size(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            msg = f"settings.cpu_chunk_size must be a positive int, 0 or None (no splitting), not {value!r}."
            raise ValueError(msg)
        self._cpu_chunk_size = value or None

    @property
    def verbosity(self) -> str:
        return self._verbosity

    @verbosity.setter
    def verbosity(self, value: str | int) -> None:
        set_verbosity(value)
        self._verbosity = value

    @property
    def model(self) -> CoMTIP | None:
        return self._model

    @model.setter
    def model(self, value: CoMTIP | None) -> None:
        # the model module is loaded whenever a CoMTIP exists: look it up instead of importing it (no import circle)
        loaded = sys.modules.get("comtip.model._comtip")
        if value is not None and (loaded is None or not isinstance(value, loaded.CoMTIP)):
            msg = f"settings.model must be a comtip.CoMTIP, not {type(value).__name__}."
            raise TypeError(msg)
        self._model = value
        if value is not None:
            logger.info("current model set: %s", value.name)

    def __repr__(self) -> str:
        fields: dict[str, Any] = {
            "device": self.device,
            "num_workers": self.num_workers,
            "show_progress_bar": self.show_progress_bar,
            "cpu_chunk_size": self.cpu_chunk_size,
            "data_dir": str(self.data_dir),
            "cache_dir": str(self.cache_dir),
            "verbosity": self.verbosity,
            "model": None if self._model is None else self._model.name,
        }
        return "comtip settings:\n" + "\n".join(f"  {k}: {v}" for k, v in fields.items())


settings = Settings()
