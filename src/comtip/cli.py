"""The ``comtip`` command: pretrain, embed, predict, evaluate, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import _constants as C

EPILOG = """Data: a SpatialData folder (.zarr), a scanpy AnnData with uns['spatial'] (.h5ad), or a named dataset
(--dataset her2st --sections C2 C3, read from --data-dir / $COMTIP_DATA_DIR). Run 'comtip <command> --help'."""


def _value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def _add_data_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument(
        "input",
        nargs="?",
        help="SpatialData .zarr folder or AnnData .h5ad with uns['spatial'] (pretrain: also a corpus folder)",
    )
    p.add_argument(
        "--dataset",
        choices=["her2st", "her2st_tiny", "mouse_olfactory_bulb", "visium_mouse_brain_crop"],
        help="a named dataset instead of a file",
    )
    p.add_argument("--sections", nargs="+", help="sections of the named dataset (e.g. C2 C3 C4 C5)")
    p.add_argument("--data-dir", default=None, help="folder of the named datasets (default $COMTIP_DATA_DIR)")
    p.add_argument(
        "--tile-size-um", type=float, default=C.TILE_SIZE_UM, help="physical tile side in µm (default %(default)g)"
    )
    p.add_argument(
        "--tile-size-px",
        type=int,
        default=C.TILE_SIZE_PX,
        help="tile side given to the model in pixels (default %(default)s)",
    )


def _load_data(args):
    import comtip as ct

    if args.dataset:
        fn = getattr(ct.datasets, args.dataset)
        kw = {"data_dir": args.data_dir}
        if args.sections and args.dataset in ("her2st", "mouse_olfactory_bulb"):
            kw["sections"] = args.sections
        data = fn(**kw)
    elif args.input:
        path = Path(args.input)
        if path.suffix == ".h5ad":
            import anndata as ad

            data = ad.read_h5ad(path)
        elif path.is_dir():
            import spatialdata as sd

            data = sd.read_zarr(path)
        else:
            sys.exit(f"comtip: cannot read {path}: give a SpatialData .zarr folder or an AnnData .h5ad file.")
    else:
        sys.exit("comtip: give an input file/folder or --dataset.")
    from spatialdata import SpatialData

    if isinstance(data, SpatialData) and C.TILES_KEY not in data.shapes:
        ct.pp.spot_tiles(data, tile_size_um=args.tile_size_um, tile_size_px=args.tile_size_px)
    return data


def _write(data, out: str | None, default_name: str) -> Path:
    from spatialdata import SpatialData

    if out is None:
        out = default_name
    path = Path(out)
    if isinstance(data, SpatialData):
        # images and shapes read from the input stay where they are: write the table with the results
        path = path.with_suffix(".h5ad") if path.suffix != ".zarr" else path
        if path.suffix == ".zarr":
            data.write(path, overwrite=True)
        else:
            data.tables[C.TABLE_KEY].write_h5ad(path)
    else:
        data.write_h5ad(path.with_suffix(".h5ad"))
        path = path.with_suffix(".h5ad")
    print(f"wrote {path}")
    return path


def cmd_pretrain(args) -> None:
    """``comtip pretrain``: train and save a model."""
    import comtip as ct

    corpus = args.input and not args.dataset and (Path(args.input) / "manifest.json").is_file()
    if (args.samples or args.checkpoint_every_n_steps) and not corpus:
        sys.exit(
            "comtip: --samples and --checkpoint-every-n-steps are for a corpus; give a corpus folder as input "
            "(write one with 'comtip write-corpus')."
        )
    data = args.input if corpus else _load_data(args)
    corpus_kw = {"samples": args.samples, "checkpoint_every_n_steps": args.checkpoint_every_n_steps} if corpus else {}
    overrides = {k: _value(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    config = getattr(ct.CoMTIPConfig, args.config)(**overrides)
    model = ct.tl.pretrain(
        data,
        config=config,
        max_epochs=args.max_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        n_genes=args.n_genes,
        readout_epochs=args.readout_epochs,
        validation=None if args.validation == ["none"] else ("auto" if args.validation is None else args.validation),
        gene_pretrain_epochs=args.gene_pretrain_epochs,
        accelerator=args.accelerator,
        devices=_value(args.devices),
        num_nodes=args.num_nodes,
        strategy=args.strategy,
        precision=args.precision,
        checkpoint_dir=args.checkpoint_dir,
        seed=args.seed,
        num_workers=args.num_workers,
        **corpus_kw,
    )
    if model.training_summary.get("stages", [{}])[-1].get("is_global_zero", True):
        model.save(args.out, overwrite=args.overwrite)
        print(model)
        print(f"saved the model to {args.out}")


def cmd_write_corpus(args) -> None:
    """``comtip write-corpus``: write samples to a corpus on disk for streamed pretraining."""
    import comtip as ct

    sources = []
    for item in args.sources:
        path = Path(item)
        if (path / "st").is_dir():  # a HEST-1k folder
            sources.extend([(path, s) for s in args.samples] if args.samples else [path])
        elif path.suffix == ".zarr" and path.is_dir():
            import spatialdata as sd

            sources.append(sd.read_zarr(path))
        else:
            sys.exit(
                f"comtip: cannot read {path}: give HEST-1k folders (with st/, metadata/, patches/) or SpatialData "
                ".zarr folders."
            )
    corpus = ct.pp.write_corpus(
        sources,
        args.out,
        tile_size_um=args.tile_size_um,
        tile_size_px=args.tile_size_px,
        shard_size=args.shard_size,
        mode="w" if args.overwrite else "a",
    )
    print(corpus)


def cmd_embed(args) -> None:
    """``comtip embed``: embeddings of spots."""
    import comtip as ct

    ct.tl.load_model(args.model)
    data = _load_data(args)
    keys = ct.tl.embed(data, batch_size=args.batch_size, dihedral=args.dihedral, device=args.device)
    print(f"added .obsm keys {keys}")
    _write(data, args.output, "comtip_embed.h5ad")


def cmd_predict(args) -> None:
    """``comtip predict``: expression from histology."""
    import comtip as ct

    ct.tl.load_model(args.model)
    data = _load_data(args)
    ct.tl.predict_expression(
        data,
        genes=args.genes,
        method=args.method,
        dihedral=not args.no_dihedral,
        spatial_context=args.spatial_context,
        batch_size=args.batch_size,
        device=args.device,
    )
    if args.score:
        df = ct.tl.score_expression(data)
        print(df.sort_values("pearson", ascending=False).head(20).to_string())
    _write(data, args.output, "comtip_predict.h5ad")


def cmd_evaluate(args) -> None:
    """``comtip evaluate``: EVAL.md's table as JSON (:func:`comtip.bench.evaluate`)."""
    import comtip as ct

    model = ct.tl.load_model(args.model)
    train = ct.datasets.her2st(args.train, data_dir=args.data_dir)
    test = ct.datasets.her2st(args.eval, data_dir=args.eval_data_dir or args.data_dir)
    t0 = time.perf_counter()
    res = ct.bench.evaluate(model, train, test, dihedral=not args.no_dihedral, spatial_context=args.spatial_context)
    res.update(
        {"train": args.train, "eval": args.eval, "model": args.model, "wall_s": round(time.perf_counter() - t0, 1)}
    )
    text = json.dumps(res, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
        print(f"wrote {args.json}")
    print(_table(res["methods"]))


def _table(methods: dict) -> str:
    cols = ["pcc_hvg50", "pcc_heg250", "pcc_hvg50_adj", "pcc_heg250_adj", "spearman_hvg50", "recall_at5"]
    lines = [f"{'method':<34}" + "".join(f"{c:>16}" for c in cols)]
    for name, r in methods.items():
        lines.append(f"{name:<34}" + "".join(f"{r.get(c, float('nan')):>16.3f}" for c in cols))
    return "\n".join(lines)


def cmd_demo(args) -> None:
    """``comtip demo``: the whole job on HER2ST."""
    from .bench import run_demo

    run_demo(out=args.out, data_dir=args.data_dir, max_epochs=args.max_epochs, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``comtip`` command."""
    p = argparse.ArgumentParser(
        prog="comtip",
        description="CoMTIP for spatial transcriptomics: pretrain on H&E + spots, embed, predict expression zero-shot, evaluate.",
        epilog=EPILOG,
    )
    from ._version import __version__

    p.add_argument("--version", action="version", version=f"comtip {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="say what is added where (INFO logging)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "pretrain",
        help="train a CoMTIP model on image tiles + expression",
        description="Train a CoMTIP model (ct.tl.pretrain) and save it to --out. The same command runs on CPU, one GPU, or several GPUs/nodes (torchrun, SLURM).",
        epilog=EPILOG,
    )
    _add_data_args(s)
    s.add_argument("--out", required=True, help="folder to save the model to (model.safetensors + config.json)")
    s.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    s.add_argument(
        "--config",
        default="cpu",
        choices=["cpu", "paper", "tiny"],
        help="preset: cpu (offline EfficientNet-Lite0), paper (ViT-B/32, GPUs), tiny (tests)",
    )
    s.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config fields to change, e.g. image_trainable_blocks=2 mfm_weight=0",
    )
    s.add_argument("--max-epochs", type=int, default=20)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--n-genes", type=int, default=512, help="size of the model's gene panel")
    s.add_argument(
        "--readout-epochs",
        type=int,
        default=30,
        help="epochs of the zero-shot read-out stage after the contrastive one",
    )
    s.add_argument(
        "--validation",
        nargs="*",
        default=None,
        help="validation section(s); default: the last imaged section; 'none' for no validation",
    )
    s.add_argument(
        "--gene-pretrain-epochs", type=int, default=0, help="masked value modeling on count-only sections first"
    )
    s.add_argument("--accelerator", default="auto", help="cpu, gpu or auto")
    s.add_argument("--devices", default="auto", help="number of devices (GPUs) per node, or auto")
    s.add_argument("--num-nodes", type=int, default=1)
    s.add_argument("--strategy", default="auto", help="Lightning strategy (auto = DDP on several devices)")
    s.add_argument("--precision", default=None, help="e.g. bf16-mixed; default bf16 on GPU, fp32 on CPU")
    s.add_argument("--checkpoint-dir", default=None, help="checkpoints here; an interrupted run resumes from them")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--num-workers", type=int, default=0)
    s.add_argument("--samples", nargs="+", default=None, help="corpus input only: the samples to train on")
    s.add_argument(
        "--checkpoint-every-n-steps",
        type=int,
        default=None,
        help="corpus input only: also checkpoint every N steps (a killed run resumes mid-epoch)",
    )
    s.set_defaults(func=cmd_pretrain)

    s = sub.add_parser(
        "write-corpus",
        help="write samples to a corpus on disk (tile shards + counts) for streamed pretraining",
        description="Write HEST-1k samples and SpatialData objects to a corpus folder (ct.pp.write_corpus), which "
        "'comtip pretrain CORPUS' streams. Appends to an existing corpus; re-running completes an interrupted write.",
        epilog=EPILOG,
    )
    s.add_argument("sources", nargs="+", help="HEST-1k folders (st/, metadata/, patches/) or SpatialData .zarr folders")
    s.add_argument("--out", required=True, help="the corpus folder")
    s.add_argument("--samples", nargs="+", default=None, help="HEST sample ids to write (default: all in the folders)")
    s.add_argument(
        "--tile-size-um", type=float, default=C.TILE_SIZE_UM, help="physical tile side in µm (default %(default)g)"
    )
    s.add_argument("--tile-size-px", type=int, default=C.TILE_SIZE_PX, help="tile side in pixels (default %(default)s)")
    s.add_argument("--shard-size", type=int, default=4096, help="spots per shard (default 4096)")
    s.add_argument("--overwrite", action="store_true", help="replace the corpus in --out instead of appending")
    s.set_defaults(func=cmd_write_corpus)

    s = sub.add_parser(
        "embed",
        help="write image and gene embeddings of spots",
        description="Embed spots with a saved model (ct.tl.embed) and write the table with .obsm['X_comtip_image'] / ['X_comtip_gene'].",
        epilog=EPILOG,
    )
    _add_data_args(s)
    s.add_argument("--model", required=True, help="model folder or Hugging Face Hub id")
    s.add_argument("--output", default=None, help="output .h5ad (table) or .zarr (whole SpatialData)")
    s.add_argument("--batch-size", type=int, default=C.BATCH_SIZE, help="tiles per forward pass (default %(default)s)")
    s.add_argument("--dihedral", action="store_true", help="average over the 8 flips/rotations (8x compute)")
    s.add_argument("--device", default=None)
    s.set_defaults(func=cmd_embed)

    s = sub.add_parser(
        "predict",
        help="predict expression from histology (zero-shot by default)",
        description="Predict expression (ct.tl.predict_expression) and write the table with .layers['comtip_pred'].",
        epilog=EPILOG,
    )
    _add_data_args(s)
    s.add_argument("--model", required=True, help="model folder or Hugging Face Hub id")
    s.add_argument(
        "--genes",
        nargs="+",
        default=None,
        help="genes to predict (default: the model's panel); genes outside it are prompted from their description",
    )
    s.add_argument("--method", default="zero_shot", choices=["zero_shot", "retrieval", "probe"])
    s.add_argument("--no-dihedral", action="store_true", help="do not average over the 8 flips/rotations")
    s.add_argument(
        "--spatial-context",
        type=float,
        default=C.SPATIAL_CONTEXT,
        help="mix each spot's image embedding with its neighbours' mean: 0 = alone, 0.5 = half and half (default)",
    )
    s.add_argument("--score", action="store_true", help="also score against the measured expression")
    s.add_argument("--output", default=None, help="output .h5ad (table) or .zarr (whole SpatialData)")
    s.add_argument("--batch-size", type=int, default=C.BATCH_SIZE, help="tiles per forward pass (default %(default)s)")
    s.add_argument("--device", default=None)
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser(
        "evaluate",
        help="EVAL.md protocol: CoMTIP next to ImageNet baselines, as JSON",
        description="Score a model on HER2ST evaluation sections next to the ImageNet probe/retrieval baselines (EVAL.md), panels from the training sections.",
    )
    s.add_argument("--model", required=True)
    s.add_argument(
        "--train",
        nargs="+",
        default=["C2", "C3", "C4", "C5"],
        help="training sections (panels and reference-based methods)",
    )
    s.add_argument("--eval", nargs="+", default=["C6"], help="evaluation sections")
    s.add_argument("--data-dir", default=None)
    s.add_argument("--eval-data-dir", default=None)
    s.add_argument(
        "--no-dihedral",
        action="store_true",
        help="score CoMTIP on one view of each tile instead of the mean of its 8 flips/rotations "
        "(the *_dihedral baselines are then left out)",
    )
    s.add_argument(
        "--spatial-context",
        type=float,
        default=C.SPATIAL_CONTEXT,
        help="mix every method's image features with the neighbouring spots' mean: 0 = alone, 0.5 = half and half (default)",
    )
    s.add_argument("--json", default=None, help="write the results here")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser(
        "demo",
        help="the whole job on HER2ST: pretrain C2-C5, zero-shot C6, score, figures",
        description="Pretrain on HER2ST C2-C5 (CPU default), predict C6 zero-shot, score it next to the baselines, and write the model, figures and a JSON into --out.",
    )
    s.add_argument("--out", default="demo_out")
    s.add_argument("--data-dir", default=None)
    s.add_argument("--max-epochs", type=int, default=None, help="default: the demo's tuned setting")
    s.add_argument("--quick", action="store_true", help="a few epochs only (a smoke run)")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``comtip`` command."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import comtip as ct

    if args.quiet:
        ct.settings.show_progress_bar = False
    if args.verbose:
        ct.settings.verbosity = "info"
    args.func(args)


if __name__ == "__main__":
    main()
