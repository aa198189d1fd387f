"""Bad input, case by case, at every public entry point where it enters.

Each case asserts the exception (or warning) type, a message that names the element and the fix, and that the
user's object is exactly as it was before the call (or, for a warning, changed only where the call documents it
writes). The cases share the session's tiny trained model; nothing is trained here.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import comtip as ct
from comtip._images import level_arrays

# ------------------------------------------------------------------------------------------- snapshots
TABLE_PARTS = ("obs", "var", "X", "layers", "obsm", "uns")


def _dense(m):
    if m is None:
        return None
    if isinstance(m, pd.DataFrame):
        return m.copy()
    return np.array(m.toarray() if sparse.issparse(m) else m, copy=True)


def _table_items(adata: ad.AnnData, prefix: tuple) -> dict:
    items = {prefix + ("obs",): adata.obs.copy(), prefix + ("var",): adata.var.copy(), prefix + ("X",): _dense(adata.X)}
    for part in ("layers", "obsm"):
        for k, v in getattr(adata, part).items():
            items[prefix + (part, k)] = _dense(v)
    for k, v in adata.uns.items():
        items[prefix + ("uns", k)] = copy.deepcopy(v)
    return items


def snapshot(obj) -> dict:
    """Everything a user could see of a SpatialData / AnnData / DataFrame (or a tuple of them), as ``{path: value}``."""
    from spatialdata import SpatialData
    from spatialdata.transformations import get_transformation

    if isinstance(obj, tuple):  # several inputs, e.g. read_st's counts and spots DataFrames
        return {(i, *path): v for i, o in enumerate(obj) for path, v in snapshot(o).items()}
    if isinstance(obj, pd.DataFrame):
        return {("frame",): obj.copy()}
    if isinstance(obj, ad.AnnData):
        return _table_items(obj, ("adata",))
    assert isinstance(obj, SpatialData)
    items: dict = {("attrs",): copy.deepcopy(obj.attrs)}
    for k, img in obj.images.items():
        levels = level_arrays(img)
        items[("images", k)] = (
            [(lv.shape, str(lv.dtype), id(lv.data)) for lv in levels],
            repr(get_transformation(levels[0], get_all=True)),
        )
    for k, shp in obj.shapes.items():
        items[("shapes", k)] = (pd.DataFrame(shp.drop(columns="geometry")), shp.geometry.to_wkb(), repr(shp.attrs))
    for k, t in obj.tables.items():
        items.update(_table_items(t, ("tables", k)))
    return items


def _equal(a, b) -> bool:
    if isinstance(a, pd.DataFrame | pd.Series):
        try:
            (pd.testing.assert_frame_equal if isinstance(a, pd.DataFrame) else pd.testing.assert_series_equal)(a, b)
        except AssertionError:
            return False
        return True
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True
    return bool(a == b)


def assert_unchanged(before: dict, after: dict, *, allow: tuple[tuple, ...] = ()) -> None:
    """Equal snapshots, except paths starting with one of ``allow`` (what the call documents it writes)."""

    def allowed(path):
        return any(path[: len(a)] == a for a in allow)

    added = [p for p in after if p not in before and not allowed(p)]
    removed = [p for p in before if p not in after and not allowed(p)]
    changed = [p for p in before if p in after and not allowed(p) and not _equal(before[p], after[p])]
    assert not (added or removed or changed), f"added {added}, removed {removed}, changed {changed}"


def test_snapshot_sees_changes(test_sdata):
    """The helper itself: it notices a new key, a changed value and a changed uns entry."""
    before = snapshot(test_sdata)
    table = test_sdata.tables["table"]
    table.obsm["new"] = np.zeros((table.n_obs, 2))
    with pytest.raises(AssertionError, match="added.*new"):
        assert_unchanged(before, snapshot(test_sdata))
    assert_unchanged(before, snapshot(test_sdata), allow=(("tables", "table", "obsm", "new"),))
    table.layers["counts"][0, 0] += 1
    with pytest.raises(AssertionError, match="changed.*counts"):
        assert_unchanged(before, snapshot(test_sdata), allow=(("tables", "table", "obsm"),))


# ------------------------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def model(trained):
    return copy.deepcopy(trained[0])


@pytest.fixture(scope="module")
def vit_model(trained):
    """An untrained tiny CoMTIP with a ViT tower (16 px patches at 64 px), the trained model's panel."""
    import torch

    m = trained[0]
    torch.manual_seed(0)
    cfg = ct.CoMTIPConfig.tiny(image_encoder="test_vit")
    text = m.gene_encoder.text_emb.detach().clone()
    return ct.CoMTIP(cfg, list(m.genes), text, m.value_levels.detach().clone()).eval()


def _fresh(sdata_factory, *, tiles: bool = True, **kw):
    sd = sdata_factory(sections=("T1",), seed=7, **kw)
    if tiles:
        ct.pp.spot_tiles(sd, tile_size_um=40, tile_size_px=64)
    return sd


def _set_counts(sd, fn) -> None:
    t = sd.tables["table"]
    X = fn(t.layers["counts"].toarray())
    t.layers["counts"] = sparse.csr_matrix(X)
    t.X = sparse.csr_matrix(X)


def _rename(sd, axis: str, names) -> None:
    t = sd.tables["table"]
    setattr(t, f"{axis}_names", pd.Index(names))


def _dup(index: pd.Index) -> list[str]:
    names = list(index)
    names[1] = names[0]
    return names


def _replace_image(sd, fn, c_coords=None) -> None:
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    level0 = level_arrays(sd.images["T1_he"])[0]
    new = fn(np.asarray(level0.data))
    sd.images["T1_he"] = Image2DModel.parse(
        new, dims=("c", "y", "x"), c_coords=c_coords, transformations=get_transformation(level0, get_all=True)
    )


def _one_spot(sd) -> None:
    t = sd.tables["table"]
    sd.tables["table"] = t[:1].copy()


def _without_genes(sd) -> None:
    t = sd.tables["table"]
    sd.tables["table"] = t[:, :0].copy()


def _predictions_of_unmeasured_genes(sd) -> None:
    """What zero-shot writes when no predicted gene is measured: a DataFrame in .obsm, no layer."""
    t = sd.tables["table"]
    t.var_names = pd.Index([f"NOTAGENE{i}" for i in range(t.n_vars)])
    t.obsm["comtip_pred"] = pd.DataFrame(np.zeros((t.n_obs, 1)), index=t.obs_names, columns=["ERBB2"])


def _fake_predictions(sd) -> None:
    t = sd.tables["table"]
    t.layers["comtip_pred"] = np.random.default_rng(0).random(t.shape).astype(np.float32)


def _st_inputs(tmp_path: Path, n: int = 4, pitch_px: float = 60.0):
    """Counts and spots DataFrames of a small legacy ST section, and files of a few kinds of images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    spots = pd.DataFrame({"x": np.repeat(np.arange(n), n), "y": np.tile(np.arange(n), n)})
    spots["pixel_x"] = 40 + spots["x"] * pitch_px
    spots["pixel_y"] = 40 + spots["y"] * pitch_px
    spots.index = [f"{x}x{y}" for x, y in zip(spots["x"], spots["y"], strict=True)]
    counts = pd.DataFrame(rng.poisson(3, (n * n, 5)), index=spots.index, columns=GENES)
    img = rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "he.png")
    Image.fromarray(img[..., 0]).save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])).save(tmp_path / "rgba.png")
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG at all")
    Image.fromarray(img).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 3])
    return counts, spots


GENES = ["ERBB2", "KRT19", "ACTB", "GAPDH", "COL1A1"]
ST = {"section": "A", "mpp": 1.0, "spot_pitch_um": 60.0, "spot_diameter_um": 40.0}


@dataclass
class Ctx:
    """What a case needs: the models, fresh data and a folder."""

    model: object
    vit_model: object
    sdata_factory: Callable
    tmp_path: Path

    def sdata(self, **kw):
        return _fresh(self.sdata_factory, **kw)


@dataclass
class Case:
    """One bad input: ``setup(ctx) -> (user's object, call)``; an exception or a warning whose message matches."""

    entry: str
    setup: Callable
    match: str
    raises: type[BaseException] | None = None
    warns: type[Warning] | None = None
    writes: tuple[tuple, ...] = field(default_factory=tuple)  # what a call that only warns writes


EMBED_WRITES = (("tables", "table", "obsm"), ("tables", "table", "uns", "comtip"))


# --- ct.io.read_st ------------------------------------------------------------------------------------------------
def _read_st(mutate=None, image="he.png", **kw):
    def setup(c: Ctx):
        counts, spots = _st_inputs(c.tmp_path)
        if mutate is not None:
            counts, spots = mutate(counts, spots)
        path = c.tmp_path / image
        return (counts, spots), lambda: ct.io.read_st(counts, spots, path, **{**ST, **kw})

    return setup


def _cells(value, row: int = 0, col: int = 0):
    def mutate(counts, spots):
        counts = counts.astype(float)
        counts.iloc[row, col] = value
        return counts, spots

    return mutate


def _scaled(counts, spots):
    return counts * 0.37, spots


def _dup_gene_columns(counts, spots):
    counts.columns = ["ERBB2", "ERBB2", *counts.columns[2:]]
    return counts, spots


def _dup_count_rows(counts, spots):
    counts.index = [counts.index[1], *counts.index[1:]]
    return counts, spots


def _shift_spots(dx):
    def mutate(counts, spots):
        spots = spots.copy()
        spots["pixel_x"] = spots["pixel_x"] + dx
        return counts, spots

    return mutate


def _nan_position(counts, spots):
    spots = spots.copy()
    spots.loc[spots.index[2], "pixel_y"] = np.nan
    return counts, spots


# --- ct.pp.spot_tiles ------------------------------------------------------------------------------------------------
def _tiles(prepare, data: dict | None = None, **kw):
    def setup(c: Ctx):
        sd = c.sdata(tiles=False, **(data or {}))
        prepare(sd)
        args = {"tile_size_um": 40, "tile_size_px": 64, **kw}
        return sd, lambda: ct.pp.spot_tiles(sd, **args)

    return setup


def _other_cs(sd) -> None:
    from spatialdata.transformations import get_transformation, set_transformation

    shapes = sd.shapes["T1_spots"]
    set_transformation(shapes, {"elsewhere": get_transformation(shapes, "T1")}, set_all=True)


def _move_spots(frac: float):
    def prepare(sd):
        from shapely.affinity import translate

        shapes = sd.shapes["T1_spots"]
        n = int(round(len(shapes) * frac))
        geometry = shapes.geometry.copy()
        geometry.iloc[:n] = [translate(p, 10_000, 0) for p in geometry.iloc[:n]]
        shapes.geometry = geometry

    return prepare


def _drop_image(sd) -> None:
    del sd.images["T1_he"]


def _forget_units(sd) -> None:
    sd.attrs["comtip"]["coordinate_system_units"].clear()


def _two_sections_one_misaligned(c: Ctx):
    from spatialdata.transformations import get_transformation, set_transformation

    sd = c.sdata_factory(sections=("S1", "S2"))
    shapes = sd.shapes["S2_spots"]
    set_transformation(shapes, {"elsewhere": get_transformation(shapes, "S2")}, set_all=True)
    return sd, lambda: ct.pp.spot_tiles(sd, tile_size_um=40, tile_size_px=64)


# --- the tools ----------------------------------------------------------------------------------------------------
def _tool(name: str, prepare=lambda sd: None, *, vit: bool = False, tiles_px: int = 64, **kw):
    def setup(c: Ctx):
        sd = c.sdata(tiles=False)
        ct.pp.spot_tiles(sd, tile_size_um=40, tile_size_px=tiles_px)
        prepare(sd)
        m = c.vit_model if vit else c.model
        calls = {
            "embed": lambda: ct.tl.embed(sd, m, **kw),
            "predict_expression": lambda: ct.tl.predict_expression(sd, m, dihedral=False, **kw),
            "score_expression": lambda: ct.tl.score_expression(sd, model=m, **kw),
            "retrieve": lambda: ct.tl.retrieve(sd, m, **kw),
            "pretrain": lambda: ct.tl.pretrain(
                sd,
                config=kw.get("config", ct.CoMTIPConfig.tiny()),
                max_epochs=1,
                batch_size=8,
                n_genes=30,
                validation=None,
            ),
        }
        return sd, calls[name]

    return setup


def _anndata(mutate):
    def setup(c: Ctx):
        rng = np.random.default_rng(0)
        img = rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)
        xy = np.array([[60.0 + 60 * i, 60.0 + 60 * j] for i in range(4) for j in range(4)])
        a = ad.AnnData(
            X=sparse.csr_matrix(rng.poisson(3, (16, 5)).astype(np.float32)),
            obs=pd.DataFrame(index=[f"spot{i}" for i in range(16)]),
            var=pd.DataFrame(index=GENES),
        )
        a.obsm["spatial"] = xy
        a.uns["spatial"] = {
            "lib": {
                "images": {"hires": img},
                "scalefactors": {"tissue_hires_scalef": 1.0, "spot_diameter_fullres": 55.0},
            }
        }
        a = mutate(a)
        return a, lambda: ct.tl.embed(a, c.model)

    return setup


def _adata_dup_obs(a):
    a.obs_names = _dup(a.obs_names)
    return a


def _pretrain_warning(prepare, message: str):
    """Pretrain up to a warning, turned into an error so that nothing trains."""

    def setup(c: Ctx):
        sd, call = prepare(c)

        def run():
            with warnings.catch_warnings():
                warnings.filterwarnings("error", message=message)
                call()

        return sd, run

    return setup


def _one_spot_validation(c: Ctx):
    from comtip.io._utils import combine_sections

    parts = []
    for section, seed in (("S1", 1), ("S2", 2)):
        one = c.sdata_factory(sections=(section,), seed=seed)
        t = one.tables["table"].copy()
        t.uns.pop("spatialdata_attrs", None)
        parts.append((dict(one.images), dict(one.shapes), t[:1].copy() if section == "S2" else t, section))
    sd = combine_sections(parts)
    ct.pp.spot_tiles(sd, tile_size_um=40, tile_size_px=64)
    return sd, lambda: ct.tl.pretrain(sd, config=ct.CoMTIPConfig.tiny(), max_epochs=1, batch_size=8, n_genes=30)


def NAN(X):
    X = X.copy()
    X[0, 0] = np.nan
    return X


def NEG(X):
    X = X.copy()
    X[0, 0] = -3.0
    return X


def FRAC(X):
    return X * 0.37


CASES = {
    # ---------------------------------------------------------------- ct.io.read_st (files and DataFrames)
    "read_st-image-missing": Case(
        "read_st", _read_st(image="nope.png"), r"Image of 'A_he' not found.*Check the path", raises=FileNotFoundError
    ),
    "read_st-image-unreadable": Case(
        "read_st", _read_st(image="garbage.jpg"), r"'A_he' could not be read.*valid JPEG/PNG/TIFF", raises=ValueError
    ),
    "read_st-image-one-channel": Case(
        "read_st",
        _read_st(image="gray.png"),
        r"'A_he' \(gray\.png\) has one channel.*Convert it to RGB",
        raises=ValueError,
    ),
    "read_st-image-rgba": Case(
        "read_st", _read_st(image="rgba.png"), r"'A_he' \(rgba\.png\) is RGBA.*dropping", warns=UserWarning
    ),
    "read_st-counts-nan": Case(
        "read_st", _read_st(_cells(np.nan)), r"section 'A' contain NaN.*fix or drop", raises=ValueError
    ),
    "read_st-counts-negative": Case(
        "read_st", _read_st(_cells(-2)), r"section 'A' contain negative.*raw UMI count", raises=ValueError
    ),
    "read_st-counts-non-integer": Case(
        "read_st", _read_st(_scaled), r"section 'A' are not integers.*raw UMI count", warns=UserWarning
    ),
    "read_st-genes-duplicated": Case(
        "read_st",
        _read_st(_dup_gene_columns, harmonize_genes=False),
        r"Section 'A' has duplicated gene names \['ERBB2'\].*harmonize_genes=True",
        raises=ValueError,
    ),
    "read_st-spots-duplicated": Case(
        "read_st",
        _read_st(_dup_count_rows),
        r"section 'A' have duplicated spot rows.*one row per spot",
        raises=ValueError,
    ),
    "read_st-table-empty": Case(
        "read_st",
        _read_st(lambda c, s: (c.iloc[:0], s)),
        r"section 'A' are empty \(0 spots.*raw UMI counts",
        raises=ValueError,
    ),
    "read_st-no-genes": Case(
        "read_st",
        _read_st(lambda c, s: (c.iloc[:, :0], s)),
        r"section 'A' are empty \(16 spots x 0 genes",
        raises=ValueError,
    ),
    "read_st-pixel-size-10x": Case(
        "read_st",
        _read_st(mpp=10.0),
        r"Section 'A': mpp=10.0 .*disagrees with the spot spacing.*Check the pixel size",
        warns=UserWarning,
    ),
    "read_st-pixel-size-0.1x": Case(
        "read_st", _read_st(mpp=0.1), r"Section 'A': mpp=0.1 .*suggests 1.000 µm/px", warns=UserWarning
    ),
    "read_st-spots-outside-image": Case(
        "read_st",
        _read_st(_shift_spots(5000)),
        r"16 of 16 spots lie outside image 'A_he'.*full-resolution image",
        warns=UserWarning,
    ),
    "read_st-spot-position-nan": Case(
        "read_st",
        _read_st(_nan_position),
        r"section 'A' has spots without a valid position.*\['0x2'\].*fix or drop",
        raises=ValueError,
    ),
    # ---------------------------------------------------------------- ct.pp.spot_tiles (an existing SpatialData)
    "spot_tiles-no-shared-coordinate-system": Case(
        "spot_tiles",
        _tiles(_other_cs),
        r"'T1_he' and spots 'T1_spots' share no coordinate system.*set_transformation",
        raises=ValueError,
    ),
    "spot_tiles-one-section-misaligned": Case(
        "spot_tiles",
        _two_sections_one_misaligned,
        r"'S2_he' and spots 'S2_spots' share no coordinate system.*set_transformation",
        raises=ValueError,
    ),
    "spot_tiles-image-missing": Case(
        "spot_tiles",
        _tiles(_drop_image),
        r"No spots of table 'table' lie on an image.*images: none.*Add the H&E image",
        raises=ValueError,
    ),
    "spot_tiles-spots-all-outside": Case(
        "spot_tiles",
        _tiles(_move_spots(1.0)),
        r"All 36 spots of 'T1_spots' fall outside image 'T1_he'.*check their transformations",
        raises=ValueError,
    ),
    "spot_tiles-spots-some-outside": Case(
        "spot_tiles",
        _tiles(_move_spots(0.5)),
        r"18 of 36 spot tiles leave the image.*padded with white",
        warns=UserWarning,
        writes=(("shapes", "comtip_tiles"),),
    ),
    "spot_tiles-image-one-channel": Case(
        "spot_tiles",
        _tiles(lambda sd: _replace_image(sd, lambda a: a[:1])),
        r"Image 'T1_he' has 1 channel.*RGB scan",
        raises=ValueError,
    ),
    "spot_tiles-image-rgba": Case(
        "spot_tiles",
        _tiles(
            lambda sd: _replace_image(sd, lambda a: np.concatenate([a, np.full_like(a[:1], 255)]), ["r", "g", "b", "a"])
        ),
        r"Image 'T1_he' has 4 channels \(RGBA\?\).*drops the 4th",
        warns=UserWarning,
        writes=(("shapes", "comtip_tiles"),),
    ),
    "spot_tiles-image-float": Case(
        "spot_tiles",
        _tiles(lambda sd: _replace_image(sd, lambda a: a.astype(np.float32) / 255, ["r", "g", "b"])),
        r"Image 'T1_he' has pixel type float32.*astype\('uint8'\)",
        raises=ValueError,
    ),
    "spot_tiles-spots-duplicated": Case(
        "spot_tiles",
        _tiles(lambda sd: _rename(sd, "obs", _dup(sd.tables["table"].obs_names))),
        r"Table 'table' has duplicated spot names.*T1_0x0.*obs_names_make_unique",
        raises=ValueError,
    ),
    "spot_tiles-pixel-size-10x": Case(
        "spot_tiles",
        _tiles(_forget_units, data={"spacing_um": 100.0}, mpp=10.0),
        r"Spots 'T1_spots' are 1000 µm apart.*pixel size off.*Check mpp=10.0",
        warns=UserWarning,
        writes=(("shapes", "comtip_tiles"),),
    ),
    "spot_tiles-pixel-size-0.1x": Case(
        "spot_tiles",
        _tiles(_forget_units, data={"spacing_um": 100.0}, mpp=0.1),
        r"Spots 'T1_spots' are 10 µm apart.*pixel size off.*Check mpp=0.1",
        warns=UserWarning,
        writes=(("shapes", "comtip_tiles"),),
    ),
    "spot_tiles-tile-too-small": Case(
        "spot_tiles",
        _tiles(lambda sd: None, tile_size_px=4),
        r"tile_size_px=4 is too small.*at least 8",
        raises=ValueError,
    ),
    # ---------------------------------------------------------------- ct.tl.embed
    "embed-image-removed-after-tiles": Case(
        "embed",
        _tool("embed", _drop_image),
        r"Tiles refer to image 'T1_he'.*recompute ct.pp.spot_tiles",
        raises=KeyError,
    ),
    "embed-image-one-channel": Case(
        "embed",
        _tool("embed", lambda sd: _replace_image(sd, lambda a: a[:1])),
        r"Image 'T1_he' has 1 channel.*RGB scan",
        raises=ValueError,
    ),
    "embed-image-float": Case(
        "embed",
        _tool("embed", lambda sd: _replace_image(sd, lambda a: a.astype(np.float32) / 255, ["r", "g", "b"])),
        r"'T1_he' has pixel type float32",
        raises=ValueError,
    ),
    "embed-counts-nan": Case(
        "embed",
        _tool("embed", lambda sd: _set_counts(sd, NAN)),
        r"table 'table' \(.layers\['counts'\]\) contain NaN.*fix or drop",
        raises=ValueError,
    ),
    "embed-counts-negative": Case(
        "embed",
        _tool("embed", lambda sd: _set_counts(sd, NEG)),
        r"table 'table' \(.layers\['counts'\]\) contain negative.*layer=",
        raises=ValueError,
    ),
    "embed-counts-non-integer": Case(
        "embed",
        _tool("embed", lambda sd: _set_counts(sd, FRAC)),
        r"table 'table' \(.layers\['counts'\]\) are not integers.*layer=",
        warns=UserWarning,
        writes=EMBED_WRITES,
    ),
    "embed-spots-duplicated": Case(
        "embed",
        _tool("embed", lambda sd: _rename(sd, "obs", _dup(sd.tables["table"].obs_names))),
        r"Table 'table' has duplicated spot names.*obs_names_make_unique",
        raises=ValueError,
    ),
    "embed-genes-duplicated": Case(
        "embed",
        _tool("embed", lambda sd: _rename(sd, "var", _dup(sd.tables["table"].var_names))),
        r"Table 'table' has duplicated gene names.*\['ERBB2'\].*var_names_make_unique",
        raises=ValueError,
    ),
    "embed-no-panel-gene": Case(
        "embed",
        _tool("embed", lambda sd: _rename(sd, "var", [f"NOTAGENE{i}" for i in range(sd.tables["table"].n_vars)])),
        r"None of the model's 30 panel genes .* is among the 30 genes .*NOTAGENE0.*only image embeddings.*gene symbols",
        warns=UserWarning,
        writes=EMBED_WRITES,
    ),
    "embed-tiles-smaller-than-vit-patch": Case(
        "embed",
        _tool("embed", vit=True, tiles_px=8),
        r"Tiles 'comtip_tiles' hold 8 px.*one 16 px patch of .*'test_vit'.*tile_size_px=64",
        raises=ValueError,
    ),
    "embed-anndata-spots-duplicated": Case(
        "embed",
        _anndata(_adata_dup_obs),
        r"The AnnData has duplicated spot names.*adata.obs_names_make_unique",
        raises=ValueError,
    ),
    "embed-anndata-empty": Case(
        "embed", _anndata(lambda a: a[:0].copy()), r"The AnnData has no spots \(0 rows\)", raises=ValueError
    ),
    # ---------------------------------------------------------------- ct.tl.predict_expression
    "predict-genes-duplicated": Case(
        "predict_expression",
        _tool("predict_expression", lambda sd: _rename(sd, "var", _dup(sd.tables["table"].var_names))),
        r"duplicated gene names.*var_names_make_unique",
        raises=ValueError,
    ),
    "predict-tiles-smaller-than-vit-patch": Case(
        "predict_expression",
        _tool("predict_expression", vit=True, tiles_px=8),
        r"fewer than one 16 px patch.*overwrite=True",
        raises=ValueError,
    ),
    # ---------------------------------------------------------------- ct.tl.score_expression
    "score-no-panel-gene": Case(
        "score_expression",
        _tool("score_expression", _predictions_of_unmeasured_genes),
        r"only in .obsm\['comtip_pred'\]: none of the predicted genes is among the measured genes.*Predict measured genes",
        raises=KeyError,
    ),
    "score-counts-nan": Case(
        "score_expression",
        _tool("score_expression", lambda sd: (_fake_predictions(sd), _set_counts(sd, NAN))),
        r"table 'table' \(.layers\['counts'\]\) contain NaN",
        raises=ValueError,
    ),
    "score-counts-negative": Case(
        "score_expression",
        _tool("score_expression", lambda sd: (_fake_predictions(sd), _set_counts(sd, NEG))),
        r"contain negative values",
        raises=ValueError,
    ),
    "score-genes-duplicated": Case(
        "score_expression",
        _tool(
            "score_expression",
            lambda sd: (_fake_predictions(sd), _rename(sd, "var", _dup(sd.tables["table"].var_names))),
        ),
        r"duplicated gene names",
        raises=ValueError,
    ),
    "score-one-spot": Case(
        "score_expression",
        _tool("score_expression", lambda sd: (_one_spot(sd), _fake_predictions(sd))),
        r"Only 1 spots have predictions.*at least 3.*more spots",
        raises=ValueError,
    ),
    # ---------------------------------------------------------------- ct.tl.pretrain
    "pretrain-counts-nan": Case(
        "pretrain",
        _tool("pretrain", lambda sd: _set_counts(sd, NAN)),
        r"table 'table' \(.layers\['counts'\]\) contain NaN",
        raises=ValueError,
    ),
    "pretrain-counts-negative": Case(
        "pretrain",
        _tool("pretrain", lambda sd: _set_counts(sd, NEG)),
        r"contain negative values.*layer=",
        raises=ValueError,
    ),
    "pretrain-spots-duplicated": Case(
        "pretrain",
        _tool("pretrain", lambda sd: _rename(sd, "obs", _dup(sd.tables["table"].obs_names))),
        r"duplicated spot names.*obs_names_make_unique",
        raises=ValueError,
    ),
    "pretrain-genes-duplicated": Case(
        "pretrain",
        _tool("pretrain", lambda sd: _rename(sd, "var", _dup(sd.tables["table"].var_names))),
        r"duplicated gene names.*var_names_make_unique",
        raises=ValueError,
    ),
    "pretrain-no-genes": Case(
        "pretrain",
        _tool("pretrain", _without_genes),
        r"Table 'table' has no genes \(0 columns\).*needs the spots' expression",
        raises=ValueError,
    ),
    "pretrain-one-spot": Case(
        "pretrain",
        _tool("pretrain", _one_spot),
        r"Only 1 training spot with a tile \(sections \['T1'\]\).*at least 2",
        raises=ValueError,
    ),
    "pretrain-one-spot-validation-section": Case(
        "pretrain",
        _pretrain_warning(_one_spot_validation, "The validation sections"),
        r"validation sections \['S2'\] have only 1 spot.*validation=None",
        raises=UserWarning,
    ),
    "pretrain-tiles-smaller-than-vit-patch": Case(
        "pretrain",
        _tool("pretrain", tiles_px=8, config=ct.CoMTIPConfig.tiny(image_encoder="test_vit")),
        r"Tiles 'comtip_tiles' hold 8 px.*16 px patch.*tile_size_px=64",
        raises=ValueError,
    ),
    "pretrain-image-size-smaller-than-vit-patch": Case(
        "pretrain",
        _tool("pretrain", config=ct.CoMTIPConfig.tiny(image_encoder="test_vit", image_size=8)),
        r"CoMTIPConfig.image_size=8 does not suit 'test_vit'.*multiple of its 16 px patch",
        raises=ValueError,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, model, vit_model, sdata_factory, tmp_path):
    case = CASES[name]
    ctx = Ctx(model=model, vit_model=vit_model, sdata_factory=sdata_factory, tmp_path=tmp_path)
    obj, call = case.setup(ctx)
    before = snapshot(obj)
    if case.raises is not None:
        with pytest.raises(case.raises, match=case.match):
            call()
        assert_unchanged(before, snapshot(obj))
    else:
        with pytest.warns(case.warns, match=case.match):
            call()
        assert_unchanged(before, snapshot(obj), allow=case.writes)


def test_every_entry_point_has_cases():
    entries = {c.entry for c in CASES.values()}
    assert entries >= {"read_st", "spot_tiles", "embed", "predict_expression", "score_expression", "pretrain"}
    assert all(re.compile(c.match) for c in CASES.values())


# ------------------------------------------------------------------------------------------- bad input that works
def test_one_spot_section_gets_a_tile_an_embedding_and_a_prediction(model, sdata_factory):
    sd = _fresh(sdata_factory, tiles=False)
    _one_spot(sd)
    ct.pp.spot_tiles(sd, tile_size_um=40, tile_size_px=64)
    assert len(sd.shapes["comtip_tiles"]) == 1
    assert ct.tl.embed(sd, model) == ["X_comtip_image", "X_comtip_gene"]
    assert np.isfinite(sd.tables["table"].obsm["X_comtip_image"]).all()
    ct.tl.predict_expression(sd, model, genes=["ERBB2"], dihedral=False)
    assert sd.tables["table"].layers["comtip_pred"].shape == (1, sd.tables["table"].n_vars)


def test_zero_shot_needs_no_expression_overlap(model, sdata_factory):
    """No overlap between the data's genes and the panel: zero-shot still predicts (into .obsm, named by gene)."""
    sd = _fresh(sdata_factory)
    _rename(sd, "var", [f"NOTAGENE{i}" for i in range(sd.tables["table"].n_vars)])
    assert ct.tl.predict_expression(sd, model, genes=["ERBB2", "KRT19"], dihedral=False) == "comtip_pred"
    pred = sd.tables["table"].obsm["comtip_pred"]
    assert list(pred.columns) == ["ERBB2", "KRT19"] and np.isfinite(pred.to_numpy()).all()
    assert "comtip_pred" not in sd.tables["table"].layers


def test_image_only_table_embeds_without_a_warning(model, sdata_factory):
    sd = _fresh(sdata_factory)
    _without_genes(sd)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert ct.tl.embed(sd, model) == ["X_comtip_image"]


def test_truncated_image_file_fails_when_read_and_leaves_the_data(model, tmp_path):
    counts, spots = _st_inputs(tmp_path)
    sd = ct.io.read_st(counts, spots, tmp_path / "truncated.jpg", **ST)  # only the header is read here
    ct.pp.spot_tiles(sd, tile_size_um=40, tile_size_px=64)
    before = snapshot(sd)
    with pytest.raises(ValueError, match=r"truncated\.jpg' could not be decoded.*truncated or damaged.*again"):
        ct.tl.embed(sd, model)
    assert_unchanged(before, snapshot(sd))


def test_predictions_of_an_image_only_slide_cannot_be_scored(model, sdata_factory):
    sd = _fresh(sdata_factory)
    _without_genes(sd)
    ct.tl.predict_expression(sd, model, genes=["ERBB2"], dihedral=False)  # the table's genes become the predicted
    before = snapshot(sd)
    with pytest.raises(ValueError, match=r"Table 'table' has no measured expression.*image-only"):
        ct.tl.score_expression(sd, model=model)
    assert_unchanged(before, snapshot(sd))
