"""Repeated work gives the same result: the same seed the same model, the same model the same embeddings; and
everything a model writes records which model (weights checksum) wrote it."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

import comtip as ct


def _pretrain(sdata, seed: int) -> ct.CoMTIP:
    return ct.tl.pretrain(
        sdata,
        config=ct.CoMTIPConfig.tiny(),
        validation=None,
        max_epochs=1,
        readout_epochs=1,
        batch_size=16,
        n_genes=30,
        accelerator="cpu",
        seed=seed,
    )


@pytest.fixture(scope="module")
def two_runs():
    """Two tiny pretrainings with seed 0 and one with seed 1, on the same synthetic sections (CPU)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_sdata

    ct.settings.show_progress_bar = False
    sdata = make_sdata(sections=("S1", "S2"))
    ct.pp.spot_tiles(sdata, tile_size_um=40, tile_size_px=64)
    runs = [_pretrain(sdata, 0), _pretrain(sdata, 0), _pretrain(sdata, 1)]
    return runs, sdata


def test_same_seed_gives_the_same_weights(two_runs):
    (a, b, other), _ = two_runs
    assert a.weights_checksum() == b.weights_checksum()
    untimed = [[{k: v for k, v in h.items() if not k.endswith("_s")} for h in m.history] for m in (a, b)]
    assert untimed[0] == untimed[1]  # every loss part of every epoch
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        assert np.array_equal(state_a[k].numpy(), state_b[k].numpy()), k
    assert other.weights_checksum() != a.weights_checksum()  # the seed matters, so the check above is not vacuous


def test_same_seed_gives_the_same_embeddings(two_runs, test_sdata):
    (a, b, other), _ = two_runs
    first, second, third = (copy.deepcopy(test_sdata) for _ in range(3))
    ct.tl.embed(first, a)
    ct.tl.embed(second, b)
    ct.tl.embed(third, other)
    for key in ("X_comtip_image", "X_comtip_gene"):
        x, y = first.tables["table"].obsm[key], second.tables["table"].obsm[key]
        np.testing.assert_array_equal(x, y)
        assert not np.array_equal(x, third.tables["table"].obsm[key])


@pytest.mark.parametrize("dihedral", [False, True])
def test_embed_twice_is_identical(trained, test_sdata, dihedral):
    model = copy.deepcopy(trained[0])
    table = test_sdata.tables["table"]
    ct.tl.embed(test_sdata, model, dihedral=dihedral)
    first = {k: table.obsm[k].copy() for k in ("X_comtip_image", "X_comtip_gene")}
    ct.tl.embed(test_sdata, model, dihedral=dihedral, overwrite=True)
    other = copy.deepcopy(test_sdata)
    del other.tables["table"].obsm["X_comtip_image"], other.tables["table"].obsm["X_comtip_gene"]
    ct.tl.embed(other, model, dihedral=dihedral)
    for k, v in first.items():
        np.testing.assert_array_equal(table.obsm[k], v)
        np.testing.assert_array_equal(other.tables["table"].obsm[k], v)
    assert model.weights_checksum() == trained[0].weights_checksum()  # inference leaves the model as it was


def test_predict_twice_is_identical(trained, test_sdata):
    model = copy.deepcopy(trained[0])
    other = copy.deepcopy(test_sdata)
    ct.tl.predict_expression(
        test_sdata, model, genes=["ERBB2", "KRT19", "NOT_IN_PANEL"], descriptions={"NOT_IN_PANEL": "a gene"}
    )
    ct.tl.predict_expression(
        other, model, genes=["ERBB2", "KRT19", "NOT_IN_PANEL"], descriptions={"NOT_IN_PANEL": "a gene"}
    )
    a, b = test_sdata.tables["table"], other.tables["table"]
    np.testing.assert_array_equal(a.layers["comtip_pred"], b.layers["comtip_pred"])
    np.testing.assert_array_equal(a.obsm["comtip_pred"].to_numpy(), b.obsm["comtip_pred"].to_numpy())
    assert model.genes == trained[0].genes  # prompting a new gene does not add it to the user's model


def test_everything_the_model_wrote_records_its_checksum(trained, test_sdata, tmp_path):
    model = copy.deepcopy(trained[0])
    model.save(tmp_path / "m")
    loaded = ct.tl.load_model(tmp_path / "m")
    checksum = model.weights_checksum()
    assert loaded.weights_checksum() == checksum
    ct.tl.embed(test_sdata, loaded)
    ct.tl.predict_expression(test_sdata, loaded, dihedral=False)
    ct.tl.score_expression(test_sdata, model=loaded)
    ct.tl.retrieve(test_sdata, loaded)
    uns = test_sdata.tables["table"].uns["comtip"]
    assert set(uns) >= {"embed", "predict_expression", "score_expression", "retrieve"}
    for function, record in uns.items():
        assert record["weights_sha256"] == checksum, function
        assert record["model"] == model.name, function
