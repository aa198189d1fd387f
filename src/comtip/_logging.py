"""The package logger: ``logging.getLogger("comtip")``; INFO says what was added where."""

from __future__ import annotations

import logging

logger = logging.getLogger("comtip")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s [comtip] %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False


def set_verbosity(level: int | str) -> None:
    """Set the level of comtip's logger (``"info"``, ``"warning"``, ``logging.DEBUG`` …)."""
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
    logger.setLevel(level)
