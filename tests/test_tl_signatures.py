"""One signature for ``ct.tl``: ``copy=``, shared defaults, the AnnData conversion cache, embeddings reused by predict."""

from __future__ import annotations

import copy
import gc
import inspect

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import comtip as ct
from comtip import _constants as C

TOOLS = {
    "embed": ct.tl.embed,
    "predict_expression": ct.tl.predict_expression,
    "retrieve": ct.tl.retrieve,
    "score_expression": ct.tl.score_expression,
}
GENES = ["ERBB2", "KRT19", "CDH1"]  # CDH1: not measured, not in the panel (prompted from its description)


@pytest.fixture
def model(trained):
    return copy.deepcopy(trained[0])


# ------------------------------------------------------------------------------------------- snapshots
def _plain(v):
    if sparse.issparse(v):
        return v.toarray()
    if isinstance(v, pd.DataFrame | pd.Series):
        return v.copy()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, np.ndarray):
        return v.copy()
    return copy.deepcopy(v)


def _table_state(t: ad.AnnData) -> dict:
    return {
        "obs": t.obs.copy(),
        "var": t.var.copy(),
        "X": _plain(t.X),
        "layers": {k: _plain(v) for k, v in t.layers.items()},
        "obsm": {k: _plain(v) for k, v in t.obsm.items()},
        "uns": {k: _plain(v) for k, v in t.uns.items()},
    }


def state(data) -> dict:
    """What a user sees of an AnnData or SpatialData (tables in full, other elements by name)."""
    if isinstance(data, ad.AnnData):
        return _table_state(data)
    out = {k: _table_state(t) for k, t in data.tables.items()}
    out["elements"] = {kind: sorted(getattr(data, kind)) for kind in ("images", "shapes", "labels", "points")}
    return out


def assert_same(a, b, path="") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b, obj=path)
    elif isinstance(a, np.ndarray | list | tuple) and not isinstance(a, str):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path)
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), path
    else:
        assert a == b, path


# ------------------------------------------------------------------------------------------- signatures
@pytest.mark.parametrize("name", list(TOOLS))
def test_one_signature_shape(name):
    """(data, model=None, *, <options>, key_added=..., overwrite=False, copy=False)."""
    params = list(inspect.signature(TOOLS[name]).parameters.values())
    assert [p.name for p in params[:2]] == ["data", "model"]
    assert params[0].kind is params[1].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert params[1].default is None
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[2:])
    assert [p.name for p in params[-3:]] == ["key_added", "overwrite", "copy"]
    assert params[-2].default is False and params[-1].default is False


def test_shared_inference_defaults():
    """embed, predict_expression and retrieve (which embeds when it must) share their defaults, from _constants."""
    sig = {n: inspect.signature(TOOLS[n]).parameters for n in ("embed", "predict_expression", "retrieve")}
    shared = {
        "batch_size": C.BATCH_SIZE,
        "device": None,
        "num_workers": None,
        "table_key": C.TABLE_KEY,
        "tiles_key": C.TILES_KEY,
    }
    for name, params in sig.items():
        for kw, default in shared.items():
            assert params[kw].default == default, (name, kw)
    # documented difference: cheap one-view embeddings, 8-view averaged predictions
    assert sig["embed"]["dihedral"].default is C.EMBED_DIHEDRAL is False
    assert sig["retrieve"]["dihedral"].default is C.EMBED_DIHEDRAL
    assert sig["predict_expression"]["dihedral"].default is C.PREDICT_DIHEDRAL is True
    assert sig["predict_expression"]["spatial_context"].default == C.SPATIAL_CONTEXT
    assert sig["retrieve"]["key_added"].default == C.RETRIEVAL_KEY
    assert inspect.signature(ct.tl.score_expression).parameters["key_added"].default == C.SCORE_KEY


def test_cli_defaults_come_from_constants():
    from comtip.cli import build_parser

    parser = build_parser()
    embed = parser.parse_args(["embed", "--model", "m", "x.zarr"])
    predict = parser.parse_args(["predict", "--model", "m", "x.zarr"])
    for args in (embed, predict):
        assert (args.tile_size_um, args.tile_size_px, args.batch_size) == (
            C.TILE_SIZE_UM,
            C.TILE_SIZE_PX,
            C.BATCH_SIZE,
        )
    assert embed.dihedral is C.EMBED_DIHEDRAL and (not predict.no_dihedral) is C.PREDICT_DIHEDRAL


def test_layer_added_still_works_with_a_deprecation_warning(model, test_sdata):
    with pytest.warns(DeprecationWarning, match=r"layer_added=.*deprecated.*key_added="):
        key = ct.tl.predict_expression(test_sdata, model, genes=["ERBB2"], dihedral=False, layer_added="old")
    assert key == "old" and "old" in test_sdata.tables["table"].layers
    with pytest.raises(TypeError, match="both layer_added= and key_added="):
        ct.tl.predict_expression(test_sdata, model, genes=["ERBB2"], layer_added="a", key_added="b")


# ------------------------------------------------------------------------------------------- copy=
def _run(name, data, model, **kw):
    if name == "embed":
        return ct.tl.embed(data, model, **kw)
    if name == "predict_expression":
        return ct.tl.predict_expression(data, model, genes=GENES, dihedral=False, spatial_context=0, **kw)
    if name == "retrieve":
        return ct.tl.retrieve(data, model, **kw)
    return ct.tl.score_expression(data, model, **kw)


def _written(name, table) -> None:
    """The tool's results are in ``table``."""
    if name == "embed":
        assert {"X_comtip_image", "X_comtip_gene", "X_comtip_image_prompt"} <= set(table.obsm)
    elif name == "predict_expression":
        assert "comtip_pred" in table.layers and list(table.obsm["comtip_pred"].columns) == ["CDH1"]
    elif name == "retrieve":
        assert table.obsm["comtip_retrieval"].shape == (table.n_obs, C.RECALL_K)
    else:
        assert np.isfinite(table.var["comtip_pearson"].dropna()).all() and "comtip_pearson_adj" in table.var
    assert name in table.uns["comtip"]


@pytest.mark.parametrize("name", list(TOOLS))
def test_copy_leaves_the_input_and_returns_the_results(name, model, test_sdata):
    if name == "score_expression":
        ct.tl.predict_expression(test_sdata, model, genes=GENES, dihedral=False, spatial_context=0)
    before = state(test_sdata)
    out = _run(name, test_sdata, model, copy=True)
    assert_same(before, state(test_sdata))  # the input is as it was
    assert isinstance(out, type(test_sdata)) and out is not test_sdata
    table = out.tables["table"]
    assert table is not test_sdata.tables["table"]
    _written(name, table)
    assert out.images["T1_he"] is test_sdata.images["T1_he"]  # images are shared, not loaded into memory
    # copy=False: in place, with the documented return (the keys written, or the table)
    expected = {
        "embed": ["X_comtip_image", "X_comtip_gene"],
        "predict_expression": "comtip_pred",
    }
    got = _run(name, test_sdata, model, overwrite=True)
    _written(name, test_sdata.tables["table"])
    if name in expected:
        assert got == expected[name]
    else:
        assert isinstance(got, pd.DataFrame)
    # the same numbers either way
    if name == "embed":
        for k in ("X_comtip_image", "X_comtip_gene", "X_comtip_image_prompt"):
            np.testing.assert_array_equal(table.obsm[k], test_sdata.tables["table"].obsm[k])
    if name == "predict_expression":
        np.testing.assert_array_equal(table.layers["comtip_pred"], test_sdata.tables["table"].layers["comtip_pred"])
    if name == "score_expression":
        pd.testing.assert_series_equal(table.var["comtip_pearson"], test_sdata.tables["table"].var["comtip_pearson"])


def test_copy_of_an_anndata(model, visium_adata):
    adata = visium_adata
    before = state(adata)
    out = ct.tl.embed(adata, model, copy=True)
    assert_same(before, state(adata))
    assert isinstance(out, ad.AnnData) and out is not adata
    assert out.obsm["X_comtip_image"].shape == (36, model.embed_dim)
    assert ct.tl.embed(adata, model) == ["X_comtip_image", "X_comtip_gene"]
    np.testing.assert_array_equal(out.obsm["X_comtip_image"], adata.obsm["X_comtip_image"])
    out = ct.tl.predict_expression(adata, model, genes=GENES, dihedral=False, copy=True)
    assert "comtip_pred" in out.layers and "comtip_pred" not in adata.layers


# ------------------------------------------------------------------------------------------- AnnData conversion cache
@pytest.fixture
def conversions(monkeypatch):
    """Counts the AnnData -> SpatialData conversions."""
    import comtip.io
    from comtip.tl import _data

    _data._CONVERSIONS.clear()
    calls = []
    real = comtip.io.from_anndata

    def counting(adata, **kw):
        calls.append(id(adata))
        return real(adata, **kw)

    monkeypatch.setattr(comtip.io, "from_anndata", counting)
    return calls


def test_anndata_is_converted_once(model, visium_adata, conversions, tmp_path):
    from comtip.tl import _data

    adata = visium_adata.copy()  # our own reference only: the entry must go when it is freed
    ct.tl.embed(adata, model)
    ct.tl.predict_expression(adata, model, genes=GENES, dihedral=False)
    ct.tl.retrieve(adata, model)
    copied = ct.tl.predict_expression(adata, model, genes=GENES, dihedral=False, key_added="c", copy=True)
    np.testing.assert_array_equal(copied.layers["c"], adata.layers["comtip_pred"])  # the copy shares the conversion
    assert len(conversions) == 1
    # the same results as from a fresh conversion
    _data._CONVERSIONS.clear()
    ct.tl.predict_expression(adata, model, genes=GENES, dihedral=False, key_added="fresh")
    assert len(conversions) == 2
    np.testing.assert_array_equal(adata.layers["fresh"], adata.layers["comtip_pred"])
    # nothing of the cache is in the AnnData, so nothing of it is saved
    assert set(adata.uns) == {"spatial", "comtip"}
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    assert set(back.uns) == {"spatial", "comtip"}
    # changed obs (or expression, positions, images) are converted again
    adata.obs["in_tissue"] = 1
    ct.tl.embed(adata, model, overwrite=True)
    assert len(conversions) == 3
    adata.X = adata.X * 2
    ct.tl.embed(adata, model, overwrite=True)
    assert len(conversions) == 4
    ct.tl.embed(adata, model, overwrite=True)
    assert len(conversions) == 4
    # a model with other tiles gets tiles of its own
    other = copy.deepcopy(model)
    other.training_summary["tile_size_um"] = 30.0
    ct.tl.embed(adata, other, key_added="other")
    assert len(conversions) == 5
    # the entry goes with the AnnData
    key = id(adata)
    assert key in _data._CONVERSIONS
    del adata
    gc.collect()
    assert key not in _data._CONVERSIONS


# ------------------------------------------------------------------------------------------- reuse of .obsm
@pytest.fixture
def encodings(monkeypatch):
    """Counts the image-tower runs of predict_expression."""
    import comtip.tl._predict as predict_module

    calls = []
    real = predict_module.image_embeddings

    def counting(*args, **kw):
        calls.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(predict_module, "image_embeddings", counting)
    return calls


@pytest.mark.parametrize("method", ["zero_shot", "probe"])
def test_predict_reuses_the_embeddings_of_embed(method, model, test_sdata, monkeypatch):
    import comtip.tl._predict as predict_module

    table = test_sdata.tables["table"]
    genes = GENES if method == "zero_shot" else GENES[:2]
    ct.tl.embed(test_sdata, model, dihedral=True)
    ct.tl.predict_expression(test_sdata, model, genes=genes, method=method, key_added="encoded")
    assert table.uns["comtip"]["predict_expression"]["image_embeddings_reused"]  # embed + defaults: reused

    def no_tower(*args, **kw):
        raise AssertionError("the image tower ran")

    monkeypatch.setattr(predict_module, "image_embeddings", no_tower)
    ct.tl.predict_expression(test_sdata, model, genes=genes, method=method, key_added="reused")
    assert table.uns["comtip"]["predict_expression"]["image_embeddings_reused"]
    monkeypatch.undo()
    # without the stored embeddings, the tiles are encoded: the same predictions
    del table.obsm["X_comtip_image_prompt"]
    del table.obsm["X_comtip_image"]
    ct.tl.predict_expression(test_sdata, model, genes=genes, method=method, key_added="fresh")
    assert not table.uns["comtip"]["predict_expression"]["image_embeddings_reused"]
    np.testing.assert_array_equal(table.layers["reused"], table.layers["fresh"])
    if method == "zero_shot":
        pd.testing.assert_frame_equal(table.obsm["reused"], table.obsm["fresh"])


def test_predict_reuses_embeddings_of_an_anndata(model, visium_adata, encodings, tmp_path):
    adata = visium_adata
    ct.tl.embed(adata, model)
    ct.tl.predict_expression(adata, model, genes=GENES, dihedral=False, spatial_context=0.5)
    assert encodings == []
    # also after a round trip through h5ad (the provenance is read back from .uns)
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    ct.tl.predict_expression(back, model, genes=GENES, dihedral=False, key_added="back")
    assert encodings == []
    np.testing.assert_array_equal(back.layers["back"], adata.layers["comtip_pred"])


def test_predict_does_not_reuse_other_embeddings(model, test_sdata, encodings):
    import torch

    table = test_sdata.tables["table"]
    ct.tl.embed(test_sdata, model)  # one view (dihedral=False)
    n = 0

    def predict(m=model, **kw):
        nonlocal n
        n += 1
        ct.tl.predict_expression(test_sdata, m, genes=["ERBB2"], key_added=f"p{n}", **{"dihedral": False, **kw})
        return table.uns["comtip"]["predict_expression"]["image_embeddings_reused"]

    assert predict() and len(encodings) == 0
    assert not predict(dihedral=True) and len(encodings) == 1  # other settings
    assert not predict(batch_size=7) and len(encodings) == 2
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.image_proj.parameters()).add_(1e-3)
    assert not predict(m=other) and len(encodings) == 3  # other weights
    ct.pp.spot_tiles(test_sdata, tile_size_um=44, tile_size_px=64, overwrite=True)
    assert not predict() and len(encodings) == 4  # other tiles
