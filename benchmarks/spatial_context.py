"""How much of its neighbours should a spot's image embedding take in? Picked on the validation section only.

Embeds the training sections once (CoMTIP image and prompt embeddings, and the frozen ImageNet features, all
averaged over the 8 flips/rotations), then for each ``spatial_context`` weight w (``(1 - w) * own + w * mean of the
spots within 1.5 spot spacings``, ``comtip.bench.neighbour_means``) scores on the validation section: the
ridge probe fitted on the other training sections (CoMTIP and ImageNet features) and CoMTIP zero-shot. Panels are
EVAL.md's, from the training sections. Nothing of the evaluation section (C6) is read.

Usage:
  python benchmarks/spatial_context.py --model demo_out/model [--fit C2 C3 C4] [--val C5]
         [--weights 0 0.25 0.33 0.5 0.67 0.8] [--json OUT]
The model must not have been trained on the validation section's expression beyond model selection (``make demo``
uses C5 only to pick its epochs). The last line printed is one JSON object.
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
    p.add_argument("--model", required=True)
    p.add_argument("--fit", nargs="+", default=["C2", "C3", "C4"], help="sections the probe is fitted on")
    p.add_argument("--val", nargs="+", default=["C5"], help="sections scored")
    p.add_argument("--weights", nargs="+", type=float, default=[0.0, 0.25, 0.33, 0.5, 0.67, 0.8])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import numpy as np
    import torch

    import comtip as ct
    from comtip.bench import (
        image_embeddings,
        imagenet_features,
        load_spots,
        mix_with_neighbours,
        neighbour_means,
        panel_metrics,
        reference_predict,
        zero_shot,
    )

    torch.set_num_threads(os.cpu_count() or 1)
    ct.settings.show_progress_bar = sys.stderr.isatty()
    with Timer() as t_all:
        sdata = ct.datasets.her2st(args.fit + args.val, data_dir=args.data_dir)
        ct.pp.spot_tiles(sdata)
        model = ct.tl.load_model(args.model)
        spots, names = load_spots(sdata)
        tab = spots.table[names]
        sec = tab.obs["section"].astype(str).to_numpy()
        fit, val = np.isin(sec, args.fit), np.isin(sec, args.val)
        panels = ct.pp.eval_panels(tab)
        genes = list(dict.fromkeys(panels["hvg50"] + panels["heg250"]))
        idx = {k: np.array([genes.index(g) for g in panels[k]]) for k in ("hvg50", "heg250")}
        y = ct.pp.log_normalized(tab, genes=genes).toarray().astype(np.float64)
        depth = ct.pp.log_depth(tab)[val]
        with Timer() as t_embed:
            e = image_embeddings(model, spots, names, batch_size=64, device=None, dihedral=True, num_workers=0)
            feats = {
                "comtip": e["image"],
                "imagenet": imagenet_features(spots, names, batch_size=64, device=None, dihedral=True),
            }
        means = neighbour_means(*spots.centres(names))  # the neighbour graph, once for every weight

        def scores(pred):  # EVAL.md's metrics on the validation spots, as evaluate() computes them
            return {k: round(v, 4) for k, v in panel_metrics(pred, y[val], depth, idx).items()}

        rows = []
        for w in args.weights:
            row = {"spatial_context": w}
            for name, f in feats.items():
                fw = mix_with_neighbours(f, means, w)
                row[f"{name}_probe"] = scores(reference_predict("probe", fw[fit], y[fit], fw[val], idx, genes))
            pw = mix_with_neighbours(e["prompt"], means, w).astype(np.float32)
            row["comtip_zero_shot"] = scores(zero_shot(model, pw[val], genes, descriptions=None, n_levels=None))
            rows.append(row)
            print(w, {k: v["pcc_hvg50"] for k, v in row.items() if isinstance(v, dict)}, file=sys.stderr)
    out = {
        "benchmark": "spatial_context",
        "model": args.model,
        "fit": args.fit,
        "val": args.val,
        "n_fit_spots": int(fit.sum()),
        "n_val_spots": int(val.sum()),
        "rows": rows,
        "embed_s": round(t_embed.s, 1),
        "wall_s": round(t_all.s, 1),
        "peak_rss_mb": peak_rss_mb(),
        "machine": machine(),
    }
    emit(out, args.json)
    return out


if __name__ == "__main__":
    main()
