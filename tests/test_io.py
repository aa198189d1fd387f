"""Readers: legacy ST (HER2ST), Visium folders, AnnData with uns['spatial'], whole-slide images; their errors."""

from __future__ import annotations

import pickle
import sys
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import sparse

import comtip as ct
from comtip import _constants as C
from comtip._spatial import get_units, table_regions

MPP_TIFF = 1.376


def _transform(element, cs):
    from spatialdata.transformations import get_transformation

    return get_transformation(element, to_coordinate_system=cs)


def _scale(element, cs) -> float:
    m = np.asarray(_transform(element, cs).to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")))
    assert np.isclose(m[0, 0], m[1, 1]) and np.allclose(m[:2, 2], 0) and np.isclose(m[0, 1], 0)
    return float(m[0, 0])


def _level0(element):
    from xarray import DataTree

    return element["scale0"]["image"] if isinstance(element, DataTree) else element


def _check_conventions(sdata, section: str, n_spots: int) -> None:
    """Elements, table columns and units every comtip reader guarantees."""
    region = f"{section}{C.SPOTS_SUFFIX}"
    assert get_units(sdata, section) == "um"
    assert len(sdata.shapes[region]) == n_spots
    assert "radius" in sdata.shapes[region]
    table = sdata.tables[C.TABLE_KEY]
    regions, region_key, instance_key = table_regions(sdata, C.TABLE_KEY)
    assert region in regions
    assert (region_key, instance_key) == (C.REGION_KEY, C.INSTANCE_KEY)
    sub = table[table.obs[C.REGION_KEY] == region]
    assert sub.n_obs == n_spots
    assert (sub.obs[C.SECTION_KEY] == section).all()
    assert isinstance(table.obs[C.REGION_KEY].dtype, pd.CategoricalDtype)
    assert np.array_equal(np.sort(sub.obs[C.INSTANCE_KEY].to_numpy()), sdata.shapes[region].index.to_numpy())
    assert sparse.issparse(table.X) and table.X.dtype == np.float32
    assert C.ORIGINAL_SYMBOLS in table.var
    assert table.var_names.is_unique


# --- legacy ST -------------------------------------------------------------------------------------------------------
@pytest.mark.realdata
def test_her2st_c2_spots(her2st_dir):
    sdata = ct.datasets.her2st(["C2"], data_dir=her2st_dir, download=False)
    # 187 selected spots in the spot file, all with a count row
    _check_conventions(sdata, "C2", 187)
    table = sdata.tables[C.TABLE_KEY]
    assert table.n_vars > 15_000
    assert (table.layers[C.COUNTS_LAYER] != table.X).nnz == 0
    assert np.isclose(_scale(_level0(sdata.images["C2_he"]), "C2"), C.HER2ST_MPP)
    assert np.isclose(_scale(sdata.shapes["C2_spots"], "C2"), C.HER2ST_MPP)


@pytest.mark.realdata
def test_her2st_tiny(data_dir):
    sdata = ct.datasets.her2st_tiny(data_dir=data_dir)
    _check_conventions(sdata, "C2crop", 49)
    table = sdata.tables[C.TABLE_KEY]
    assert table.n_vars == 256  # no two of its 256 symbols harmonise to the same one
    assert _level0(sdata.images["C2crop_he"]).shape == (3, 1036, 1047)
    assert list(_level0(sdata.images["C2crop_he"]).coords["c"].values) == ["r", "g", "b"]
    assert np.isclose(_scale(_level0(sdata.images["C2crop_he"]), "C2crop"), 1.376, rtol=1e-3)


def test_her2st_unknown_section(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown HER2ST section.*Z9.*available"):
        ct.datasets.her2st(["Z9"], data_dir=tmp_path, download=False)


def _st_frames(n: int = 4, genes=("ERBB2", "KRT19")) -> tuple[pd.DataFrame, pd.DataFrame]:
    spots = pd.DataFrame({"x": np.arange(n) + 1, "y": np.ones(n, dtype=int)})
    spots["pixel_x"] = 100.0 + 200.0 * np.arange(n) / 0.5
    spots["pixel_y"] = 100.0
    spots.index = [f"{x}x{y}" for x, y in zip(spots["x"], spots["y"], strict=True)]
    counts = pd.DataFrame(np.arange(n * len(genes)).reshape(n, len(genes)), index=spots.index, columns=list(genes))
    return counts, spots


def test_read_st_pixel_size_missing():
    counts, spots = _st_frames()
    with pytest.raises(ValueError, match=r"Pixel size missing.*mpp=.*0\.500 µm/px"):
        ct.io.read_st(counts, spots, section="S", mpp=None)


def test_read_st_image_missing(tmp_path):
    counts, spots = _st_frames()
    with pytest.raises(FileNotFoundError, match=r"Image of 'S_he' not found.*nope\.jpg"):
        ct.io.read_st(counts, spots, tmp_path / "nope.jpg", section="S", mpp=0.5)


def test_read_st_spots_and_counts_do_not_match():
    counts, spots = _st_frames()
    counts.index = [f"{i}x9" for i in range(len(counts))]
    with pytest.raises(ValueError, match=r"Spot file and counts of section 'S' do not match"):
        ct.io.read_st(counts, spots, section="S", mpp=0.5)


def test_gene_symbols_harmonised():
    counts, spots = _st_frames(genes=("ATP5A1", "ATP5F1A", "erbb2"))
    sdata = ct.io.read_st(counts, spots, section="S", mpp=0.5)
    table = sdata.tables[C.TABLE_KEY]
    assert list(table.var_names) == ["ATP5F1A", "ERBB2"]
    assert table.var.loc["ATP5F1A", C.ORIGINAL_SYMBOLS] == "ATP5A1;ATP5F1A"
    assert table.var.loc["ERBB2", C.ORIGINAL_SYMBOLS] == "erbb2"
    summed = counts["ATP5A1"].to_numpy() + counts["ATP5F1A"].to_numpy()
    assert np.array_equal(table[:, "ATP5F1A"].X.toarray().ravel(), summed)
    assert np.array_equal(table[:, "ATP5F1A"].layers[C.COUNTS_LAYER].toarray().ravel(), summed)


def test_table_without_annotation_is_refused():
    from spatialdata import SpatialData

    counts, spots = _st_frames()
    sdata = ct.io.read_st(counts, spots, section="S", mpp=0.5)
    table = sdata.tables[C.TABLE_KEY].copy()
    del table.uns["spatialdata_attrs"]
    bare = SpatialData(shapes=dict(sdata.shapes))
    bare.tables[C.TABLE_KEY] = table
    with pytest.raises(ValueError, match=r"Table 'table' does not annotate any shapes element.*TableModel\.parse"):
        table_regions(bare, C.TABLE_KEY)


def test_rgba_image_warns_and_one_channel_errors(tmp_path, rng):
    counts, spots = _st_frames()
    rgba = rng.integers(0, 255, (200, 1800, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    with pytest.warns(UserWarning, match=r"Image of 'S_he' \(rgba\.png\) is RGBA"):
        sdata = ct.io.read_st(counts, spots, tmp_path / "rgba.png", section="S", mpp=0.5)
    assert np.array_equal(_level0(sdata.images["S_he"]).values, np.moveaxis(rgba[..., :3], -1, 0))
    Image.fromarray(rgba[..., 0], "L").save(tmp_path / "gray.png")
    with pytest.raises(ValueError, match=r"has one channel.*RGB"):
        ct.io.read_st(counts, spots, tmp_path / "gray.png", section="S", mpp=0.5)


# --- Visium (Space Ranger folder) ------------------------------------------------------------------------------------
@pytest.mark.realdata
def test_visium_folder(data_dir):
    import json

    folder = data_dir / "spaceranger_1.0.0"
    with pytest.warns(UserWarning, match=r"hires image .* is blank"):
        sdata = ct.io.visium(folder)
    lib = "spaceranger_1.0.0"  # no <id>_ prefix on the counts file: the folder's name
    positions = pd.read_csv(folder / "spatial" / "tissue_positions_list.csv", header=None, index_col=0)
    table = sdata.tables[C.TABLE_KEY]
    in_tissue = positions.loc[table.obs["spot"], 1]
    assert (in_tissue == 1).all()
    _check_conventions(sdata, lib, 100)
    # genes: Ensembl IDs -> symbols where the gene-text table knows them; the IDs kept
    assert "OR4F5" in table.var_names and "ENSG00000186092" not in table.var_names
    assert table.var.loc["OR4F5", C.ORIGINAL_SYMBOLS] == "ENSG00000186092"
    assert table.var.loc["OR4F5", "gene_ids"] == "ENSG00000186092"
    assert table.layers[C.COUNTS_LAYER].sum() == table.X.sum() > 0
    # µm: 55 µm / spot_diameter_fullres per full-resolution pixel
    sf = json.loads((folder / "spatial" / "scalefactors_json.json").read_text())
    mpp = 55.0 / sf["spot_diameter_fullres"]
    assert np.isclose(_scale(sdata.shapes[f"{lib}_spots"], lib), mpp)
    assert np.isclose(sdata.shapes[f"{lib}_spots"]["radius"].iloc[0] * mpp, 27.5)
    # the hires PNG is a black placeholder, so the (real) lowres PNG is the H&E, placed by its scale factor
    he = _level0(sdata.images[f"{lib}_he"])
    assert he.shape == (3, 600, 600) and he.dtype == np.uint8
    assert np.isclose(_scale(he, lib), mpp / sf["tissue_lowres_scalef"])
    spot = sdata.shapes[f"{lib}_spots"].geometry.iloc[0]
    row = positions.loc[table.obs["spot"].iloc[0]]
    assert (spot.x, spot.y) == (row[5], row[4])  # pxl_col, pxl_row in full-resolution pixels
    assert list(table.obs["array_x"]) == list(table.obs["array_col"])


@pytest.mark.realdata
def test_visium_dataset_id_and_missing_folder(data_dir, tmp_path):
    with pytest.warns(UserWarning, match="blank"):
        sdata = ct.io.visium(data_dir / "spaceranger_1.0.0", dataset_id="lib1", mpp=0.6, harmonize_genes=False)
    assert set(sdata.images) == {"lib1_he"} and set(sdata.shapes) == {"lib1_spots"}
    assert np.isclose(_scale(sdata.shapes["lib1_spots"], "lib1"), 0.6)
    assert sdata.tables[C.TABLE_KEY].var_names[0].startswith("ENSG")
    with pytest.raises(FileNotFoundError, match="Space Ranger output folder not found"):
        ct.io.visium(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"Could not read the Space Ranger folder .*empty.*filtered_feature_bc_matrix"):
        ct.io.visium(tmp_path / "empty")


@pytest.mark.realdata
@pytest.mark.slow
def test_visium_fullres_image(data_dir, tmp_path):
    """A full-resolution TIFF (the real lowres H&E upsampled to full-resolution size) becomes "{lib}_he"."""
    import json

    import tifffile

    folder = data_dir / "spaceranger_1.0.0"
    sf = json.loads((folder / "spatial" / "scalefactors_json.json").read_text())
    low = np.asarray(Image.open(folder / "spatial" / "tissue_lowres_image.png").convert("RGB"))
    s, n, t = sf["tissue_lowres_scalef"], int(round(low.shape[0] / sf["tissue_lowres_scalef"])), 256

    def tiles():
        for ty in range(0, n, t):
            for tx in range(0, n, t):
                yy = np.minimum((np.arange(ty, ty + t) * s).astype(int), low.shape[0] - 1)
                xx = np.minimum((np.arange(tx, tx + t) * s).astype(int), low.shape[1] - 1)
                yield low[yy][:, xx]

    fullres = tmp_path / "fullres.tif"
    with tifffile.TiffWriter(fullres, bigtiff=True) as tw:
        tw.write(tiles(), shape=(n, n, 3), dtype=np.uint8, tile=(t, t), compression="zlib", photometric="rgb")
    with pytest.warns(UserWarning, match="blank"):
        sdata = ct.io.visium(folder, dataset_id="lib", fullres_image=fullres)
    assert set(sdata.images) == {"lib_he", "lib_lowres_image"}  # the blank hires placeholder is left out
    he, low_el = _level0(sdata.images["lib_he"]), _level0(sdata.images["lib_lowres_image"])
    mpp = 55.0 / sf["spot_diameter_fullres"]
    assert he.shape == (3, n, n) and np.isclose(_scale(he, "lib"), mpp)
    # both images place the same pixels at the spots' µm positions
    spots = sdata.shapes["lib_spots"]
    for x, y in zip(spots.geometry.x[:5], spots.geometry.y[:5], strict=True):
        x_um, y_um = x * _scale(spots, "lib"), y * _scale(spots, "lib")
        full_px = he.data[:, int(y_um / _scale(he, "lib")), int(x_um / _scale(he, "lib"))].compute()
        low_px = low_el.data[:, int(y_um / _scale(low_el, "lib")), int(x_um / _scale(low_el, "lib"))].compute()
        assert np.array_equal(full_px, low_px)


# --- AnnData with uns['spatial'] --------------------------------------------------------------------------------------
@pytest.fixture
def brain_adata(data_dir):
    return ad.read_h5ad(data_dir / "visium_mouse_brain_crop" / "test_data.h5ad")


@pytest.mark.realdata
def test_from_anndata_log_data(brain_adata, data_dir):
    before = brain_adata.copy()
    image = data_dir / "visium_mouse_brain_crop" / "test_img.jpg"
    with pytest.warns(UserWarning, match=r"adata\.X is not raw counts.*log1p"):
        sdata = ct.io.from_anndata(brain_adata, image=image)
    lib = "V1_Adult_Mouse_Brain"
    _check_conventions(sdata, lib, 49)
    table = sdata.tables[C.TABLE_KEY]
    assert table.uns[C.INPUT_KEY] == {"x_is_counts": False, "x_transform": "log1p", "source": "X"}
    assert C.COUNTS_LAYER not in table.layers
    assert _level0(sdata.images[f"{lib}_he"]).shape == (3, 1717, 950)
    mpp = 55.0 / brain_adata.uns["spatial"][lib]["scalefactors"]["spot_diameter_fullres"]
    assert np.isclose(_scale(_level0(sdata.images[f"{lib}_he"]), lib), mpp)
    assert np.isclose(_scale(sdata.shapes[f"{lib}_spots"], lib), mpp)
    xy = np.column_stack([sdata.shapes[f"{lib}_spots"].geometry.x, sdata.shapes[f"{lib}_spots"].geometry.y])
    assert np.array_equal(xy, brain_adata.obsm["spatial"])
    assert "leiden" in table.obs and "ST18" in table.var_names
    # the user's AnnData is untouched
    assert (brain_adata.X != before.X).nnz == 0
    assert list(brain_adata.obs.columns) == list(before.obs.columns)
    assert list(brain_adata.var_names) == list(before.var_names)
    assert set(brain_adata.uns) == set(before.uns) and set(brain_adata.layers) == set(before.layers)


@pytest.mark.realdata
def test_from_anndata_counts_libraries_and_uns_images(brain_adata, rng):
    lib = "V1_Adult_Mouse_Brain"
    adata = brain_adata.copy()
    adata.layers["raw"] = sparse.csr_matrix(rng.poisson(2.0, adata.shape).astype(np.float32))
    with pytest.raises(KeyError, match=r"Layer 'nope' not in adata\.layers.*raw"):
        ct.io.from_anndata(adata, counts_layer="nope")
    # two libraries sharing the scale factors, each with a real uint8 hires image
    hires = rng.integers(0, 255, (300, 200, 3), dtype=np.uint8)
    info = adata.uns["spatial"][lib]
    adata.uns["spatial"] = {
        "A": {"scalefactors": info["scalefactors"], "images": {"hires": hires}},
        "B": {"scalefactors": info["scalefactors"], "images": {"hires": hires}},
    }
    adata.obs["library_id"] = pd.Categorical(["A"] * 20 + ["B"] * 29)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # spots outside this made-up hires image
        sdata = ct.io.from_anndata(adata, counts_layer="raw")
    _check_conventions(sdata, "A", 20)
    _check_conventions(sdata, "B", 29)
    table = sdata.tables[C.TABLE_KEY]
    assert table.uns[C.INPUT_KEY]["x_is_counts"] is True
    assert table.layers[C.COUNTS_LAYER].sum() == table.X.sum()
    mpp = 55.0 / info["scalefactors"]["spot_diameter_fullres"]
    he = _level0(sdata.images["A_he"])
    assert he.shape == (3, 300, 200)
    assert np.isclose(_scale(he, "A"), mpp / info["scalefactors"]["tissue_hires_scalef"])
    assert np.array_equal(he.values, np.moveaxis(hires, -1, 0))
    with pytest.raises(ValueError, match=r"no 'library_id' column"):
        ct.io.from_anndata(_drop_obs(adata, "library_id"), counts_layer="raw")


def _drop_obs(adata, col):
    out = adata.copy()
    del out.obs[col]
    return out


@pytest.mark.realdata
def test_visium_mouse_brain_crop_dataset(data_dir):
    sdata = ct.datasets.visium_mouse_brain_crop(data_dir=data_dir)
    _check_conventions(sdata, "V1_Adult_Mouse_Brain", 49)
    assert sdata.tables[C.TABLE_KEY].uns[C.INPUT_KEY]["x_is_counts"] is False


# --- whole-slide images ----------------------------------------------------------------------------------------------
def _source_rgb(data_dir) -> np.ndarray:
    img = np.asarray(Image.open(data_dir / "her2st_tiny" / "C2_crop_HE.jpg").convert("RGB"))
    return np.ascontiguousarray(img[:1024, :1024])  # real H&E; sides divisible by 4 -> exact downsamples


def _pyramid(img: np.ndarray, n: int = 3) -> list[np.ndarray]:
    levels = [img]
    for _ in range(n - 1):
        prev = levels[-1].astype(np.float32)
        levels.append(
            ((prev[0::2, 0::2] + prev[1::2, 0::2] + prev[0::2, 1::2] + prev[1::2, 1::2]) / 4 + 0.5).astype(np.uint8)
        )
    return levels


def _write_pyramid(path, levels, *, resolution: bool = True) -> None:
    """Generic pyramidal TIFF: one top-level page per level (reduced pages flagged), tiled 256, zlib; OpenSlide's
    generic-tiff reader needs the levels as top-level pages (it ignores SubIFDs)."""
    import tifffile

    with tifffile.TiffWriter(path) as tw:
        for i, lv in enumerate(levels):
            res = {"resolution": (1e4 / (MPP_TIFF * 2**i),) * 2, "resolutionunit": "CENTIMETER"} if resolution else {}
            tw.write(
                lv,
                tile=(256, 256),
                compression="zlib",
                photometric="rgb",
                subfiletype=1 if i else 0,
                metadata=None,
                **res,
            )


@pytest.fixture(scope="module")
def wsi_source(data_dir, tmp_path_factory):
    levels = _pyramid(_source_rgb(data_dir))
    path = tmp_path_factory.mktemp("wsi") / "slide_a.tif"
    _write_pyramid(path, levels)
    return path, levels


def _count_reads(monkeypatch):
    from comtip.io import _wsi

    calls = []
    for cls in (_wsi._TiffLevelReader, _wsi._OpenSlideLevelReader):
        original = cls._read

        def counting(self, *args, _original=original, **kwargs):
            calls.append(args[1:])
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "_read", counting)
    return calls


@pytest.mark.realdata
@pytest.mark.parametrize("backend", ["tifffile", "openslide"])
def test_wsi_levels_pixels_and_laziness(wsi_source, backend, monkeypatch):
    path, levels = wsi_source
    calls = _count_reads(monkeypatch)
    sdata = ct.io.wsi(path, backend=backend)
    assert calls == []  # opening reads no pixels
    el = sdata.images["slide_a_he"]
    assert get_units(sdata, "slide_a") == "um" and not sdata.tables
    arrays = [el[k]["image"] for k in el]
    assert [a.shape for a in arrays] == [(3, 1024, 1024), (3, 512, 512), (3, 256, 256)]
    assert np.isclose(_scale(arrays[0], "slide_a"), MPP_TIFF)
    assert np.isclose(_scale(arrays[1], "slide_a"), 2 * MPP_TIFF)  # the file's own levels
    assert arrays[0].data.chunksize[1] % 256 == 0 and arrays[0].data.numblocks == (1, 1, 1)
    for i, (arr, src) in enumerate(zip(arrays, levels, strict=True)):
        y, x = 37 * (i + 1), 101 // (i + 1)
        window = arr.data[:, y : y + 150, x : x + 120].compute()
        assert np.array_equal(window, np.moveaxis(src[y : y + 150, x : x + 120], -1, 0)), f"level {i}"
    assert len(calls) > 0
    assert np.array_equal(arrays[0].values, np.moveaxis(levels[0], -1, 0))
    # the graph pickles without an open file handle and reads again after unpickling
    again = pickle.loads(pickle.dumps(arrays[1].data))
    assert np.array_equal(again[:, :64, :64].compute(), np.moveaxis(levels[1][:64, :64], -1, 0))
    if sys.platform.startswith("linux"):  # forked workers open their own handle (the parent's is already open)
        import dask

        with dask.config.set({"scheduler": "processes", "num_workers": 2, "multiprocessing.context": "fork"}):
            assert np.array_equal(arrays[1].data.compute(), np.moveaxis(levels[1], -1, 0))


@pytest.mark.realdata
def test_wsi_ome_subifds_and_mpp(data_dir, tmp_path):
    import tifffile

    levels = _pyramid(_source_rgb(data_dir))
    path = tmp_path / "slide_b.ome.tif"
    with tifffile.TiffWriter(path) as tw:
        meta = {
            "axes": "YXS",
            "PhysicalSizeX": 0.5,
            "PhysicalSizeY": 0.5,
            "PhysicalSizeXUnit": "µm",
            "PhysicalSizeYUnit": "µm",
        }
        tw.write(levels[0], subifds=2, tile=(256, 256), compression="zlib", photometric="rgb", metadata=meta)
        for lv in levels[1:]:
            tw.write(lv, tile=(256, 256), compression="zlib", photometric="rgb", subfiletype=1)
    sdata = ct.io.wsi(path)
    el = sdata.images["slide_b_he"]  # ".ome" is part of the extension
    assert [el[k]["image"].shape[1:] for k in el] == [(1024, 1024), (512, 512), (256, 256)]
    assert np.isclose(_scale(el["scale0"]["image"], "slide_b"), 0.5)
    assert np.array_equal(el["scale2"]["image"].values, np.moveaxis(levels[2], -1, 0))


@pytest.mark.realdata
def test_wsi_pixel_size_missing(data_dir, tmp_path):
    path = tmp_path / "nores.tif"
    _write_pyramid(path, _pyramid(_source_rgb(data_dir), 2), resolution=False)
    with pytest.raises(ValueError, match=r"Pixel size missing for whole-slide image .*nores\.tif.*mpp="):
        ct.io.wsi(path)
    sdata = ct.io.wsi(path, mpp=0.25, section="s1")
    assert np.isclose(_scale(sdata.images["s1_he"]["scale0"]["image"], "s1"), 0.25)


def test_wsi_one_channel_errors_and_rgba_warns(tmp_path, rng):
    import tifffile

    gray = rng.integers(0, 255, (300, 300), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "gray.tif", gray, tile=(256, 256), metadata=None)
    with pytest.raises(ValueError, match=r"gray\.tif\) has 1 channel.*RGB"):
        ct.io.wsi(tmp_path / "gray.tif", mpp=0.5)
    rgba = rng.integers(0, 255, (300, 300, 4), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, tile=(256, 256), photometric="rgb", extrasamples=[2], metadata=None)
    with pytest.warns(UserWarning, match=r"rgba\.tif\) is RGBA"):
        sdata = ct.io.wsi(tmp_path / "rgba.tif", mpp=0.5)
    assert np.array_equal(_level0(sdata.images["rgba_he"]).values, np.moveaxis(rgba[..., :3], -1, 0))


def test_wsi_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"not found.*missing\.svs"):
        ct.io.wsi(tmp_path / "missing.svs")
    (tmp_path / "junk.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(ValueError, match=r"could not be read as a TIFF.*backend='openslide'"):
        ct.io.wsi(tmp_path / "junk.tif", mpp=0.5)
    monkeypatch.setitem(sys.modules, "openslide", None)  # as if the extra were not installed
    with pytest.raises(ImportError, match=r"pip install 'comtip\[wsi\]'"):
        ct.io.wsi(tmp_path / "junk.tif", backend="openslide")


def test_plain_tiff_through_read_st(tmp_path, rng):
    import tifffile

    img = rng.integers(0, 255, (200, 1800, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "he.tif", img, photometric="rgb", metadata=None)  # strips, no pyramid
    counts, spots = _st_frames()
    sdata = ct.io.read_st(counts, spots, tmp_path / "he.tif", section="S", mpp=0.5)
    assert np.array_equal(_level0(sdata.images["S_he"]).values, np.moveaxis(img, -1, 0))
