"""How far can image → expression Recall@5 go on an unseen section with linear read-outs of image features?

EVAL.md's Recall@5: for each evaluation spot, rank all evaluation spots' expression profiles by similarity to what its
image says; the share whose own profile is in the top 5. For the baselines, the image says a ridge-predicted profile
(HVG50 ∪ HEG250, z-scored with the training mean and sd) and the ranking is by cosine. This script keeps the image
side (frozen features, EVAL.md's ridge probe fitted on the training spots) and varies what the profile is reduced to
before ranking, to see whether any summary of the measured profile is easier to find from the image:

- ``profile``: the z-scored HVG50 ∪ HEG250 profile (EVAL.md's baselines);
- ``pcK`` / ``pcK_white``: its first K principal components on the training spots, as they are or whitened;
- ``profile+depth×a``: the profile plus the spot's log depth, standardised within the section, weight a (sequencing
  depth is partly visible in the H&E: cellularity). ``depth_pearson``: how well the same probe predicts that depth.

Features: the frozen ImageNet EfficientNet-Lite0 of EVAL.md (one view), and with ``--model`` also a CoMTIP model's
image embeddings (8 flips/rotations). Each spot alone, no spatial context. Nothing is tuned here.

Usage:
  python benchmarks/recall_ceiling.py [--model demo_out/model] [--train C2 C3 C4 C5] [--eval C6] [--json OUT]
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import Timer, emit, machine, peak_rss_mb


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("COMTIP_DATA_DIR", "../shared/data"))
    p.add_argument("--model", default=None, help="also read out this CoMTIP model's image embeddings")
    p.add_argument("--train", nargs="+", default=["C2", "C3", "C4", "C5"])
    p.add_argument("--eval", nargs="+", default=["C6"])
    p.add_argument("--pcs", nargs="+", type=int, default=[5, 10, 20, 50])
    p.add_argument("--depth-weights", nargs="+", type=float, default=[1.0, 3.0])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import numpy as np
    import torch
    from sklearn.decomposition import PCA

    import comtip as ct
    from comtip.bench import image_embeddings, imagenet_features, load_spots, recall_at_k, ridge_probe

    torch.set_num_threads(os.cpu_count() or 1)
    ct.settings.show_progress_bar = sys.stderr.isatty()
    with Timer() as t_all:
        train = ct.datasets.her2st(args.train, data_dir=args.data_dir)
        test = ct.datasets.her2st(args.eval, data_dir=args.data_dir)
        ct.pp.spot_tiles(train)
        ct.pp.spot_tiles(test)
        (tr_spots, tr_names), (te_spots, te_names) = (load_spots(s) for s in (train, test))
        tr_tab, te_tab = tr_spots.table[tr_names], te_spots.table[te_names]
        panels = ct.pp.eval_panels(tr_tab)
        genes = list(dict.fromkeys(panels["hvg50"] + panels["heg250"]))
        y_tr = ct.pp.log_normalized(tr_tab, genes=genes).toarray().astype(np.float64)
        y_te = ct.pp.log_normalized(te_tab, genes=genes).toarray().astype(np.float64)
        mu, sd = y_tr.mean(0), y_tr.std(0)
        sd[sd == 0] = 1.0
        z_tr, z_te = (y_tr - mu) / sd, (y_te - mu) / sd

        def by_section(table):  # log depth, standardised within each section
            d = ct.pp.log_depth(table)
            sec = table.obs["section"].astype(str).to_numpy()
            out = np.empty_like(d)
            for s in np.unique(sec):
                m = sec == s
                out[m] = (d[m] - d[m].mean()) / (d[m].std() or 1.0)
            return out

        d_tr, d_te = by_section(tr_tab), by_section(te_tab)
        # what the profile is reduced to: name -> (training targets, evaluation targets, column weights)
        targets = {"profile": (z_tr, z_te, None)}
        for k in args.pcs:
            pca = PCA(k, random_state=0).fit(z_tr)
            targets[f"pc{k}"] = (pca.transform(z_tr), pca.transform(z_te), None)
            targets[f"pc{k}_white"] = (pca.transform(z_tr), pca.transform(z_te), 1 / np.sqrt(pca.explained_variance_))
        for a in args.depth_weights:
            w = np.r_[np.ones(z_tr.shape[1]), a]
            targets[f"profile+depth×{a:g}"] = (np.c_[z_tr, d_tr], np.c_[z_te, d_te], w)

        with Timer() as t_feat:
            feats = {
                "imagenet": tuple(
                    imagenet_features(s, n, batch_size=64, device=None)
                    for s, n in ((tr_spots, tr_names), (te_spots, te_names))
                )
            }
            if args.model:
                model = ct.tl.load_model(args.model)
                feats["comtip"] = tuple(
                    image_embeddings(
                        model, s, n, batch_size=64, device=None, dihedral=True, num_workers=0, prompt=False
                    )["image"]
                    for s, n in ((tr_spots, tr_names), (te_spots, te_names))
                )
        rows, depth_r = {}, {}
        for fname, (f_tr, f_te) in feats.items():
            d_pred, _ = ridge_probe(f_tr, d_tr[:, None], f_te)
            depth_r[fname] = round(float(np.corrcoef(d_pred[:, 0], d_te)[0, 1]), 4)
            for tname, (t_tr, t_te, w) in targets.items():
                pred, _ = ridge_probe(f_tr, t_tr, f_te)
                w = np.ones(t_te.shape[1]) if w is None else w
                rows[f"{fname}:{tname}"] = round(recall_at_k(pred * w, t_te * w, 5), 4)
                print(fname, tname, rows[f"{fname}:{tname}"], file=sys.stderr)
    out = {
        "benchmark": "recall_ceiling",
        "model": args.model,
        "train": args.train,
        "eval": args.eval,
        "n_train_spots": len(tr_names),
        "n_eval_spots": len(te_names),
        "chance": round(5 / len(te_names), 4),
        "recall_at5": rows,
        "depth_pearson": depth_r,
        "features_s": round(t_feat.s, 1),
        "wall_s": round(t_all.s, 1),
        "peak_rss_mb": peak_rss_mb(),
        "machine": machine(),
    }
    emit(out, args.json)
    return out


if __name__ == "__main__":
    main()
