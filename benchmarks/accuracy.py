"""Accuracy per EVAL.md: CoMTIP (zero-shot, retrieval, probe) next to ImageNet baselines and the mean, one run.

Trains CoMTIP on the training sections (or loads --model), then scores every method of EVAL.md's table on the
evaluation sections, with gene panels fixed from the training sections only, plus a shuffled-image control of
the zero-shot predictions.

Usage:
  python benchmarks/accuracy.py --data-dir ../shared/data --train C2 C3 C4 C5 --eval C6 [--eval-data-dir D2]
         [--config cpu] [--set key=value ...] [--max-epochs N] [--model DIR] [--save-model DIR] [--json OUT]
         [--gene-sections auto|none|A1 D1 ...]
--gene-sections adds count-only sections (no image) to the training data, for gene-side pretraining
(--pretrain gene_pretrain_epochs=N, with --set mvm_weight=...). "auto" takes every count-only HER2ST section of
the patients that are neither trained nor evaluated on (patient = the section's letter) whose counts are in the
data folder (it never downloads: with comtip's shared folder, patients A and D–H), so nothing of the evaluation
patient is seen, not even its counts.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import Timer, emit, machine, peak_rss_mb

from comtip.bench import SPATIAL_CONTEXT


def _value(v: str):
    """A command-line value: JSON (``false``, ``null``, ``3e-4``), a Python literal (``False``, ``None``) or a string."""
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(v)
    except (ValueError, SyntaxError):
        return v


def _gene_sections(given: list[str], train: list[str], evaluated: list[str], known, local=()) -> list[str]:
    """The count-only sections to add: ``auto`` = those of patients neither trained nor evaluated on, among ``local``
    (the sections whose counts are in the data folder: ``auto`` never downloads)."""
    if given == ["none"]:
        return []
    if given == ["auto"]:
        seen = {s[0] for s in [*train, *evaluated]}
        return [s for s in known if s[0] not in seen and s in local]
    clash = [s for s in given if s in evaluated or s[0] in {e[0] for e in evaluated}]
    if clash:
        msg = f"--gene-sections {clash} belong to an evaluated patient: a model must not see them (EVAL.md)."
        raise SystemExit(msg)
    return [s for s in given if s not in train]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("COMTIP_DATA_DIR", "../shared/data"))
    p.add_argument("--train", nargs="+", default=["C2", "C3", "C4", "C5"])
    p.add_argument("--eval", nargs="+", default=["C6"])
    p.add_argument("--eval-data-dir", default=None, help="folder of the same layout holding the evaluation sections")
    p.add_argument("--config", default="cpu", choices=["cpu", "tiny", "paper"])
    p.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. image_trainable_blocks=2"
    )
    p.add_argument(
        "--pretrain",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="ct.tl.pretrain arguments, e.g. lr=3e-4 validation=null",
    )
    p.add_argument(
        "--gene-sections",
        nargs="+",
        default=["none"],
        help="count-only sections for gene-side pretraining: 'auto' (other patients), 'none', or a list",
    )
    p.add_argument("--max-epochs", type=int, default=None)
    p.add_argument("--model", default=None, help="evaluate this saved model instead of training")
    p.add_argument("--save-model", default=None)
    p.add_argument(
        "--no-dihedral",
        action="store_true",
        help="score CoMTIP on one view of each tile instead of the mean of its 8 flips/rotations "
        "(the *_dihedral baselines are then left out unless --methods names them)",
    )
    p.add_argument(
        "--spatial-context",
        type=float,
        default=SPATIAL_CONTEXT,
        help="mix every method's image features with the mean of the neighbouring spots' (0: EVAL.md to the letter, each spot alone; "
        "0.5, the default: half and half)",
    )
    p.add_argument(
        "--methods", nargs="+", default=None, help="methods to score (default: all; see comtip.bench.METHODS)"
    )
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import torch

    import comtip as ct

    torch.set_num_threads(os.cpu_count() or 1)
    ct.settings.show_progress_bar = sys.stderr.isatty()
    overrides = dict(kv.split("=", 1) for kv in args.set)
    overrides = {k: _value(v) for k, v in overrides.items()}
    kwargs = {k: _value(v) for k, v in (kv.split("=", 1) for kv in args.pretrain)}
    if args.max_epochs is not None:
        kwargs["max_epochs"] = args.max_epochs
    counts_dir = Path(args.data_dir or ct.settings.data_dir) / "her2st" / "ST-cnts"
    local = [s for s in ct.datasets.HER2ST_SECTIONS if (counts_dir / f"{s}.tsv.gz").is_file()]
    gene_sections = _gene_sections(args.gene_sections, args.train, args.eval, ct.datasets.HER2ST_SECTIONS, local)
    with Timer() as t_all:
        # count-only sections are read without their images
        train = ct.datasets.her2st(args.train + gene_sections, data_dir=args.data_dir, images=args.train)
        test = ct.datasets.her2st(args.eval, data_dir=args.eval_data_dir or args.data_dir)
        ct.pp.spot_tiles(train)
        ct.pp.spot_tiles(test)
        if args.model:
            model = ct.tl.load_model(args.model)
            t_train = float(model.training_summary.get("wall_s", 0.0))  # as recorded by ct.tl.pretrain
            config = model.config.to_dict()
        else:
            config_obj = getattr(ct.CoMTIPConfig, args.config)(**overrides)
            config = config_obj.to_dict()
            with Timer() as tt:
                model = ct.tl.pretrain(train, config=config_obj, **kwargs)
            t_train = tt.s
            if args.save_model:
                model.save(args.save_model, overwrite=True)
        res = ct.bench.evaluate(
            model,
            train,
            test,
            methods=args.methods,
            dihedral=not args.no_dihedral,
            spatial_context=args.spatial_context,
        )
    out = {
        "benchmark": "accuracy",
        "methods": res["methods"],
        "train": args.train,
        "eval": args.eval,
        "n_train_spots": res["n_train_spots"],
        "n_eval_spots": res["n_eval_spots"],
        "wall_s": round(t_all.s, 1),
        "train_s": round(t_train, 1),
        "train_s_source": "model.training_summary (trained by another command)" if args.model else "this run",
        "peak_rss_mb": peak_rss_mb(),
        "machine": machine(),
        "config": config,
        "pretrain": kwargs,
        "gene_sections": gene_sections,
        "model": args.model,
        "training": {
            k: v
            for k, v in model.training_summary.items()
            if k in ("sections", "validation_sections", "epochs", "steps", "stages", "wall_s", "cached_image_features")
        },
        "history": model.history,
        "seconds": res["seconds"],
        "dihedral": res["dihedral"],
        "spatial_context": res["spatial_context"],
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    emit(out, args.json)
    return out


if __name__ == "__main__":
    main()
