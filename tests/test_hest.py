"""ct.io.hest: HEST-1k folders (st/, metadata/, patches/, wsis/) -> SpatialData with tiles; its errors."""

from __future__ import annotations

import json
import pickle
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

import comtip as ct
from comtip import _constants as C
from comtip._spatial import get_units
from comtip.data import SpotDataset, TileReader
from comtip.pp._tiles import TILE_COLUMNS

sys.path.insert(0, str(Path(__file__).parent))
from _hest_fixture import write_hest_fixture

pytestmark = pytest.mark.realdata  # the fixture is cut from the real her2st_tiny


@pytest.fixture(scope="module")
def hest_root(data_dir, tmp_path_factory) -> Path:
    return write_hest_fixture(tmp_path_factory.mktemp("hest"), ("S1", "S2"), data_dir=data_dir)


@pytest.fixture
def hest_copy(hest_root, tmp_path) -> Path:
    """A private copy of the folder, for tests that break it."""
    return Path(shutil.copytree(hest_root, tmp_path / "hest"))


def _tiles(sdata) -> pd.DataFrame:
    return pd.DataFrame(sdata.shapes[C.TILES_KEY].drop(columns="geometry"))


def _patches(path: Path) -> tuple[np.ndarray, list[str]]:
    with h5py.File(path, "r") as f:
        return f["img"][()], [b[0].decode() for b in f["barcode"][()]]


def test_hest_keys_and_shapes(hest_root, data_dir):
    sdata = ct.io.hest(hest_root)
    assert set(sdata.images) == {"S1_patches", "S2_patches"}
    assert set(sdata.shapes) == {"S1_spots", "S2_spots", C.TILES_KEY}
    table = sdata.tables[C.TABLE_KEY]
    assert table.n_obs == 49 + 45 and table.n_vars == 256
    assert list(table.obs[C.SECTION_KEY].cat.categories) == ["S1", "S2"]
    assert (table.obs[C.SECTION_KEY] == "S1").sum() == 49
    assert C.COUNTS_LAYER in table.layers and table.uns[C.INPUT_KEY]["x_is_counts"]
    assert set(table.obs["st_technology"]) == {"Spatial Transcriptomics"}
    # raw counts, unchanged: spot 19x19 of S1 is the first row of the fixture's counts
    counts = pd.read_csv(data_dir / "her2st_tiny" / "counts.tsv.gz", sep="\t", index_col=0)
    row = table[table.obs_names == "S1_19x19"]
    assert table.obs.loc["S1_19x19", "spot"] == "19x19"
    genes = [g for g in counts.columns if g in table.var_names][:50]
    assert np.array_equal(row[:, genes].X.toarray().ravel(), counts.loc["19x19", genes].to_numpy(np.float32))
    # spots: 100 µm circles in WSI pixels (1.376 µm/px), sections in µm
    spots = sdata.shapes["S1_spots"]
    assert np.allclose(spots["radius"], 50 / 1.376)
    assert get_units(sdata, "S1") == "um" and get_units(sdata, "S1_patches") == "um"
    assert sdata.attrs["comtip"]["hest"]["S2"]["organ"] == "Breast"
    # tiles: the columns ct.pp.spot_tiles writes; every spot but the one without a patch
    tiles = _tiles(sdata)
    assert list(tiles.columns) == TILE_COLUMNS
    assert len(tiles) == 48 + 44 and tiles["obs_name"].isin(table.obs_names).all()
    assert (
        (tiles["tile_size_um"] == 112.0).all() and (tiles["tile_size_px"] == 224).all() and (tiles["size"] == 224).all()
    )
    assert set(tiles["image"]) == {"S1_patches", "S2_patches"}


def test_hest_tiles_are_the_patch_pixels(hest_root):
    sdata = ct.io.hest(hest_root)
    tiles = _tiles(sdata)
    obs = sdata.tables[C.TABLE_KEY].obs
    reader = TileReader(sdata, tiles)
    native = reader.read(np.arange(len(tiles)), native=True)
    resized = reader.read(np.arange(len(tiles)))
    assert tuple(resized.shape) == (len(tiles), 3, 224, 224)
    for sample in ("S1", "S2"):
        img, barcodes = _patches(hest_root / "patches" / f"{sample}.h5")
        for k in np.flatnonzero(tiles["image"].to_numpy() == f"{sample}_patches"):
            j = barcodes.index(obs.loc[tiles["obs_name"].iloc[k], "spot"])
            assert np.array_equal(native[k], np.moveaxis(img[j], -1, 0)), (sample, k)
    # the reader travels to DataLoader workers without an open HDF5 handle, and reads there
    again = pickle.loads(pickle.dumps(reader))
    assert np.array_equal(again.read([5], native=True)[0], native[5])
    # each tile box is centred on its spot, in the spots' pixel grid
    gdf = sdata.shapes[C.TILES_KEY]
    spots = sdata.shapes["S1_spots"]
    s1 = gdf[gdf["region"] == "S1_spots"]
    centre = spots.geometry.loc[s1[C.INSTANCE_KEY].to_numpy()]
    assert np.allclose(s1.geometry.centroid.x.to_numpy(), centre.x.to_numpy())
    assert np.allclose(s1.geometry.centroid.y.to_numpy(), centre.y.to_numpy())
    # a training dataset reads them
    ds = SpotDataset(sdata, genes=list(sdata.tables[C.TABLE_KEY].var_names[:20]))
    assert len(ds) == len(tiles)
    images = ds.images([0, 1, 2])
    assert tuple(images.shape) == (3, 3, 224, 224) and float(images.max()) <= 1.0


def test_hest_wsi_tiles(hest_root):
    from_wsi = ct.io.hest(hest_root, "S1", patches=False, wsi=True)
    assert set(from_wsi.images) == {"S1_he"}
    tiles = _tiles(from_wsi)
    assert set(tiles["image"]) == {"S1_he"} and len(tiles) == 49
    assert (tiles["tile_size_um"] == 112.0).all() and (tiles["tile_size_px"] == 224).all()
    wsi_tiles = TileReader(from_wsi, tiles).read(np.arange(len(tiles))).numpy().astype(float)
    # the slide's tiles cover what the patches cover (cut from the same place, resampled alike)
    img, barcodes = _patches(hest_root / "patches" / "S1.h5")
    obs = from_wsi.tables[C.TABLE_KEY].obs
    diffs = []
    for k, name in enumerate(tiles["obs_name"]):
        spot = obs.loc[name, "spot"]
        if spot in barcodes:
            diffs.append(np.abs(wsi_tiles[k] - np.moveaxis(img[barcodes.index(spot)], -1, 0)).mean())
    assert len(diffs) == 48 and np.median(diffs) < 2, np.median(diffs)  # measured: 0.005


def test_hest_patches_with_wsi(hest_root):
    sdata = ct.io.hest(hest_root, ["S2"], wsi=True)
    assert set(sdata.images) == {"S2_he", "S2_patches"}
    assert set(_tiles(sdata)["image"]) == {"S2_patches"}
    ct.pp.spot_tiles(sdata, overwrite=True)  # the slide can be tiled again, at any size
    assert set(_tiles(sdata)["image"]) == {"S2_he"} and len(_tiles(sdata)) == 45


def test_hest_sample_subset(hest_root):
    sdata = ct.io.hest(hest_root, "S2")
    table = sdata.tables[C.TABLE_KEY]
    assert set(table.obs[C.SECTION_KEY]) == {"S2"} and table.n_obs == 45
    assert set(sdata.shapes) == {"S2_spots", C.TILES_KEY} and len(_tiles(sdata)) == 44
    both = ct.io.hest(hest_root, ["S2", "S1"])
    assert list(both.tables[C.TABLE_KEY].obs[C.SECTION_KEY].cat.categories) == ["S2", "S1"]


def test_hest_unknown_sample(hest_root):
    with pytest.raises(ValueError, match=r"Unknown HEST sample 'TENX95'.*S1, S2"):
        ct.io.hest(hest_root, ["S1", "TENX95"])


@pytest.mark.parametrize(("folder", "name"), [("st", "S1.h5ad"), ("metadata", "S1.json")])
def test_hest_missing_file(hest_copy, folder, name):
    (hest_copy / folder / name).unlink()
    with pytest.raises(
        FileNotFoundError, match=rf"'S1'.*{folder}/{name} is missing.*snapshot_download.*MahmoodLab/hest"
    ):
        ct.io.hest(hest_copy, "S1")


def test_hest_no_patches_no_wsi(hest_copy):
    (hest_copy / "patches" / "S1.h5").unlink()
    with pytest.raises(FileNotFoundError, match=r"'S1' has no image to tile: patches/S1.h5 is missing.*wsi=True"):
        ct.io.hest(hest_copy)
    sdata = ct.io.hest(hest_copy, wsi=True)  # S1 from its slide, S2 from its patches
    assert set(_tiles(sdata)["image"]) == {"S1_he", "S2_patches"}
    with pytest.raises(ValueError, match=r"patches=False and wsi=False leave no image"):
        ct.io.hest(hest_copy, patches=False)


def test_hest_barcodes_not_in_table(hest_copy):
    with h5py.File(hest_copy / "patches" / "S1.h5", "a") as f:
        n = len(f["barcode"])
        del f["barcode"]
        f.create_dataset("barcode", data=np.array([[f"AAAC-{i}".encode()] for i in range(n)]))
    with pytest.raises(ValueError, match=r"'S1': 48 of 48 patch barcodes .*AAAC-0.*do not belong together"):
        ct.io.hest(hest_copy, "S1")


def test_hest_metadata_without_pixel_size(hest_copy):
    path = hest_copy / "metadata" / "S1.json"
    meta = json.loads(path.read_text())
    del meta["pixel_size_um_estimated"], meta["pixel_size_um_embedded"]
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"'S1'.*no pixel size \(pixel_size_um_estimated or pixel_size_um_embedded"):
        ct.io.hest(hest_copy, "S1")


def test_hest_missing_wsi(hest_copy):
    (hest_copy / "wsis" / "S1.tif").unlink()
    with pytest.raises(FileNotFoundError, match=r"wsis/S1.tif is missing.*wsi=True"):
        ct.io.hest(hest_copy, "S1", wsi=True)
