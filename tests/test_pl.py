"""Plots (ct.pl): figures built from what ct.tl wrote; assertions on their axes and data, PNGs to look at.

Set ``COMTIP_PNG_DIR`` to also write every figure there (e.g. ``/tmp/comtip_pl_pngs``) for a person to inspect.
"""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

import comtip as ct
from comtip.pp import log_normalized

mpl.use("agg")
GENES = ["ERBB2", "KRT19"]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def results(trained):
    """A copy of the tiny model's three synthetic sections, embedded, predicted and scored, with pathologist labels.

    Module-scoped and built once; tests must not modify it.
    """
    from spatialdata import deepcopy

    model, train = trained
    sd = deepcopy(train)
    table = sd.tables["table"]
    label = np.where(table.obs["array_x"].to_numpy() < 3, "tumour", "stroma").astype(object)
    label[::7] = np.nan
    table.obs["label"] = pd.Categorical(label)
    ct.tl.embed(sd, model)
    ct.tl.predict_expression(sd, model, dihedral=False)
    ct.tl.score_expression(sd, model=model)
    return model, sd


def _save(fig, tmp_path: Path, name: str) -> Path:
    """Write the figure into pytest's tmp_path (and into $COMTIP_PNG_DIR when set); check the file."""
    path = tmp_path / f"{name}.png"
    fig.savefig(path, dpi=100)
    assert path.stat().st_size > 10_000
    if os.environ.get("COMTIP_PNG_DIR"):
        out = Path(os.environ["COMTIP_PNG_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        fig.savefig(out / f"{name}.png", dpi=100)
    return path


def _maps(fig, gene_index: int, n: int = 5):
    """The axes of one gene block: measured map, predicted map, colour bar, scatter (and the predicted colour bar)."""
    return fig.axes[n * gene_index : n * gene_index + 4]


def _spot_values(ax) -> np.ndarray:
    from matplotlib.collections import EllipseCollection

    (coll,) = [c for c in ax.collections if isinstance(c, EllipseCollection)]
    return np.asarray(coll.get_array()), coll


# --- predicted_vs_measured ------------------------------------------------------------------------------------------
def test_predicted_vs_measured_maps_scale_and_scatter(results, tmp_path):
    _, sd = results
    table = sd.tables["table"]
    keys_before = (set(table.obsm), set(table.layers), set(table.var.columns), set(table.uns["comtip"]))
    fig = ct.pl.predicted_vs_measured(sd, genes=GENES, pred_scale="shared")
    assert isinstance(fig, plt.Figure)
    assert len(fig.axes) == 4 * len(GENES)
    rows = np.flatnonzero(table.obs["section"] == "S1")  # section=None: the first section
    measured = log_normalized(table[rows], genes=GENES).toarray()
    for i, gene in enumerate(GENES):
        ax_m, ax_p, cax, ax_s = _maps(fig, i, n=4)
        r = table.var.loc[gene, "comtip_pearson"]
        assert ax_m.get_title() == f"{gene} measured"
        assert ax_p.get_title() == f"{gene} predicted, r = {r:.2f}"
        assert len(ax_m.images) == 1 and len(ax_p.images) == 1  # the H&E under both maps
        vm, cm = _spot_values(ax_m)
        vp, cp = _spot_values(ax_p)
        np.testing.assert_allclose(vm, measured[:, i], rtol=1e-5)
        np.testing.assert_allclose(vp, table.layers["comtip_pred"][rows, table.var_names.get_loc(gene)], rtol=1e-5)
        # one colour scale per gene, shared by both maps and the colour bar
        assert (cm.norm.vmin, cm.norm.vmax) == (cp.norm.vmin, cp.norm.vmax)
        assert cm.norm.vmin < cm.norm.vmax
        assert cax.get_ylim() == pytest.approx((cm.norm.vmin, cm.norm.vmax))
        # spots lie inside the axes' view and are drawn at their physical size (40 µm at 1 µm/px: radius 20 px)
        x0, x1 = ax_m.get_xlim()
        y1, y0 = ax_m.get_ylim()
        off = cm.get_offsets()
        assert (off[:, 0] > x0).all() and (off[:, 0] < x1).all() and (off[:, 1] > y0).all() and (off[:, 1] < y1).all()
        # scatter: one point per spot of the section, r of those spots in the title
        (pts,) = ax_s.collections
        assert len(pts.get_offsets()) == len(rows)
        r_sec = np.corrcoef(measured[:, i], vp)[0, 1]
        assert ax_s.get_title() == f"S1: r = {r_sec:.2f}, n = {len(rows)}"
        assert {t.get_text().split(" (")[0] for t in ax_s.get_legend().get_texts()} == {"identity", "trend"}
    assert "Section S1" in fig.get_suptitle()
    # nothing written into the user's data
    assert keys_before == (set(table.obsm), set(table.layers), set(table.var.columns), set(table.uns["comtip"]))
    _save(fig, tmp_path, "predicted_vs_measured_synthetic")


def test_predicted_vs_measured_own_scale_for_predictions(results):
    """By default the predicted map has its own colour scale and bar, so that compressed predictions show a pattern."""
    _, sd = results
    table = sd.tables["table"]
    rows = np.flatnonzero(table.obs["section"] == "S1")
    measured = log_normalized(table[rows], genes=GENES).toarray()
    fig = ct.pl.predicted_vs_measured(sd, genes=GENES)
    assert len(fig.axes) == 5 * len(GENES)
    for i, gene in enumerate(GENES):
        ax_m, ax_p, cax, ax_s, cax_p = fig.axes[5 * i : 5 * i + 5]
        assert ax_p.get_title().startswith(f"{gene} predicted, r = ")
        _, cm = _spot_values(ax_m)
        vp, cp = _spot_values(ax_p)
        assert (cm.norm.vmin, cm.norm.vmax) == pytest.approx(tuple(np.percentile(measured[:, i], [1, 99])))
        assert (cp.norm.vmin, cp.norm.vmax) == pytest.approx(tuple(np.percentile(vp, [1, 99])))
        assert cax.get_ylim() == pytest.approx((cm.norm.vmin, cm.norm.vmax))
        assert cax_p.get_ylim() == pytest.approx((cp.norm.vmin, cp.norm.vmax))
        assert "predicted" in cax_p.get_ylabel() and "measured" in cax.get_ylabel()
        # the scatter keeps the true values of both
        np.testing.assert_allclose(ax_s.collections[0].get_offsets()[:, 0], measured[:, i], rtol=1e-5)
    with pytest.raises(ValueError, match="pred_scale"):
        ct.pl.predicted_vs_measured(sd, genes=GENES, pred_scale="log")
    plt.close("all")


def test_predicted_vs_measured_section_spot_size_and_save(results, tmp_path):
    _, sd = results
    path = tmp_path / "sub" / "pvm"
    fig = ct.pl.predicted_vs_measured(sd, "GAPDH", section="S3", spot_size=20, ncols=2, save=path)
    assert (tmp_path / "sub" / "pvm.png").stat().st_size > 10_000
    assert len(fig.axes) == 5
    ax_m, ax_p, _, ax_s, _ = fig.axes
    assert ax_s.get_title().startswith("S3: r = ") and ax_s.get_title().endswith("n = 36")
    _, coll = _spot_values(ax_m)
    # spot_size is a diameter in µm; the synthetic image is 1 µm/px, read at full resolution
    np.testing.assert_allclose(coll.get_widths(), 20)
    _, coll = _spot_values(ax_p)
    np.testing.assert_allclose(coll.get_heights(), 20)


def test_predicted_vs_measured_errors(results, sdata_factory):
    _, sd = results
    fresh = sdata_factory(sections=("Q1",))
    with pytest.raises(KeyError, match=r"comtip_pred.*ct\.tl\.predict_expression"):
        ct.pl.predicted_vs_measured(fresh, genes=["ERBB2"])
    with pytest.raises(KeyError, match="not in var_names"):
        ct.pl.predicted_vs_measured(sd, genes=["NOTAGENE"])
    with pytest.raises(ValueError, match="Unknown section 'S9'"):
        ct.pl.predicted_vs_measured(sd, genes=["ERBB2"], section="S9")
    adata = sd.tables["table"].copy()
    adata.layers["comtip_pred"][:, adata.var_names.get_loc("KRT19")] = np.nan
    adata.uns["spatial"] = {}
    with pytest.raises(ValueError, match=r"KRT19.*no prediction.*ct\.tl\.predict_expression"):
        ct.pl.predicted_vs_measured(adata, genes=["ERBB2", "KRT19"])


def _visium_anndata(sd, section: str = "S1", scalef: float = 0.5) -> ad.AnnData:
    """The spots of one synthetic section in scanpy's Visium layout: obsm['spatial'] and a downsampled hires image."""
    from PIL import Image

    from comtip._images import level_arrays

    table = sd.tables["table"]
    rows = np.flatnonzero(table.obs["section"] == section)
    adata = table[rows].copy()
    del adata.uns["spatialdata_attrs"]
    shapes = sd.shapes[f"{section}_spots"]
    ids = adata.obs["spot_id"].to_numpy()
    adata.obsm["spatial"] = np.column_stack([shapes.geometry.x.to_numpy()[ids], shapes.geometry.y.to_numpy()[ids]])
    img = np.asarray(level_arrays(sd.images[f"{section}_he"])[0].data).transpose(1, 2, 0)
    h, w = img.shape[:2]
    hires = np.asarray(Image.fromarray(img).resize((round(w * scalef), round(h * scalef)))) / 255.0
    adata.uns["spatial"] = {
        section: {
            "images": {"hires": hires.astype(np.float32)},
            "scalefactors": {"tissue_hires_scalef": scalef, "spot_diameter_fullres": 40.0},
        }
    }
    return adata


def test_predicted_vs_measured_anndata(results, tmp_path):
    _, sd = results
    adata = _visium_anndata(sd)
    del adata.var["comtip_pearson"]  # r is then computed from the section's spots
    fig = ct.pl.predicted_vs_measured(adata, genes=GENES)
    assert len(fig.axes) == 10
    measured = log_normalized(adata, genes=GENES).toarray()
    for i, gene in enumerate(GENES):
        ax_m, ax_p, _, ax_s = _maps(fig, i)
        pred = adata.layers["comtip_pred"][:, adata.var_names.get_loc(gene)]
        r = np.corrcoef(measured[:, i], pred)[0, 1]
        assert ax_p.get_title() == f"{gene} predicted, r = {r:.2f}"
        assert len(ax_m.images) == 1
        img = ax_m.images[0].get_array()
        assert img.shape[1] <= 210  # a crop of the hires image: half the 420 px of the full resolution
        _, coll = _spot_values(ax_m)
        # spots in hires pixels: full-resolution positions x scale factor (up to the crop's origin)
        off, full = coll.get_offsets(), adata.obsm["spatial"]
        np.testing.assert_allclose(off - off[0], (full - full[0]) * 0.5, atol=1e-6)
        np.testing.assert_allclose(coll.get_widths(), 40 * 0.5)  # spot_diameter_fullres x scale factor
        assert len(ax_s.collections[0].get_offsets()) == adata.n_obs
    _save(fig, tmp_path, "predicted_vs_measured_anndata")


@pytest.mark.realdata
def test_predicted_vs_measured_her2st_tiny(data_dir, tmp_path):
    """Real H&E: fake predictions (measured x 0.5 + noise) drawn on the tissue of the HER2ST C2 crop."""
    sd = ct.datasets.her2st_tiny(data_dir=data_dir)
    table = sd.tables["table"]
    rng = np.random.default_rng(0)
    X = log_normalized(table).toarray()
    table.layers["comtip_pred"] = (0.5 * X + rng.normal(0, 0.5, X.shape)).astype(np.float32)
    fig = ct.pl.predicted_vs_measured(sd, genes=["ERBB2", "KRT19", "IGKC"])
    assert len(fig.axes) == 15
    ax_m = fig.axes[0]
    img = ax_m.images[0].get_array()
    assert 500 < img.shape[1] <= 2100
    # the crop is real tissue, not blank
    assert np.asarray(img).std() > 10
    _, coll = _spot_values(ax_m)
    assert len(coll.get_offsets()) == 49
    # a 100 µm spot at ≈ 1.376 µm/px is ≈ 73 px wide in the full-resolution crop
    h, w = img.shape[:2]
    np.testing.assert_allclose(coll.get_widths(), 100 / 1.376, rtol=0.05)
    assert (coll.get_offsets()[:, 0] < w).all() and (coll.get_offsets()[:, 1] < h).all()
    assert fig.axes[3].get_title().endswith("n = 49")  # the scatter
    _save(fig, tmp_path, "predicted_vs_measured_her2st_tiny")


@pytest.mark.realdata
def test_predicted_vs_measured_visium_log1p_anndata(data_dir, tmp_path):
    """An AnnData read with scanpy (X already log1p, said by uns['comtip_input']); its lowres H&E is drawn."""
    a = ad.read_h5ad(data_dir / "visium_mouse_brain_crop" / "test_data.h5ad")
    a.uns["comtip_input"] = {"x_is_counts": False, "x_transform": "log1p"}
    X = a.X.toarray() if hasattr(a.X, "toarray") else np.asarray(a.X)
    a.layers["comtip_pred"] = (X + np.random.default_rng(0).normal(0, 0.3, X.shape)).astype(np.float32)
    genes = list(a.var_names[np.argsort(-X.var(axis=0))[:2]])
    fig = ct.pl.predicted_vs_measured(a, genes=genes)
    vm, _ = _spot_values(fig.axes[0])
    np.testing.assert_allclose(vm, X[:, a.var_names.get_loc(genes[0])], rtol=1e-5)  # X is not normalised again
    assert len(fig.axes[0].images) == 1  # the lowres image (the hires one of this fixture is noise)
    _save(fig, tmp_path, "predicted_vs_measured_visium")


# --- gene_scores ----------------------------------------------------------------------------------------------------
def test_gene_scores(results, tmp_path):
    _, sd = results
    table = sd.tables["table"]
    fig = ct.pl.gene_scores(sd, n_top=5)
    assert len(fig.axes) == 2
    ax_r, ax_g = fig.axes
    r = table.var["comtip_pearson"].dropna().sort_values(ascending=False)
    np.testing.assert_allclose(ax_r.lines[0].get_ydata(), r.to_numpy())
    names = [t.get_text() for t in ax_g.get_yticklabels()]
    ticks = ax_g.get_yticks()
    shown = [n for _, n in sorted(zip(ticks, names, strict=True), reverse=True)]  # top of the axes first
    assert shown == list(r.index[:5]) + list(r.index[-5:])
    assert ax_g.get_title() == f"top and bottom 5 of {len(r)} genes"
    legend = [t.get_text() for t in ax_r.get_legend().get_texts()]
    mean_all = table.uns["comtip"]["score_expression"]["all"]["pearson"]
    assert f"all mean {mean_all:.3f} (n = {len(r)})" in legend
    assert any(t.startswith("hvg50 mean") for t in legend)
    _save(fig, tmp_path, "gene_scores")


def test_gene_scores_panel_and_errors(results, sdata_factory):
    _, sd = results
    fig = ct.pl.gene_scores(sd, key="comtip_pearson_adj", panel=GENES + ["GAPDH"], n_top=20)
    assert len(fig.axes[1].get_yticklabels()) == 3
    assert fig.axes[1].get_title() == "all 3 genes"
    with pytest.raises(KeyError, match=r"comtip_pearson.*ct\.tl\.score_expression"):
        ct.pl.gene_scores(sdata_factory(sections=("Q1",)))


# --- training_curves ------------------------------------------------------------------------------------------------
def test_training_curves(results, tmp_path):
    model, _ = results
    fig = ct.pl.training_curves(model)
    parts = list(dict.fromkeys(k[6:] for h in model.history for k in h if k.startswith("train_")))
    assert "readout" in parts  # the read-out stage's own loss (readout_loss="mse"), in its own panel
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == "loss"
    assert set(titles[:-1]) == set(parts)
    assert titles[-1] == "validation metrics"
    ax_loss = fig.axes[0]
    labels = [line.get_label() for line in ax_loss.lines]
    assert labels[:2] == ["train", "val"]
    np.testing.assert_allclose(ax_loss.lines[0].get_ydata(), [h["train_loss"] for h in model.history])
    # the read-out refit (last stage) has no validation
    np.testing.assert_allclose(ax_loss.lines[1].get_ydata(), [h["val_loss"] for h in model.history if "val_loss" in h])
    metric_labels = {line.get_label() for line in fig.axes[-1].lines}
    assert {"val recall5", "val pcc", "val pcc_adj"} <= metric_labels
    # the kept epoch (the last stage's; without validation its last epoch) is marked in every panel, at its place
    last = model.training_summary["stages"][-1]
    assert last["stage"] == "readout_refit" and "best_epoch" not in last
    best = len(model.history) - 1
    for ax in fig.axes:
        assert any(line.get_linestyle() == ":" and line.get_xdata()[0] == best for line in ax.lines), ax.get_title()
    _save(fig, tmp_path, "training_curves")


def test_training_curves_stages_and_errors():
    history = [
        {"stage": "genes", "epoch": e, "train_loss": 3.0 - e, "val_loss": 3.2 - e, "train_mvm": 1.0 / (e + 1)}
        for e in range(2)
    ] + [
        {"stage": "contrastive", "epoch": e, "train_loss": 2.0 - 0.1 * e, "val_loss": 2.1 - 0.1 * e, "val_pcc": 0.1 * e}
        for e in range(3)
    ]
    fig = ct.pl.training_curves(history, parts=["loss"])
    assert [ax.get_title() for ax in fig.axes] == ["loss", "validation metrics"]
    np.testing.assert_array_equal(fig.axes[0].lines[0].get_xdata(), [0, 1, 2, 3, 4])  # epochs counted on
    with pytest.raises(ValueError, match=r"no training history.*ct\.tl\.pretrain"):
        ct.pl.training_curves([])
    with pytest.raises(ValueError, match="not in the history"):
        ct.pl.training_curves(history, parts=["nope"])


# --- embedding ------------------------------------------------------------------------------------------------------
def test_embedding_joint(results, tmp_path):
    _, sd = results
    table = sd.tables["table"]
    adata = table.copy()
    adata.obsm["X_comtip_gene"][:5] = np.nan  # spots without a gene embedding are left out
    before = {k: v.copy() for k, v in adata.obsm.items()}
    fig = ct.pl.embedding(adata)
    assert [ax.get_title() for ax in fig.axes] == ["modality", "section", "label"]
    n = 2 * adata.n_obs - 5
    for ax in fig.axes:
        assert sum(len(c.get_offsets()) for c in ax.collections) == n
    legend = {t.get_text() for t in fig.axes[2].get_legend().get_texts()}
    assert {"tumour", "stroma", "NA", "image", "gene"} <= legend
    assert set(adata.obsm) == set(before) and "X_umap" not in adata.obsm and "neighbors" not in adata.uns
    np.testing.assert_array_equal(adata.obsm["X_comtip_image"], before["X_comtip_image"])
    _save(fig, tmp_path, "embedding_joint")


def test_embedding_separate_and_errors(results, sdata_factory, tmp_path):
    _, sd = results
    fig = ct.pl.embedding(sd, basis="X_comtip_image", color="section", joint=False)
    assert [ax.get_title() for ax in fig.axes] == ["X_comtip_image: section"]
    assert len(fig.axes[0].collections[0].get_offsets()) == sd.tables["table"].n_obs
    _save(fig, tmp_path, "embedding_image")
    with pytest.raises(KeyError, match=r"X_comtip_image.*ct\.tl\.embed"):
        ct.pl.embedding(sdata_factory(sections=("Q1",)))
    with pytest.raises(KeyError, match="not in obs"):
        ct.pl.embedding(sd, color="nope")
