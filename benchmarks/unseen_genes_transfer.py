"""Unseen genes: what a held-out gene could borrow from its nearest trained genes at prediction time.

``ct.tl.predict_expression`` gives a gene outside the panel its text embedding, a zero learned offset, the global
read-out temperature and the median value levels of the panel. This script re-predicts the held-out genes of
``benchmarks/unseen_genes.py`` with the fold models it saved (``--models``), taking some of those from the k panel
genes whose descriptions are nearest (cosine of the text embeddings), and scores them on C6 as that script does:

- ``median``: today's behaviour (equals ``unseen_own_description``);
- ``levels_k5``: value levels = the mean level curve of the 5 nearest panel genes;
- ``levels_tau_k5``: and their mean per-gene temperature factor;
- ``offset_k5``: the mean learned offset of the 5 nearest, median levels;
- ``all_k1`` / ``all_k5`` / ``all_k10``: levels, temperature and offset from the 1 / 5 / 10 nearest;
- ``all_k5_softmax``: the same from 5, weighted by softmax(cosine / 0.05).

Usage: python benchmarks/unseen_genes_transfer.py benchmarks/results/unseen_genes_c6.json --models DIR [--json OUT]
The variants were tried on C6, the evaluation section itself: read any gain as an upper bound.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit, machine, peak_rss_mb
from unseen_genes import description_similarity

VARIANTS = {
    "median": {},
    "levels_k5": {"levels": True, "k": 5},
    "levels_tau_k5": {"levels": True, "tau": True, "k": 5},
    "offset_k5": {"offset": True, "k": 5},
    "all_k1": {"levels": True, "tau": True, "offset": True, "k": 1},
    "all_k5": {"levels": True, "tau": True, "offset": True, "k": 5},
    "all_k10": {"levels": True, "tau": True, "offset": True, "k": 10},
    "all_k5_softmax": {"levels": True, "tau": True, "offset": True, "k": 5, "temperature": 0.05},
}


def _variant(model, genes, text, sim, emb, *, levels=False, tau=False, offset=False, k=5, temperature=None):
    """Zero-shot predictions (spots x genes) with the new genes' parameters borrowed from their k nearest."""
    import torch

    from comtip.bench import new_gene_levels

    idx = np.argsort(-sim, axis=1)[:, :k]
    w = np.take_along_axis(sim, idx, 1)
    w = np.exp(w / temperature) if temperature else np.ones_like(w)
    w = w / w.sum(1, keepdims=True)
    if levels:
        lv = np.einsum("gk,gkl->gl", w, model.value_levels.cpu().numpy()[idx])
        lv = np.maximum.accumulate(lv + np.arange(lv.shape[1]) * 1e-4, axis=1).astype(np.float32)
    else:
        lv = new_gene_levels(model, len(genes), model.n_value_levels)
    m = copy.deepcopy(model)
    n0 = model.n_genes
    m.add_genes(genes, torch.from_numpy(text), torch.from_numpy(lv))
    with torch.no_grad():
        if tau and getattr(m, "log_tau_gene", None) is not None:
            src = model.log_tau_gene.detach().cpu().numpy()
            m.log_tau_gene[n0:] = torch.from_numpy(np.einsum("gk,gk->g", w, src[idx])).float()
        if offset:
            encoders = [m.gene_encoder] + ([m.prompt_gene_encoder] if hasattr(m, "prompt_gene_encoder") else [])
            for enc in encoders:
                src = enc.gene_offset.detach().cpu().numpy()[:n0]
                enc.gene_offset[n0:] = torch.from_numpy(np.einsum("gk,gkd->gd", w, src[idx])).float()
    m._prompt_cache = None
    ids = m.gene_index(genes)
    with torch.no_grad():
        pred = m.predict_from_image_embeddings(
            torch.from_numpy(emb), m.prompt_embeddings(ids), m.value_levels[ids], gene_ids=ids
        )
    return pred.float().cpu().numpy().astype(np.float64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("result", help="the JSON of benchmarks/unseen_genes.py")
    ap.add_argument("--models", required=True, help="the --models folder of that run")
    ap.add_argument("--data-dir", default=os.environ.get("COMTIP_DATA_DIR"))
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import torch

    import comtip as ct
    from comtip.bench import SPATIAL_CONTEXT, image_embeddings, pearson_depth_adjusted, pearson_per_gene, resolve_spots

    torch.set_num_threads(os.cpu_count() or 1)
    ct.settings.show_progress_bar = False
    t0 = time.perf_counter()
    res = json.loads(Path(a.result).read_text())
    test = ct.datasets.her2st(res["eval_sections"], data_dir=a.data_dir)
    ct.pp.spot_tiles(test)
    tab = test.tables["table"]
    depth = ct.pp.log_depth(tab)
    per_gene = {v: {"pcc": {}, "pcc_adj": {}} for v in VARIANTS}
    for f in res["folds"]:
        genes = f["genes"]
        model = ct.CoMTIP.load(Path(a.models) / f"fold{f['fold']}")
        spots = resolve_spots(test, table_key="table", tiles_key="comtip_tiles", model=model)
        _, names = spots.tiled_rows()
        if list(names) != list(tab.obs_names):
            raise SystemExit("C6 spots without a tile: the benchmark assumes every spot is tiled")
        emb = image_embeddings(
            model,
            spots,
            names,
            batch_size=64,
            device=None,
            dihedral=True,
            num_workers=0,
            prompt=True,
            spatial_context=SPATIAL_CONTEXT,
        )["prompt"]
        true = ct.pp.log_normalized(tab, genes=genes).toarray().astype(np.float64)
        text, sim = description_similarity(model, genes)
        for name, kw in VARIANTS.items():
            pred = _variant(model, genes, text, sim, emb, **kw)
            for metric, values in zip(
                ("pcc", "pcc_adj"),
                (pearson_per_gene(pred, true), pearson_depth_adjusted(pred, true, depth)),
                strict=True,
            ):
                per_gene[name][metric].update(zip(genes, map(float, values), strict=True))
        print(f"fold {f['fold']} done", file=sys.stderr)

    def means(genes: list[str], table: dict) -> dict:
        return {m: round(float(np.mean([table[m][g] for g in genes])), 4) for m in ("pcc", "pcc_adj")}

    done = [g for f in res["folds"] for g in f["genes"]]
    reference = {r: res["per_gene"][r] for r in ("unseen_own_description", "nearest_trained_gene", "seen")}
    result = {
        "benchmark": "unseen_genes_transfer",
        "machine": machine(),
        "from": a.result,
        "eval_sections": res["eval_sections"],
        "variants": {v: means(done, per_gene[v]) for v in VARIANTS},
        "reference_rows": {r: means(done, t) for r, t in reference.items()},
        "folds": [
            {"fold": f["fold"], "variants": {v: means(f["genes"], per_gene[v]) for v in VARIANTS}} for f in res["folds"]
        ],
        "per_gene": per_gene,
        "wall_s": round(time.perf_counter() - t0, 1),
        "peak_rss_mb": peak_rss_mb(),
    }
    emit(result, a.json)


if __name__ == "__main__":
    main()
