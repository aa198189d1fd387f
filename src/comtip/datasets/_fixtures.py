"""Small real fixtures from the scverse test data (Visium mouse brain crop)."""

from __future__ import annotations

import os

from ._her2st import _data_dir


def visium_mouse_brain_crop(*, data_dir: str | os.PathLike | None = None):
    """49 Visium spots of the 10x "V1_Adult_Mouse_Brain" sample with a crop of its full-resolution H&E.

    From the scverse/squidpy test data (BSD-3): ``test_data.h5ad`` (49 spots x 1,999 mouse genes; ``X`` is
    log1p-normalised, not counts) and ``test_img.jpg`` (950 x 1717 px crop of the full-resolution image, in whose
    pixel space ``obsm['spatial']`` lies). Read with :func:`comtip.io.from_anndata`; pixel size 55 µm /
    ``spot_diameter_fullres`` (≈ 0.615 µm/px). For tests and quick looks.

    Parameters
    ----------
    data_dir
        Folder holding ``visium_mouse_brain_crop/``; by default :attr:`comtip.settings.data_dir`.

    Returns
    -------
    SpatialData with image ``"V1_Adult_Mouse_Brain_he"``, shapes ``"V1_Adult_Mouse_Brain_spots"`` and table
    ``"table"`` whose ``X`` holds the log1p values (no ``layers['counts']``; ``uns['comtip_input']`` says
    ``x_is_counts=False``, ``x_transform='log1p'``).

    Examples
    --------
    >>> sdata = ct.datasets.visium_mouse_brain_crop()
    """
    import warnings

    import anndata as ad

    from ..io import from_anndata

    root = _data_dir(data_dir) / "visium_mouse_brain_crop"
    h5ad, image = root / "test_data.h5ad", root / "test_img.jpg"
    if not (h5ad.is_file() and image.is_file()):
        msg = (
            f"visium_mouse_brain_crop not found under {root.parent} (needs test_data.h5ad and test_img.jpg); "
            "set data_dir= or $COMTIP_DATA_DIR to comtip's data folder."
        )
        raise FileNotFoundError(msg)
    adata = ad.read_h5ad(h5ad)
    with warnings.catch_warnings():
        # known: X of this fixture is log1p-normalised; the table records it in uns['comtip_input']
        warnings.filterwarnings("ignore", message="adata.X is not raw counts", category=UserWarning)
        return from_anndata(adata, image=image)
