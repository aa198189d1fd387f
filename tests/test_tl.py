"""The public tools: embed, predict_expression, score_expression, retrieve, load_model; where results go."""

from __future__ import annotations

import copy

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import comtip as ct


@pytest.fixture
def model(trained):
    return copy.deepcopy(trained[0])


def test_no_current_model_error(test_sdata):
    ct.settings._model = None
    with pytest.raises(ValueError, match=r"ct.tl.pretrain\(sdata\).*ct.tl.load_model"):
        ct.tl.embed(test_sdata)


def test_pretrain_sets_current_model_and_history(trained):
    model, train = trained
    assert model.is_trained
    s = model.training_summary
    best = s["stages"][1]["best_epoch"]  # the read-out is refitted on training + validation spots for best + 1 epochs
    assert [(h["stage"], h["epoch"]) for h in model.history] == [
        ("contrastive", 0),
        ("contrastive", 1),
        ("readout", 0),
        ("readout", 1),
        *[("readout_refit", e) for e in range(best + 1)],
    ]
    assert model.training_summary["readout_epochs"] == 2
    refit = s["stages"][-1]
    assert refit["stage"] == "readout_refit" and refit["sections"] == ["S1", "S2", "S3"]
    assert refit["epochs"] == best + 1
    n_all = s["n_train_spots"] + s["n_val_spots"]
    assert refit["steps"] == (best + 1) * (n_all // refit["batch_size"])
    assert s["sections"] == ["S1", "S2"]
    assert s["validation_sections"] == ["S3"]
    assert set(s["eval_panels"]) == {"hvg50", "heg250"}
    # score_expression's panels: those of the training and validation sections together, as benchmarks/accuracy.py's
    table = train.tables["table"]
    seen = ct.pp.eval_panels(table[table.obs["section"].isin(s["sections"] + s["validation_sections"]).to_numpy()])
    assert s["eval_panels"] == {"hvg50": seen["hvg50"], "heg250": seen["heg250"]}
    assert model.reference["embeddings"].shape == (72, model.embed_dim)
    assert model.reference["expression"].shape == (72, model.n_genes)
    assert model.reference["xy"].shape == (72, 2) and set(model.reference["section"].tolist()) == {0, 1}


def test_readout_stage_leaves_sentence_embeddings_alone(trained, tmp_path):
    """The read-out stage trains its own copy of the gene encoder: sentence embeddings are the contrastive stage's."""
    import torch

    model, train = trained
    without = ct.tl.pretrain(
        train, config=ct.CoMTIPConfig.tiny(), max_epochs=2, readout_epochs=0, batch_size=16, n_genes=30, seed=0
    )
    assert model.config.separate_prompt_encoder and not without.config.separate_prompt_encoder
    idx = torch.arange(8).repeat(3, 1)
    val = torch.rand(3, 8) * 3
    with torch.no_grad():
        assert torch.equal(model.eval().encode_genes(idx, val), without.eval().encode_genes(idx, val))
        assert not torch.allclose(model.prompt_embeddings(), without.prompt_embeddings())
    model.save(tmp_path / "m")
    loaded = ct.CoMTIP.load(tmp_path / "m")
    assert loaded.config.separate_prompt_encoder
    assert torch.equal(loaded.prompt_embeddings(), model.prompt_embeddings())
    ct.settings.model = model


def test_pretrain_leaves_out_spots_whose_image_is_gone(sdata_factory):
    sd = sdata_factory(sections=("S1", "S2", "S3"))
    ct.pp.spot_tiles(sd, tile_size_um=40, tile_size_px=64)
    del sd.images["S3_he"]  # e.g. after sdata.subset(...) without the image
    with pytest.warns(UserWarning, match=r"refer to images that are not in the SpatialData object \(S3_he\)"):
        model = ct.tl.pretrain(
            sd, config=ct.CoMTIPConfig.tiny(), max_epochs=1, readout_epochs=0, batch_size=16, n_genes=30, seed=0
        )
    assert model.training_summary["sections"] + model.training_summary["validation_sections"] == ["S1", "S2"]


def test_pretrain_without_augmentation(sdata_factory):
    """augment=False trains on the tiles as they are: recorded, and the weights differ from an augmented run."""
    import torch

    sd = sdata_factory(sections=("S1", "S2"))
    ct.pp.spot_tiles(sd, tile_size_um=40, tile_size_px=64)
    kw = {"config": ct.CoMTIPConfig.tiny(), "max_epochs": 1, "readout_epochs": 1, "batch_size": 16, "n_genes": 30}
    plain = ct.tl.pretrain(sd, augment=False, seed=0, **kw)
    augmented = ct.tl.pretrain(sd, seed=0, **kw)
    assert plain.training_summary["augment"] is False and augmented.training_summary["augment"] is True
    a, b = plain.state_dict(), augmented.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_embed_writes_documented_keys(model, test_sdata):
    keys = ct.tl.embed(test_sdata, model)
    table = test_sdata.tables["table"]
    assert keys == ["X_comtip_image", "X_comtip_gene"]
    for k in keys:
        assert table.obsm[k].shape == (36, model.embed_dim)
        np.testing.assert_allclose(np.linalg.norm(table.obsm[k], axis=1), 1, atol=1e-5)
    uns = table.uns["comtip"]["embed"]
    assert uns["weights_sha256"] == model.weights_checksum()
    with pytest.raises(ValueError, match="overwrite=True"):
        ct.tl.embed(test_sdata, model)
    before = table.obsm["X_comtip_image"].copy()
    ct.tl.embed(test_sdata, model, overwrite=True)
    np.testing.assert_array_equal(before, table.obsm["X_comtip_image"])  # embedding is deterministic


def test_current_model_is_used(model, test_sdata):
    ct.settings.model = model
    assert ct.tl.embed(test_sdata) == ["X_comtip_image", "X_comtip_gene"]


def test_predict_zero_shot_layers_and_new_gene(model, test_sdata):
    table = test_sdata.tables["table"]
    genes = ["ERBB2", "KRT19", "CDH1"]  # CDH1: measured nowhere, not in the panel: prompted from its description
    assert "CDH1" not in model.genes
    assert ct.tl.predict_expression(test_sdata, model, genes=genes, dihedral=False) == "comtip_pred"
    layer = table.layers["comtip_pred"]
    assert layer.shape == table.shape
    vi = table.var_names.get_indexer(["ERBB2", "KRT19"])
    assert np.isfinite(layer[:, vi]).all()
    others = np.setdiff1d(np.arange(table.n_vars), vi)
    assert np.isnan(layer[:, others]).all()  # unpredicted genes are NaN, never zeros
    df = table.obsm["comtip_pred"]
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns) == ["CDH1"]
    assert np.isfinite(df.to_numpy()).all()
    assert model.n_genes == 30  # the user's model keeps its panel
    rec = table.uns["comtip"]["predict_expression"]
    assert rec["method"] == "zero_shot"
    assert rec["genes"] == genes
    with pytest.raises(ValueError, match="overwrite=True"):
        ct.tl.predict_expression(test_sdata, model, genes=genes, dihedral=False)


def test_zero_shot_never_reads_target_expression(model, test_sdata):
    ct.tl.predict_expression(test_sdata, model, dihedral=False)
    table = test_sdata.tables["table"]
    first = table.layers["comtip_pred"].copy()
    rng = np.random.default_rng(3)
    scrambled = sparse.csr_matrix(rng.poisson(5, table.shape).astype(np.float32))
    table.X = scrambled
    table.layers["counts"] = scrambled.copy()
    ct.tl.predict_expression(test_sdata, model, dihedral=False, overwrite=True)
    np.testing.assert_array_equal(first, table.layers["comtip_pred"])


def test_reference_methods(model, test_sdata, trained):
    ct.tl.predict_expression(
        test_sdata, model, method="retrieval", genes=["ERBB2", "KRT19"], k=10, dihedral=False, key_added="retr"
    )
    ct.tl.predict_expression(
        test_sdata, model, method="probe", genes=["ERBB2", "KRT19"], dihedral=False, key_added="probe"
    )
    ct.tl.predict_expression(
        test_sdata, model, method="probe", reference=trained[1], genes=["ERBB2"], dihedral=False, key_added="probe2"
    )
    table = test_sdata.tables["table"]
    for layer in ("retr", "probe", "probe2"):
        assert np.isfinite(table.layers[layer][:, table.var_names.get_loc("ERBB2")]).all()
    assert table.uns["comtip"]["predict_expression"]["reference"] == "given"
    with pytest.raises(ValueError, match="reference="):
        ct.tl.predict_expression(test_sdata, model, method="retrieval", genes=["CDH1"], key_added="x")


def test_score_expression(model, test_sdata):
    ct.tl.predict_expression(test_sdata, model, dihedral=False)
    df = ct.tl.score_expression(test_sdata, model=model)
    table = test_sdata.tables["table"]
    assert set(df.columns) >= {"pearson", "spearman", "pearson_adj", "hvg50", "heg250"}
    assert len(df) == len([g for g in model.genes if g in table.var_names])
    assert np.isfinite(table.var["comtip_pearson"].dropna()).all()
    summary = table.uns["comtip"]["score_expression"]
    assert summary["panels_from"] == "model training spots"
    assert -1 <= summary["hvg50"]["pearson"] <= 1
    with pytest.raises(ValueError, match="overwrite=True"):
        ct.tl.score_expression(test_sdata, model=model)


def test_score_requires_predictions(test_sdata):
    with pytest.raises(KeyError, match="predict_expression"):
        ct.tl.score_expression(test_sdata)


def test_retrieve(model, test_sdata):
    df = ct.tl.retrieve(test_sdata, model, k=5)
    table = test_sdata.tables["table"]
    assert table.obsm["comtip_retrieval"].shape == (36, 5)
    rec = table.uns["comtip"]["retrieve"]
    assert rec["recall_at_k"] == pytest.approx(df["hit"].mean())
    assert rec["chance"] == pytest.approx(5 / 36)


def test_unknown_gene_without_description(model, test_sdata):
    with pytest.raises(KeyError, match="descriptions="):
        ct.tl.predict_expression(test_sdata, model, genes=["NOTAGENE1"])
    assert "comtip_pred" not in test_sdata.tables["table"].layers
    ct.tl.predict_expression(
        test_sdata,
        model,
        genes=["NOTAGENE1"],
        descriptions={"NOTAGENE1": "NOTAGENE1: a keratin of epithelia."},
        dihedral=False,
    )
    assert "NOTAGENE1" in test_sdata.tables["table"].obsm["comtip_pred"].columns


def test_data_without_tiles(model, sdata_factory):
    sd = sdata_factory(sections=("T1",))
    with pytest.raises(KeyError, match=r"ct.pp.spot_tiles"):
        ct.tl.embed(sd, model)
    assert "X_comtip_image" not in sd.tables["table"].obsm


def test_results_round_trip_h5ad_and_zarr(model, test_sdata, tmp_path):
    ct.tl.embed(test_sdata, model)
    ct.tl.predict_expression(test_sdata, model, genes=["ERBB2", "CDH1"], dihedral=False)
    ct.tl.score_expression(test_sdata, model=model)
    table = test_sdata.tables["table"]
    table.write_h5ad(tmp_path / "t.h5ad")
    back = ad.read_h5ad(tmp_path / "t.h5ad")
    np.testing.assert_array_equal(back.layers["comtip_pred"], table.layers["comtip_pred"])
    pd.testing.assert_frame_equal(back.obsm["comtip_pred"], table.obsm["comtip_pred"])
    assert back.uns["comtip"]["predict_expression"]["genes"].tolist() == ["ERBB2", "CDH1"]
    test_sdata.write(tmp_path / "s.zarr")
    import spatialdata as sd

    s2 = sd.read_zarr(tmp_path / "s.zarr")
    t2 = s2.tables["table"]
    np.testing.assert_array_equal(t2.obsm["X_comtip_image"], table.obsm["X_comtip_image"])
    np.testing.assert_array_equal(t2.layers["comtip_pred"], table.layers["comtip_pred"])
    assert "comtip_tiles" in s2.shapes


def test_save_load_model_round_trip(model, test_sdata, tmp_path):
    model.save(tmp_path / "m")
    loaded = ct.tl.load_model(tmp_path / "m")
    assert ct.settings.model is loaded
    assert loaded.reference is not None
    for k in ("embeddings", "expression", "xy", "section"):
        np.testing.assert_array_equal(loaded.reference[k].numpy(), model.reference[k].numpy(), err_msg=k)
    a = ct.tl.embed(test_sdata, model, key_added="a")
    b = ct.tl.embed(test_sdata, loaded, key_added="b")
    t = test_sdata.tables["table"]
    np.testing.assert_allclose(t.obsm[a[0]], t.obsm[b[0]], atol=1e-6)
    np.testing.assert_allclose(t.obsm[a[1]], t.obsm[b[1]], atol=1e-6)
    with pytest.raises(FileNotFoundError, match="Hugging Face Hub id"):
        ct.tl.load_model(tmp_path / "nothing-here")


def test_anndata_input(model, test_sdata, visium_adata):
    """A scanpy Visium-style AnnData (uns['spatial'] with the H&E, obsm['spatial'] in full-res pixels) works as input."""
    adata = visium_adata
    keys = ct.tl.embed(adata, model)
    assert adata.obsm[keys[0]].shape == (36, model.embed_dim)
    ct.tl.predict_expression(adata, model, genes=["ERBB2", "CDH1"], dihedral=False)
    assert np.isfinite(adata.layers["comtip_pred"][:, adata.var_names.get_loc("ERBB2")]).all()
    assert "CDH1" in adata.obsm["comtip_pred"]


def test_dihedral_mean_is_invariant_to_flips_and_rotations():
    import torch

    from comtip.model._inference import DihedralMean

    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())  # not invariant itself
    x = torch.rand(2, 3, 8, 8)
    averaged = DihedralMean(encoder)
    assert not torch.allclose(encoder(x), encoder(x.flip(-1)))
    torch.testing.assert_close(averaged(x.flip(-1)), averaged(x))
    torch.testing.assert_close(averaged(torch.rot90(x, 1, (-2, -1))), averaged(x))
    # one pass for both: the untransformed view, then the mean
    both = DihedralMean(encoder, keep_first=True)(x)
    torch.testing.assert_close(both, torch.cat([encoder(x), averaged(x)], dim=1))


def test_neighbour_average_known_answer():
    """Neighbours: same section, within 1.5 spot spacings (8 on a square grid); isolated spots keep their row."""
    from comtip._spatial import neighbour_average

    xy = np.array([(x, y) for x in range(3) for y in range(3)], dtype=float) * 200.0  # ST grid, 200 µm apart
    v = np.arange(9, dtype=float)[:, None]
    out = neighbour_average(v, xy, np.zeros(9), weight=0.5)
    assert out[4, 0] == pytest.approx(0.5 * 4 + 0.5 * np.mean([0, 1, 2, 3, 5, 6, 7, 8]))  # centre: 8 neighbours
    assert out[0, 0] == pytest.approx(0.5 * 0 + 0.5 * np.mean([1, 3, 4]))  # corner: 3 neighbours
    np.testing.assert_array_equal(neighbour_average(v, xy, np.zeros(9), weight=0.0), v)
    # a second section at the same positions never mixes with the first
    both = neighbour_average(np.vstack([v, v + 100]), np.vstack([xy, xy]), np.repeat(["a", "b"], 9), weight=0.5)
    np.testing.assert_allclose(both[:9], out)
    np.testing.assert_allclose(both[9:], out + 100)  # the same mixing of rows shifted by 100
    # a lone spot far from the others (its own section's spacing is nan) keeps its value
    lone = neighbour_average(np.vstack([v, [[42.0]]]), np.vstack([xy, [[1e5, 1e5]]]), [*["a"] * 9, "b"], weight=0.5)
    assert lone[-1, 0] == 42.0


def test_spatial_context_mixes_each_spot_with_its_neighbours(model, test_sdata, trained):
    """predict_expression(spatial_context=w) predicts from (1 - w) * own + w * neighbours' mean embedding."""
    import inspect

    assert inspect.signature(ct.tl.predict_expression).parameters["spatial_context"].default == 0.5
    from comtip._spatial import neighbour_average
    from comtip.tl._data import resolve_spots
    from comtip.tl._embed import image_embeddings
    from comtip.tl._predict import _zero_shot

    genes = ["ERBB2", "KRT19"]
    table = test_sdata.tables["table"]
    ct.tl.predict_expression(test_sdata, model, genes=genes, dihedral=False, spatial_context=0.5, key_added="ctx")
    assert table.uns["comtip"]["predict_expression"]["spatial_context"] == 0.5
    spots = resolve_spots(test_sdata, table_key="table", tiles_key="comtip_tiles", model=model)
    pos, names = spots.tiled_rows()
    emb = image_embeddings(model, spots, names, batch_size=32, device=None, dihedral=False, num_workers=0)
    xy, sections = spots.centres(names)
    mixed = neighbour_average(emb["prompt"], xy, sections, weight=0.5).astype(np.float32)
    expected = _zero_shot(model, mixed, genes, descriptions=None, n_levels=None)
    got = table.layers["ctx"][pos][:, table.var_names.get_indexer(genes)]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    alone = _zero_shot(model, emb["prompt"], genes, descriptions=None, n_levels=None)
    assert np.abs(got - alone).max() > 1e-3  # the context changes predictions
    # the neighbour graph is stored for inspection: squidpy's radius graph, symmetric, each spot's ST-grid neighbours
    graph = table.obsp["comtip_spatial_connectivities"]
    assert table.uns["comtip"]["predict_expression"]["spatial_graph"] == "comtip_spatial_connectivities"
    assert graph.shape == (table.n_obs, table.n_obs) and (graph != graph.T).nnz == 0 and graph.diagonal().sum() == 0
    deg = np.asarray(graph.sum(1)).ravel()[pos]
    assert deg.max() <= 8 and np.median(deg) >= 3

    # the stored training reference keeps its spots' positions, so reference methods mix those spots too
    ct.tl.predict_expression(
        test_sdata, model, method="probe", genes=genes, dihedral=False, spatial_context=0.5, key_added="p0"
    )
    ct.tl.predict_expression(
        test_sdata, model, method="probe", genes=genes, dihedral=False, spatial_context=0, key_added="p1"
    )
    assert not np.allclose(table.layers["p0"][pos], table.layers["p1"][pos], equal_nan=True)
    # a model saved before positions were stored: each spot alone, and the user is told
    old = copy.deepcopy(model)
    old.reference = {k: old.reference[k] for k in ("embeddings", "expression")}
    with pytest.warns(UserWarning, match=r"no spot positions.*spatial_context=0.*reference="):
        ct.tl.predict_expression(test_sdata, old, method="probe", genes=genes, dihedral=False, key_added="p2")
    np.testing.assert_array_equal(table.layers["p2"], table.layers["p1"])
    assert table.uns["comtip"]["predict_expression"]["spatial_context"] == 0.0
    before = set(table.layers)
    for bad in (-0.1, 1.5, float("nan"), None, "half"):
        with pytest.raises(ValueError, match="spatial_context must be between 0"):
            ct.tl.predict_expression(test_sdata, model, genes=genes, spatial_context=bad, key_added="p")
    assert set(table.layers) == before  # nothing written
    ct.tl.predict_expression(
        test_sdata,
        model,
        method="probe",
        reference=trained[1],
        genes=genes,
        dihedral=False,
        spatial_context=0.5,
        key_added="p",
    )
    assert np.isfinite(table.layers["p"][pos][:, table.var_names.get_indexer(genes)]).all()
