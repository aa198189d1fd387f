"""Named real datasets, read from the data folder (:attr:`comtip.settings.data_dir`), downloaded on a miss."""

from ._fixtures import visium_mouse_brain_crop
from ._her2st import HER2ST_IMAGED, HER2ST_IMAGES, HER2ST_SECTIONS, her2st, her2st_tiny, mouse_olfactory_bulb

__all__ = [
    "HER2ST_IMAGED",
    "HER2ST_IMAGES",
    "HER2ST_SECTIONS",
    "her2st",
    "her2st_tiny",
    "mouse_olfactory_bulb",
    "visium_mouse_brain_crop",
]
