"""Tile boxes (ct.pp.spot_tiles), batched tile reads, gene sentences and the SpotDataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import comtip as ct
from comtip.data import SpotDataset, TileReader, gene_sentences, make_loader


def _image_np(sdata, key):
    from comtip._images import level_arrays

    return np.asarray(level_arrays(sdata.images[key])[0].data)


def _spot_pixels(sdata, region):
    g = sdata.shapes[region].geometry
    return np.column_stack([g.x, g.y])


def test_tile_centre_is_spot_pixel(sdata):
    ct.pp.spot_tiles(sdata, tile_size_um=41, tile_size_px=None, key_added="native")
    tiles = sdata.shapes["native"]
    reader = TileReader(sdata, tiles)
    native = reader.read(np.arange(len(tiles)), native=True)
    img = _image_np(sdata, "S1_he")
    xy = _spot_pixels(sdata, "S1_spots")
    for i in np.flatnonzero(tiles["region"] == "S1_spots"):
        t = native[i]
        assert t.shape == (3, 41, 41)
        x, y = np.floor(xy[tiles[ct._constants.INSTANCE_KEY].iloc[i]]).astype(int)
        np.testing.assert_array_equal(t[:, 20, 20], img[:, y, x])
        np.testing.assert_array_equal(t, img[:, y - 20 : y + 21, x - 20 : x + 21])


def test_tiles_resized_and_counted(sdata):
    tiles = sdata.shapes["comtip_tiles"]
    assert len(tiles) == sdata.tables["table"].n_obs == 72
    assert set(tiles["size"]) == {40} and set(tiles["tile_size_px"]) == {32}
    out = TileReader(sdata, tiles).read([0, 5, 40])
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.uint8


def test_in_memory_and_lazy_images_give_identical_tiles(sdata):
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    lazy = TileReader(sdata, sdata.shapes["comtip_tiles"]).read(np.arange(72))
    img = sdata.images["S1_he"]
    mem = Image2DModel.parse(
        np.asarray(img.data), dims=("c", "y", "x"), transformations=get_transformation(img, get_all=True)
    )
    sdata.images["S1_he"] = mem
    eager = TileReader(sdata, sdata.shapes["comtip_tiles"]).read(np.arange(72))
    torch.testing.assert_close(lazy, eager, rtol=0, atol=0)


def test_chunked_reads_match_numpy(sdata):
    # the same image in many small chunks: tiles spanning chunk borders are stitched exactly
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    img = sdata.images["S1_he"]
    arr = np.asarray(img.data)
    sdata.images["S1_he"] = Image2DModel.parse(
        arr, dims=("c", "y", "x"), transformations=get_transformation(img, get_all=True), chunks=(3, 37, 29)
    )
    tiles = sdata.shapes["comtip_tiles"]
    rows = np.flatnonzero(tiles["region"] == "S1_spots")
    got = TileReader(sdata, tiles, cache_mb=0.01).read(rows, native=True)
    for r, t in zip(rows, got, strict=True):
        x0, y0 = tiles["x0"].iloc[r], tiles["y0"].iloc[r]
        np.testing.assert_array_equal(t, arr[:, y0 : y0 + 40, x0 : x0 + 40])


def test_read_order_decodes_each_chunk_about_once_with_a_bounded_cache(sdata_factory, monkeypatch):
    """Many small chunks, read in strips: few decodes, and the cache holds far less than the image."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    from comtip.data import _reader

    sd = sdata_factory(sections=("S1",), n_side=12)
    img = sd.images["S1_he"]
    arr = np.asarray(img.data)
    sd.images["S1_he"] = Image2DModel.parse(
        arr, dims=("c", "y", "x"), transformations=get_transformation(img, get_all=True), chunks=(3, 64, 64)
    )
    ct.pp.spot_tiles(sd, tile_size_um=40, tile_size_px=32)
    tiles = sd.shapes["comtip_tiles"]
    monkeypatch.setattr(_reader, "CACHE_MARGIN", 0)  # the bare working set, to see it bounded on a small image
    reader = TileReader(sd, tiles)
    n_chunks = int(np.prod(reader._arrays[("S1_he", 0)].numblocks))
    assert reader.cache_bytes < arr.nbytes / 3  # three chunk rows of a strip, not the image
    order = reader.read_order()
    assert sorted(order) == list(range(len(tiles)))
    strip = tiles["x0"].to_numpy()[order] // (64 * _reader.STRIP_CHUNKS)
    assert (np.diff(strip) >= 0).all()  # strip after strip
    decoded = []
    original = reader._get_chunks

    def counting(a, keys):
        decoded.extend(k for k in keys if (a.name, *k) not in reader._cache)
        return original(a, keys)

    reader._get_chunks = counting
    got = torch.cat([reader.read(order[i : i + 16], native=False) for i in range(0, len(order), 16)])
    assert len(decoded) <= 1.25 * n_chunks
    assert reader._cached <= reader.cache_bytes + 16 * 4 * 64 * 64 * 3  # at most one batch's chunks over
    expected = TileReader(sd, tiles, cache_mb=0.01).read(order)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_pyramid_level_from_target_mpp(sdata_factory):
    from comtip._images import image_levels, level_arrays
    from comtip.io._image import parse_image

    sd = sdata_factory(mpp=0.25, spacing_um=60.0)
    # a pyramid: 0.25, 0.5, 1.0 µm/px
    sd.images["S1_he"] = parse_image(
        level_arrays(sd.images["S1_he"])[0].data, coordinate_system="S1", mpp=0.25, levels=2
    )

    assert len(image_levels(sd.images["S1_he"], "S1", 1.0)) >= 2
    ct.pp.spot_tiles(sd, tile_size_um=40, tile_size_px=40)  # target 1.0 µm/px -> a coarser level
    tiles = sd.shapes["comtip_tiles"]
    assert (tiles["level"] > 0).all()
    assert set(tiles["size"]) == {40}


def test_partial_tiles_are_padded_with_a_warning(sdata):
    with pytest.warns(UserWarning, match="leave the image"):
        ct.pp.spot_tiles(sdata, tile_size_um=130, tile_size_px=None, key_added="big")
    tiles = sdata.shapes["big"]
    assert (tiles["inside"] < 1).any()
    i = int(np.argmin(tiles["inside"].to_numpy()))
    t = TileReader(sdata, tiles).read([i], native=True)[0]
    assert (t == 255).any()


def test_spot_tiles_errors(sdata):
    with pytest.raises(ValueError, match="exists already"):
        ct.pp.spot_tiles(sdata)
    # a coordinate system of unknown unit
    sdata.attrs["comtip"]["coordinate_system_units"].clear()
    with pytest.raises(ValueError, match="Pixel size missing"):
        ct.pp.spot_tiles(sdata, tile_size_um=40, key_added="t2")
    assert "t2" not in sdata.shapes
    ct.pp.spot_tiles(sdata, tile_size_um=40, key_added="t2", mpp=1.0)
    assert "t2" in sdata.shapes


def test_mismatched_coordinate_systems(sdata):
    from spatialdata.transformations import get_transformation, set_transformation

    shapes = sdata.shapes["S1_spots"]
    t = get_transformation(shapes, "S1")
    set_transformation(shapes, {"elsewhere": t}, set_all=True)
    before = set(sdata.shapes)
    with pytest.raises(ValueError, match="share no coordinate system"):
        ct.pp.spot_tiles(sdata, image_key={"S1_spots": "S1_he", "S2_spots": "S2_he"}, key_added="t3")
    assert set(sdata.shapes) == before


def test_gene_sentences():
    v = np.array([[0.0, 3.0, 1.0, 2.0], [0.0, 0.0, 0.0, 0.5]], dtype=np.float32)
    idx, val, mask = gene_sentences(v, 3)
    np.testing.assert_array_equal(idx[0], [1, 3, 2])
    np.testing.assert_allclose(val[0], [3, 2, 1])
    np.testing.assert_array_equal(mask[1], [True, False, False])
    assert idx[1, 0] == 3 and val[1, 1] == 0
    idx, val, mask = gene_sentences(v, 6)  # padded past the panel
    assert idx.shape == (2, 6) and not mask[:, 4:].any()


def test_spot_dataset_batches(sdata):
    panel = list(sdata.tables["table"].var_names[:20])
    ds = SpotDataset(sdata, genes=panel, sentence_length=8, augment=True, seed=1)
    assert len(ds) == 72
    dl = make_loader(ds, batch_size=16, shuffle=True, seed=0)
    b = next(iter(dl))
    assert b["image"].shape == (16, 3, 32, 32) and b["image"].dtype == torch.float32
    assert b["image"].min() >= 0 and b["image"].max() <= 1
    assert b["gene_idx"].shape == (16, 8) and b["expr"].shape == (16, 20) and b["depth"].shape == (16,)
    # sentence values are the expression of the named genes
    row = b["expr"][0]
    m = b["gene_mask"][0]
    torch.testing.assert_close(row[b["gene_idx"][0][m]], b["gene_val"][0][m])
    # augmentation is deterministic for a given (seed, epoch, index) and changes with the epoch
    a1 = ds.images([3, 4])
    a2 = ds.images([4, 3])
    torch.testing.assert_close(a1[0], a2[1])
    ds.set_epoch(1)
    assert not torch.equal(ds.images([3])[0], a1[0])
    plain = SpotDataset(sdata, genes=None)
    assert "gene_idx" not in plain[0] and plain[0]["image"].shape == (3, 32, 32)


@pytest.mark.slow
def test_spot_dataset_workers(sdata):
    ds = SpotDataset(sdata, genes=list(sdata.tables["table"].var_names), sentence_length=8)
    single = torch.cat([b["image"] for b in make_loader(ds, batch_size=10)])
    multi = torch.cat([b["image"] for b in make_loader(ds, batch_size=10, num_workers=2)])
    torch.testing.assert_close(single, multi)


def test_her2st_tiny_tiles(data_dir):
    sd = ct.datasets.her2st_tiny(data_dir=data_dir)
    ct.pp.spot_tiles(sd, tile_size_px=None)
    tiles = sd.shapes["comtip_tiles"]
    assert len(tiles) == 49
    assert set(tiles["size"]) == {round(112 / 1.376)}
    img = _image_np(sd, "C2crop_he")
    xy = _spot_pixels(sd, "C2crop_spots")
    got = TileReader(sd, tiles).read(np.arange(49), native=True)
    s = int(tiles["size"].iloc[0])
    for i in range(49):
        x, y = np.floor(xy[tiles[ct._constants.INSTANCE_KEY].iloc[i]]).astype(int)
        if tiles["inside"].iloc[i] == 1:
            np.testing.assert_array_equal(got[i][:, s // 2, s // 2], img[:, y, x])


@pytest.mark.realdata
def test_her2st_c2_tiles(her2st_dir):
    sd = ct.datasets.her2st(["C2"], data_dir=her2st_dir)
    ct.pp.spot_tiles(sd)
    tiles = sd.shapes["comtip_tiles"]
    assert len(tiles) == sd.tables["table"].n_obs
    assert set(tiles["size"]) == {163} and set(tiles["level"]) == {0}
    t = TileReader(sd, tiles).read(np.arange(8))
    assert t.shape == (8, 3, 224, 224)
    # tissue, not glass: H&E tiles under spots are not white
    assert t.float().mean() < 235
