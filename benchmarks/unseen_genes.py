"""Genes never seen in training: zero-shot from their descriptions, against a copy-the-nearest-gene baseline.

EVAL.md's 50 HVG panel genes (from the training sections C2–C5) are split into 5 folds of 10 (seeded). Per fold, the
fold's genes are removed from the training table entirely (counts, and so sentences, panel and value levels), CoMTIP
is pretrained on C2–C5 as ``make demo`` does (CPU preset, 20 + 30 epochs, batch 32, seed 0), and the fold's genes
are predicted on C6 (``ct.tl.predict_expression``, zero-shot, its defaults: 8 flips/rotations, spatial context 0.5).
Rows, per-gene Pearson r and depth-controlled r (EVAL.md), means over the 50 genes:

1. ``unseen_own_description``: each held-out gene prompted with its own description (as a user calls it);
2. ``unseen_wrong_description``: each prompted with the description of an unrelated gene (a seeded draw from the
   olfactory and bitter-taste receptors, which breast tissue does not express), as in tutorial 2;
3. ``nearest_trained_gene``: the zero-shot prediction of the fold model's panel gene whose description embedding is
   nearest (cosine) — the cheap trick a text-conditioned model has to beat;
4. ``seen``: the same genes' zero-shot figures from the model trained with them (``make demo``'s model; pass it with
   ``--seen-model`` or let the script train it);
5. ``imagenet_probe``: EVAL.md's ridge probe on frozen ImageNet features, fitted to the genes' training expression
   (with the same spatial context), for reference.

Usage: python benchmarks/unseen_genes.py [--data-dir D] [--seen-model demo_out/model] [--models DIR] [--json OUT]
(``--models DIR`` keeps the trained models, so that a rerun only predicts; ``--offset-dropout P`` trains every model
with ``CoMTIPConfig.gene_offset_dropout=P``.)
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit, machine, peak_rss_mb

TRAIN, TEST = ["C2", "C3", "C4", "C5"], ["C6"]
ROWS = ["unseen_own_description", "unseen_wrong_description", "nearest_trained_gene", "seen", "imagenet_probe"]


def _scores(pred: np.ndarray, true: np.ndarray, depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from comtip.bench import pearson_depth_adjusted, pearson_per_gene

    return pearson_per_gene(pred, true), pearson_depth_adjusted(pred, true, depth)


def _predict(test, model, genes: list[str], descriptions=None) -> np.ndarray:
    """Zero-shot predictions (spots x genes) on ``test``, as ``ct.tl.predict_expression`` writes them."""
    import comtip as ct

    ct.tl.predict_expression(
        test, model, genes=genes, descriptions=descriptions, key_added="bench_pred", overwrite=True
    )
    table = test.tables["table"]
    cols = [table.var_names.get_loc(g) for g in genes]
    out = np.asarray(table.layers["bench_pred"][:, cols], dtype=np.float64)
    del table.layers["bench_pred"]
    return out


def description_similarity(model, genes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The text embeddings of the genes' own descriptions, and their cosine similarity (genes x panel) to the
    descriptions of the model's panel genes (the frozen embeddings the model holds)."""
    import comtip as ct

    text = ct.pp.gene_text_embeddings(genes, fallback=True)  # "<GENE>: gene." where the table has none
    panel = model.gene_encoder.text_emb.cpu().numpy()
    sim = (text / np.linalg.norm(text, axis=1, keepdims=True)) @ (
        panel / np.linalg.norm(panel, axis=1, keepdims=True)
    ).T
    return text, sim


def _pretrain(train, a):
    import comtip as ct
    from comtip.bench import DEMO_PRETRAIN, demo_config

    kwargs = dict(DEMO_PRETRAIN)
    if a.max_epochs is not None:
        kwargs["max_epochs"] = a.max_epochs
    if a.readout_epochs is not None:
        kwargs["readout_epochs"] = a.readout_epochs
    config = dataclasses.replace(demo_config(), gene_offset_dropout=a.offset_dropout)
    return ct.tl.pretrain(train, config=config, seed=a.seed, **kwargs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("COMTIP_DATA_DIR"))
    ap.add_argument("--seen-model", default=None, help="the model trained with every gene (make demo's demo_out/model)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-epochs", type=int, default=None, help="contrastive epochs (default: the demo's)")
    ap.add_argument("--readout-epochs", type=int, default=None, help="read-out epochs (default: the demo's)")
    ap.add_argument(
        "--offset-dropout", type=float, default=0.0, help="train with CoMTIPConfig.gene_offset_dropout (default 0)"
    )
    ap.add_argument("--only-folds", type=int, nargs="+", default=None, help="run these folds only (merge later)")
    ap.add_argument(
        "--models", default=None, help="folder for the fold models: saved there after training, loaded when present"
    )
    ap.add_argument("--json", default=None)
    ap.add_argument("--merge", nargs="+", default=None, help="pool the JSONs of runs over different folds")
    ap.add_argument("--table", nargs="+", default=None, help="print the Markdown table of these result JSONs")
    a = ap.parse_args()
    if a.table:
        print(table(a.table))
        return
    if a.merge:
        merge(a.merge, a.json)
        return

    import torch

    import comtip as ct
    from comtip.bench import SPATIAL_CONTEXT, imagenet_features, load_spots, reference_predict
    from comtip.pp import gene_text_table

    torch.set_num_threads(os.cpu_count() or 1)
    ct.settings.show_progress_bar = False
    t_start = time.perf_counter()
    train = ct.datasets.her2st(TRAIN, data_dir=a.data_dir)
    test = ct.datasets.her2st(TEST, data_dir=a.data_dir)
    ct.pp.spot_tiles(train)
    ct.pp.spot_tiles(test)
    full = train.tables["table"]
    hvg = ct.pp.eval_panels(full)["hvg50"]
    rng = np.random.default_rng(a.seed)
    order = list(rng.permutation(hvg))
    folds = [sorted(map(str, order[i :: a.folds])) for i in range(a.folds)]
    te_tab = test.tables["table"]
    true = ct.pp.log_normalized(te_tab, genes=hvg).toarray().astype(np.float64)
    depth = ct.pp.log_depth(te_tab)
    col = {g: i for i, g in enumerate(hvg)}

    # unrelated descriptions for the control: receptors of smell and bitter taste
    text = gene_text_table()
    pool = sorted(g for g in text.index if re.match(r"^(OR\d|TAS2R)", g) and g not in set(full.var_names))
    wrong = dict(zip(hvg, np.random.default_rng(a.seed + 1).choice(pool, len(hvg), replace=False), strict=True))
    wrong_text = {g: str(text.loc[w, "description"]) for g, w in wrong.items()}

    preds = {r: np.full_like(true, np.nan) for r in ROWS}
    fold_info = []
    # 4. seen: the model trained with every gene
    t = time.perf_counter()
    seen_dir = Path(a.models) / "seen" if a.models else None
    if a.seen_model:
        seen = ct.CoMTIP.load(a.seen_model)
    elif seen_dir is not None and seen_dir.exists():
        seen = ct.CoMTIP.load(seen_dir)
    else:
        seen = _pretrain(train, a)
        if seen_dir is not None:
            seen.save(seen_dir)
    preds["seen"][:] = _predict(test, seen, hvg)
    seen_in_panel = [g for g in hvg if g in set(seen.genes)]
    seen_s = time.perf_counter() - t
    # 5. the ImageNet probe on the same genes
    t = time.perf_counter()
    tr_spots, tr_names = load_spots(train)
    te_spots, te_names = load_spots(test)
    if list(te_names) != list(te_tab.obs_names):
        msg = "C6 spots without a tile: the benchmark assumes every spot is tiled"
        raise SystemExit(msg)
    kw = {"batch_size": 64, "device": None, "dihedral": False, "spatial_context": SPATIAL_CONTEXT}
    f_tr = imagenet_features(tr_spots, tr_names, **kw)
    f_te = imagenet_features(te_spots, te_names, **kw)
    y_tr = ct.pp.log_normalized(full[tr_names], genes=hvg).toarray().astype(np.float64)
    preds["imagenet_probe"][:] = reference_predict(
        "imagenet_probe", f_tr, y_tr, f_te, {"hvg50": np.arange(len(hvg))}, hvg
    )
    imagenet_s = time.perf_counter() - t

    fold_ids = a.only_folds if a.only_folds is not None else range(a.folds)
    for k in fold_ids:
        genes = folds[k]
        t = time.perf_counter()
        fold_dir = Path(a.models) / f"fold{k}" if a.models else None
        if fold_dir is not None and fold_dir.exists():
            model = ct.CoMTIP.load(fold_dir)
        else:
            train.tables["table"] = full[:, [g for g in full.var_names if g not in set(genes)]].copy()
            try:
                model = _pretrain(train, a)
            finally:
                train.tables["table"] = full
            if fold_dir is not None:
                model.save(fold_dir)
        assert not set(genes) & set(model.genes)
        cols = [col[g] for g in genes]
        own_text = dict(ct.pp.gene_text(genes, fallback=True))  # "<GENE>: gene." where the table has none
        preds["unseen_own_description"][:, cols] = _predict(test, model, genes, descriptions=own_text)
        preds["unseen_wrong_description"][:, cols] = _predict(test, model, genes, descriptions=wrong_text)
        # the nearest panel gene by description, and its zero-shot prediction
        _, sim = description_similarity(model, genes)
        nearest = [model.genes[i] for i in sim.argmax(1)]
        uniq = list(dict.fromkeys(nearest))
        p_near = _predict(test, model, uniq)
        preds["nearest_trained_gene"][:, cols] = p_near[:, [uniq.index(h) for h in nearest]]
        fold_info.append(
            {
                "fold": k,
                "genes": genes,
                "nearest_trained_gene": dict(zip(genes, nearest, strict=True)),
                "wrong_description_of": {g: str(wrong[g]) for g in genes},
                "train_s": round(model.training_summary["wall_s"], 1),
                "wall_s": round(time.perf_counter() - t, 1),
            }
        )
        print(f"fold {k}: {genes} in {fold_info[-1]['wall_s']} s", file=sys.stderr)
        if a.json:  # a crash later on keeps the folds done so far
            partial = _result(a, preds, fold_info, true, depth, col, wrong, seen_in_panel, seen_s, imagenet_s, t_start)
            Path(a.json).write_text(json.dumps(partial, indent=2, default=float) + "\n")

    emit(_result(a, preds, fold_info, true, depth, col, wrong, seen_in_panel, seen_s, imagenet_s, t_start), a.json)


def _rows(per_gene: dict, genes: list[str]) -> dict:
    return {
        r: {
            "pcc": round(float(np.mean([per_gene[r]["pcc"][g] for g in genes])), 4),
            "pcc_adj": round(float(np.mean([per_gene[r]["pcc_adj"][g] for g in genes])), 4),
            "n_genes": len(genes),
        }
        for r in ROWS
    }


def _summary(result: dict) -> dict:
    """Means over the genes of the folds done, per fold and in all, from the per-gene figures."""
    per_gene = result["per_gene"]
    done = [g for f in result["folds"] for g in f["genes"]]
    result["rows"] = _rows(per_gene, done)
    for f in result["folds"]:
        f["rows"] = _rows(per_gene, f["genes"])
    own, near = per_gene["unseen_own_description"]["pcc_adj"], per_gene["nearest_trained_gene"]["pcc_adj"]
    result["own_beats_nearest_adj"] = {
        "mean_difference": round(float(np.mean([own[g] - near[g] for g in done])), 4),
        "genes_where_own_is_higher": int(sum(own[g] > near[g] for g in done)),
        "n_genes": len(done),
    }
    result["complete"] = len(done) == 50
    return result


def _result(a, preds, fold_info, true, depth, col, wrong, seen_in_panel, seen_s, imagenet_s, t_start) -> dict:
    done = [g for f in fold_info for g in f["genes"]]
    per_gene = {}
    for r in ROWS:
        pcc, adj = _scores(preds[r][:, [col[g] for g in done]], true[:, [col[g] for g in done]], depth)
        per_gene[r] = {
            "pcc": dict(zip(done, map(float, pcc), strict=True)),
            "pcc_adj": dict(zip(done, map(float, adj), strict=True)),
        }
    result = {
        "benchmark": "unseen_genes",
        "machine": machine(),
        "train_sections": TRAIN,
        "eval_sections": TEST,
        "panel": "hvg50 (EVAL.md, from the training sections)",
        "folds": fold_info,
        "seen_model": a.seen_model or "trained here",
        "gene_offset_dropout": a.offset_dropout,
        "seen_genes_in_panel": len(seen_in_panel),
        "per_gene": per_gene,
        "seconds": {"seen": round(seen_s, 1), "imagenet_probe": round(imagenet_s, 1)},
        "wall_s": round(time.perf_counter() - t_start, 1),
        "peak_rss_mb": peak_rss_mb(),
    }
    return _summary(result)


def merge(paths: list[str], out: str | None) -> None:
    """One result from runs of different folds (``--only-folds``): per-gene figures pooled, means recomputed."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    merged = dict(parts[0])
    merged["folds"] = sorted([f for p in parts for f in p["folds"]], key=lambda f: f["fold"])
    if len({f["fold"] for f in merged["folds"]}) != len(merged["folds"]):
        raise SystemExit("the runs to merge share a fold")
    merged["per_gene"] = {
        r: {m: {g: v for p in parts for g, v in p["per_gene"][r][m].items()} for m in ("pcc", "pcc_adj")} for r in ROWS
    }
    merged["wall_s"] = round(sum(p["wall_s"] for p in parts), 1)
    merged["merged_from"] = paths
    emit(_summary(merged), out)


def table(paths: list[str]) -> str:
    """Markdown: one line per row of each result, the mean over the genes and the range over the folds."""
    out = [
        "| run | row | r (mean of genes) | r_adj (mean of genes) | r_adj per fold (min–max) |",
        "|---|---|---|---|---|",
    ]
    for p in paths:
        res = json.loads(Path(p).read_text())
        run = Path(p).stem + ("" if res.get("complete") else " (incomplete)")
        for r in ROWS:
            per_fold = [f["rows"][r]["pcc_adj"] for f in res["folds"]]
            row = res["rows"][r]
            out.append(
                f"| {run} | `{r}` | {row['pcc']:.3f} | {row['pcc_adj']:.3f} | {min(per_fold):.3f}–{max(per_fold):.3f} |"
            )
        b = res["own_beats_nearest_adj"]
        out.append(
            f"| {run} | own − nearest (r_adj) | | {b['mean_difference']:+.3f} | own higher on "
            f"{b['genes_where_own_is_higher']}/{b['n_genes']} genes |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    main()
