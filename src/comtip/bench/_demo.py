"""``comtip demo`` / ``make demo`` (:func:`comtip.bench.run_demo`): the whole job on HER2ST, end to end, on the CPU."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

TRAIN = ["C2", "C3", "C4", "C5"]
TEST = ["C6"]
MARKERS = ["ERBB2", "GRB7", "KRT19", "COL1A1", "IGKC"]  # HER2 amplicon, epithelium, stroma, plasma cells


def demo_config():
    """The model of the demo: the offline CPU default (see ``benchmarks/README.md`` for how it was chosen).

    Returns
    -------
    :meth:`comtip.CoMTIPConfig.cpu`, a fresh one per call (train it with :data:`DEMO_PRETRAIN`).
    """
    from ..model import CoMTIPConfig

    return CoMTIPConfig.cpu()


#: the :func:`comtip.tl.pretrain` arguments of the demo (with :func:`demo_config`)
DEMO_PRETRAIN = {"max_epochs": 20, "batch_size": 32}


def _say(msg: str) -> None:
    print(f"[comtip demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_demo(
    out: str | os.PathLike = "demo_out", *, data_dir=None, max_epochs: int | None = None, quick: bool = False
) -> dict:
    """Pretrain on HER2ST C2–C5, predict C6 zero-shot, score it next to the baselines, write model, figures, JSON.

    Parameters
    ----------
    out
        Output folder: ``model/``, ``figures/*.png``, ``scores.json``, ``c6_predictions.h5ad``.
    data_dir
        Folder holding ``her2st/`` (default ``$COMTIP_DATA_DIR``).
    max_epochs
        Training epochs (default: the demo's setting).
    quick
        Two epochs only: a smoke run of the whole path, not meaningful scores.

    Returns
    -------
    The content of ``scores.json``.

    Examples
    --------
    >>> ct.bench.run_demo("demo_out", quick=True)
    """
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    import torch

    from .. import datasets, pl, pp, tl
    from .._settings import settings
    from ._evaluate import evaluate

    t0 = time.perf_counter()
    out = Path(out)
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    timings: dict[str, float] = {}

    _say(f"reading HER2ST {TRAIN} (training) and {TEST} (held out) from {data_dir or settings.data_dir}")
    train = datasets.her2st(TRAIN, data_dir=data_dir)
    test = datasets.her2st(TEST, data_dir=data_dir)
    pp.spot_tiles(train)
    pp.spot_tiles(test)
    t = time.perf_counter()
    kwargs = dict(DEMO_PRETRAIN)
    if max_epochs is not None:
        kwargs["max_epochs"] = max_epochs
    if quick:
        kwargs["max_epochs"] = 2
    _say(
        f"pretraining CoMTIP on {train.tables['table'].n_obs} spots ({kwargs['max_epochs']} epochs, CPU default config)"
    )
    model = tl.pretrain(train, config=demo_config(), **kwargs)
    timings["pretrain_s"] = time.perf_counter() - t
    model.save(out / "model", overwrite=True)
    _say(f"saved the model to {out / 'model'}")
    print(model)

    t = time.perf_counter()
    _say("zero-shot prediction of C6 from histology alone, and scores")
    tl.embed(test, overwrite=True)
    tl.predict_expression(test, overwrite=True)
    scores = tl.score_expression(test, overwrite=True)
    timings["predict_s"] = time.perf_counter() - t

    t = time.perf_counter()
    _say("baselines of EVAL.md on the same spots (ImageNet probe and retrieval, training mean)")
    res = evaluate(model, train, test, methods=("comtip_zero_shot", "imagenet_probe", "imagenet_retrieval", "mean"))
    timings["evaluate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    table = test.tables["table"]
    hvg = res["panels"]["hvg50"]
    ranked = scores.loc[[g for g in hvg if g in scores.index]].sort_values("pearson", ascending=False)
    best = list(ranked.index[:3])
    markers = [g for g in MARKERS if g in scores.index and g not in best][:3]
    pl.predicted_vs_measured(test, best, save=figs / "predicted_vs_measured_best.png", show=False, ncols=1)
    if markers:
        pl.predicted_vs_measured(test, markers, save=figs / "predicted_vs_measured_markers.png", show=False, ncols=1)
    pl.gene_scores(test, panel="hvg50", save=figs / "gene_scores_hvg50.png", show=False)
    pl.training_curves(model, save=figs / "training_curves.png", show=False)
    pl.embedding(test, save=figs / "embedding_umap.png", show=False)
    timings["figures_s"] = time.perf_counter() - t
    table.write_h5ad(out / "c6_predictions.h5ad")

    summary = {
        "task": "train HER2ST C2-C5 (CPU default), zero-shot predict C6, EVAL.md metrics",
        "methods": res["methods"],
        "best_genes": {g: round(float(scores.loc[g, "pearson"]), 3) for g in best},
        "markers": {g: round(float(scores.loc[g, "pearson"]), 3) for g in markers},
        "n_train_spots": res["n_train_spots"],
        "n_eval_spots": res["n_eval_spots"],
        "training": {
            k: model.training_summary.get(k)
            for k in ("sections", "validation_sections", "epochs", "readout_epochs", "steps", "wall_s")
        }
        | {"best_epoch": {s["stage"]: s.get("best_epoch") for s in model.training_summary["stages"]}},
        "seconds": {k: round(v, 1) for k, v in timings.items()} | {"total": round(time.perf_counter() - t0, 1)},
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "quick": quick,
    }
    (out / "scores.json").write_text(json.dumps(summary, indent=2) + "\n")
    cols = ["pcc_hvg50", "pcc_heg250", "pcc_hvg50_adj", "pcc_heg250_adj", "recall_at5"]
    print(f"\n{'method':<34}" + "".join(f"{c:>15}" for c in cols))
    for name, r in res["methods"].items():
        print(f"{name:<34}" + "".join(f"{r.get(c, np.nan):>15.3f}" for c in cols))
    print(f"\nbest HVG50 genes on C6: {summary['best_genes']}; markers: {summary['markers']}")
    _say(f"done in {summary['seconds']['total']:.0f} s: {out / 'scores.json'}, figures in {figs}")
    return summary
