"""A small folder in HEST-1k's layout, cut from the real HER2ST tiny fixture (``her2st_tiny``), for tests.

Import it from a test module as ``tests/test_reproducible.py`` imports ``conftest``::

    sys.path.insert(0, str(Path(__file__).parent))
    from _hest_fixture import write_hest_fixture

Per sample id it writes ``st/{id}.h5ad`` (raw counts, ``obsm['spatial']`` in WSI pixels), ``metadata/{id}.json``,
``patches/{id}.h5`` (224 x 224 patches at 0.5 µm/px, as HEST's ``dump_patches`` cuts them: top-left corner
``spot centre - footprint // 2`` in ``coords``) and ``wsis/{id}.tif`` (a 2-level pyramidal TIFF of the H&E crop,
1.376 µm/px, with its resolution tags). Sample ``i`` keeps the spots from the ``4 * i``-th on (49, 45, 41, ... spots),
so samples differ; the patch file holds every spot of its sample but the last, in reverse order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

PATCH_PX = 224
PATCH_MPP = 0.5


def _her2st_tiny(data_dir: str | os.PathLike | None) -> Path:
    if data_dir is None:
        env = os.environ.get("COMTIP_DATA_DIR")
        data_dir = env if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    path = Path(data_dir) / "her2st_tiny"
    if not (path / "counts.tsv.gz").is_file():
        import pytest

        pytest.skip(f"her2st_tiny not found under {data_dir}: set COMTIP_DATA_DIR to comtip's data folder")
    return path


def _write_pyramid(path: Path, rgb: np.ndarray, *, mpp: float) -> None:
    import tifffile
    from PIL import Image

    half = np.asarray(Image.fromarray(rgb).reduce(2))
    with tifffile.TiffWriter(path) as tw:
        for i, level in enumerate((rgb, half)):
            tw.write(
                level,
                tile=(256, 256),
                photometric="rgb",
                subfiletype=1 if i else 0,
                resolution=(1e4 / (mpp * 2**i),) * 2,
                resolutionunit="CENTIMETER",
                metadata=None,
            )


def write_hest_fixture(
    root: str | os.PathLike, sample_ids: Sequence[str] = ("S1", "S2"), *, data_dir: str | os.PathLike | None = None
) -> Path:
    """Write a HEST-layout folder under ``root`` (created if needed) and return ``root`` as a :class:`~pathlib.Path`.

    ``data_dir`` is comtip's data folder (default ``$COMTIP_DATA_DIR``, else ``../shared/data``); the test is skipped
    when ``her2st_tiny`` is not there.
    """
    import anndata as ad
    import h5py
    import pandas as pd
    from PIL import Image
    from scipy import sparse

    src = _her2st_tiny(data_dir)
    root = Path(root)
    for folder in ("st", "metadata", "patches", "wsis"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    meta_src = json.loads((src / "meta.json").read_text())
    mpp = float(meta_src["approx_um_per_px_crop"])
    counts = pd.read_csv(src / "counts.tsv.gz", sep="\t", index_col=0)
    spots = pd.read_csv(src / "spots.tsv", sep="\t", index_col=0).loc[counts.index]
    image = Image.open(src / "C2_crop_HE.jpg").convert("RGB")
    rgb = np.asarray(image)
    footprint = PATCH_PX * PATCH_MPP / mpp  # patch side in WSI pixels (HEST's patch_size_src)
    read_px = round(footprint)
    patch_cache: dict[str, np.ndarray] = {}
    wsi_written: Path | None = None
    for i, sample in enumerate(sample_ids):
        start = min(4 * i, len(counts) - 9)
        cnt, spt = counts.iloc[start:], spots.iloc[start:]
        barcodes = cnt.index.astype(str)
        xy = spt[["pixel_x", "pixel_y"]].to_numpy(float)
        obs = pd.DataFrame(
            {
                "in_tissue": 1,
                "array_row": spt["array_y"].to_numpy(),
                "array_col": spt["array_x"].to_numpy(),
                "pxl_col_in_fullres": xy[:, 0],
                "pxl_row_in_fullres": xy[:, 1],
            },
            index=pd.Index(barcodes, name=None),
        )
        adata = ad.AnnData(
            X=sparse.csr_matrix(cnt.to_numpy(np.float32)),
            obs=obs,
            var=pd.DataFrame(index=cnt.columns.astype(str)),
            obsm={"spatial": xy},
            uns={"spatial": {"ST": {"scalefactors": {"spot_diameter_fullres": 100.0 / mpp}}}},
        )
        adata.write_h5ad(root / "st" / f"{sample}.h5ad")
        meta = {
            "id": sample,
            "dataset_title": "HER2ST C2 crop (comtip test fixture)",
            "organ": "Breast",
            "disease_state": "Cancer",
            "oncotree_code": "IDC",
            "species": "Homo sapiens",
            "st_technology": "Spatial Transcriptomics",
            "inter_spot_dist": 200.0,
            "spot_diameter": 100.0,
            "pixel_size_um_embedded": mpp,
            "pixel_size_um_estimated": mpp,
            "magnification": "10x",
            "fullres_px_width": rgb.shape[1],
            "fullres_px_height": rgb.shape[0],
        }
        (root / "metadata" / f"{sample}.json").write_text(json.dumps(meta, indent=1))
        # patches: every spot but the last, in reverse order (matched by barcode, never by position)
        order = np.arange(len(barcodes) - 1)[::-1]
        topleft = (xy[order] - footprint // 2).astype(np.int64)
        imgs = np.empty((len(order), PATCH_PX, PATCH_PX, 3), dtype=np.uint8)
        for k, (j, (x, y)) in enumerate(zip(order, topleft, strict=True)):
            bc = barcodes[j]
            if bc not in patch_cache:
                box = (int(x), int(y), int(x) + read_px, int(y) + read_px)
                patch_cache[bc] = np.asarray(image.crop(box).resize((PATCH_PX, PATCH_PX), Image.Resampling.BICUBIC))
            imgs[k] = patch_cache[bc]
        with h5py.File(root / "patches" / f"{sample}.h5", "w") as f:
            f.create_dataset("img", data=imgs, chunks=(1, PATCH_PX, PATCH_PX, 3))
            f.create_dataset("barcode", data=np.array([[barcodes[j].encode()] for j in order]))
            f.create_dataset("coords", data=topleft)
        wsi = root / "wsis" / f"{sample}.tif"
        if wsi_written is None:
            _write_pyramid(wsi, rgb, mpp=mpp)
            wsi_written = wsi
        else:
            wsi.write_bytes(wsi_written.read_bytes())
    return root
