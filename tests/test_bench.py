"""The evaluation room, ``ct.bench``: EVAL.md's protocol in one call, its public parts, and ``comtip evaluate``."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest

import comtip as ct


def test_bench_is_public_and_import_comtip_stays_light():
    """``ct.bench`` is reachable from ``import comtip``, which imports no torch; its ImageNet baseline does."""
    code = (
        "import sys, comtip as ct; assert 'bench' in ct.__all__; "
        "assert callable(ct.bench.evaluate) and callable(ct.bench.load_spots); "
        "assert 'torch' not in sys.modules, 'import comtip imported torch'; "
        "ct.bench.ImageNetEncoder; assert 'torch' in sys.modules; "
        "assert set(ct.bench.__all__) <= set(dir(ct.bench))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_evaluate_scores_every_method_on_one_panel(trained, test_sdata):
    """EVAL.md's table in one call: every method scored with the same metrics, baselines with and without averaging."""
    from comtip.bench import METHODS, evaluate

    model, train = trained
    res = evaluate(copy.deepcopy(model), train, test_sdata, batch_size=32)
    assert set(res["methods"]) == {*METHODS, "comtip_zero_shot_shuffled_images"}
    for name, r in res["methods"].items():
        assert {"pcc_hvg50", "pcc_heg250", "pcc_hvg50_adj", "pcc_heg250_adj", "recall_at5"} <= set(r), name
    assert res["methods"]["mean"]["pcc_hvg50"] == 0  # a constant prediction scores 0 by definition
    # the averaged baselines run on other features than the single-view ones
    assert res["methods"]["imagenet_retrieval_dihedral"] != res["methods"]["imagenet_retrieval"]
    # ... computed in one pass over the 8 views: the same figures as each set computed on its own
    for m in ("imagenet_retrieval", "imagenet_probe_dihedral"):
        own = evaluate(model, train, test_sdata, methods=[m], shuffled_control=False, batch_size=32)
        assert own["methods"][m] == pytest.approx(res["methods"][m], abs=1e-4), m
    with pytest.raises(ValueError, match="Unknown methods"):
        evaluate(model, train, test_sdata, methods=["imagenet_probe_flipped"])
    # without test-time averaging, the averaged baselines are not the matching comparison and are left out
    one_view = evaluate(model, train, test_sdata, dihedral=False, shuffled_control=False, batch_size=32)
    assert set(one_view["methods"]) == {m for m in METHODS if not m.endswith("_dihedral")}
    # spatial context (0.5 by default) reaches CoMTIP's and the baselines' features alike
    some = ["comtip_probe", "imagenet_probe"]
    alone = evaluate(model, train, test_sdata, methods=some, spatial_context=0, shuffled_control=False, batch_size=32)
    assert res["spatial_context"] == ct.bench.SPATIAL_CONTEXT == 0.5 and alone["spatial_context"] == 0
    for m in some:
        assert alone["methods"][m]["pcc_hvg50"] != res["methods"][m]["pcc_hvg50"], m
    # the shared-space Recall@5 is that of ct.tl.embed + ct.tl.retrieve
    ct.tl.embed(test_sdata, model, dihedral=True)
    hits = ct.tl.retrieve(test_sdata, query="image", k=5)
    assert res["methods"]["comtip_zero_shot"]["recall_at5"] == pytest.approx(hits["hit"].mean(), abs=1e-4)


def test_evaluate_recall_ranks_each_spots_own_image_embedding(trained, test_sdata, monkeypatch):
    """Spatial context mixes the embeddings that predict, not the one that Recall@5 ranks (as ct.tl.retrieve)."""
    import comtip.tl._embed as embed_module

    model, train = trained
    genes = ct.bench.embed_gene_sentences(model, test_sdata.tables["table"])
    real = embed_module.image_embeddings

    def aligned(model, spots, names, **kw):  # a perfectly aligned model on the evaluation spots: Recall@5 = 1
        out = real(model, spots, names, **kw)
        if len(names) == len(genes):
            mixed = ct.bench.with_spatial_context({"image": genes}, spots, names, kw.get("spatial_context", 0))
            out["image"] = mixed["image"]
        return out

    monkeypatch.setattr(embed_module, "image_embeddings", aligned)
    for w in (0, 0.5):
        res = ct.bench.evaluate(
            model, train, test_sdata, methods=["comtip_zero_shot"], spatial_context=w, batch_size=32
        )
        assert res["methods"]["comtip_zero_shot"]["recall_at5"] == 1.0, w
    # the neighbours' mean alone would find mostly the neighbours
    mixed = ct.bench.with_spatial_context({"image": genes}, *ct.bench.load_spots(test_sdata), 1.0)
    assert ct.bench.recall_at_k(mixed["image"], genes, 5) < 1.0


def test_bench_parts_rebuild_a_row_of_evaluate(trained, test_sdata):
    """The public parts (spots, panels, ImageNet features, reference method, metrics) give evaluate's own figures."""
    model, train = trained
    kw = {"methods": ["imagenet_probe"], "shuffled_control": False, "spatial_context": 0, "batch_size": 32}
    res = ct.bench.evaluate(model, train, test_sdata, **kw)
    (tr_spots, tr_names), (te_spots, te_names) = ct.bench.load_spots(train), ct.bench.load_spots(test_sdata)
    assert len(te_names) == res["n_eval_spots"] and len(tr_names) == res["n_train_spots"]
    tr_tab, te_tab = tr_spots.table[tr_names], te_spots.table[te_names]
    panels = ct.bench.eval_panels(tr_tab)
    genes = list(dict.fromkeys(panels["hvg50"] + panels["heg250"]))
    idx = {p: np.array([genes.index(g) for g in panels[p]]) for p in ("hvg50", "heg250")}
    y_tr = ct.pp.log_normalized(tr_tab, genes=genes).toarray().astype(np.float64)
    y_te = ct.pp.log_normalized(te_tab, genes=genes).toarray().astype(np.float64)
    f_tr = ct.bench.imagenet_features(tr_spots, tr_names, batch_size=32)
    f_te = ct.bench.imagenet_features(te_spots, te_names, batch_size=32)
    assert f_tr.shape == (len(tr_names), 1280)
    pred = ct.bench.reference_predict("imagenet_probe", f_tr, y_tr, f_te, idx, genes)
    row = ct.bench.panel_metrics(pred, y_te, ct.pp.log_depth(te_tab), idx)
    mu, sd = y_tr.mean(0), y_tr.std(0)
    sd[sd == 0] = 1.0
    row["recall_at5"] = ct.bench.profile_recall(pred, y_te, mu, sd)
    assert {k: round(v, 4) for k, v in row.items()} == res["methods"]["imagenet_probe"]


def test_cli_evaluate_is_bench_evaluate(trained, test_sdata, tmp_path, monkeypatch, capsys):
    """``comtip evaluate`` runs ct.bench.evaluate: the same call, and the JSON it writes is that call's result."""
    from comtip.cli import main

    model, train = trained
    model.save(tmp_path / "model")
    sections = {("S1", "S2", "S3"): train, ("T1",): test_sdata}
    monkeypatch.setattr(ct.datasets, "her2st", lambda names, data_dir=None: sections[tuple(names)])
    calls = []
    real = ct.bench.evaluate

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ct.bench, "evaluate", spy)
    out = tmp_path / "scores.json"
    args = ["--model", str(tmp_path / "model"), "--train", "S1", "S2", "S3", "--eval", "T1", "--no-dihedral"]
    main(["-q", "evaluate", *args, "--json", str(out)])
    assert calls == [{"dihedral": False, "spatial_context": ct.bench.SPATIAL_CONTEXT}]
    written = json.loads(out.read_text())
    assert written["train"] == ["S1", "S2", "S3"] and written["eval"] == ["T1"]
    direct = real(ct.tl.load_model(tmp_path / "model"), train, test_sdata, dihedral=False)
    assert written["methods"].keys() == direct["methods"].keys()
    for name, row in direct["methods"].items():  # the same figures (NaN where evaluate gives NaN)
        assert written["methods"][name] == pytest.approx(row, rel=0, abs=0, nan_ok=True), name
    assert written["panels"] == direct["panels"]
    printed = capsys.readouterr().out
    assert all(name in printed for name in direct["methods"])
