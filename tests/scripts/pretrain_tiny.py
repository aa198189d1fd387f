"""Pretrain the tiny model on synthetic sections; used by tests as a subprocess (DDP under torchrun, SIGKILL + resume).

Usage: python pretrain_tiny.py OUT_DIR [--devices N] [--epochs E] [--checkpoint-dir D]
Writes OUT_DIR/rank{R}.json with the weights checksum, steps and history length of each rank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--readout-epochs", type=int, default=1)
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    from conftest import make_sdata

    import comtip as ct

    ct.settings.show_progress_bar = False
    sd = make_sdata(sections=("S1", "S2"))
    ct.pp.spot_tiles(sd, tile_size_um=40, tile_size_px=64)
    model = ct.tl.pretrain(
        sd,
        config=ct.CoMTIPConfig.tiny(),
        validation=None,
        max_epochs=args.epochs,
        readout_epochs=args.readout_epochs,
        batch_size=args.batch_size,
        n_genes=30,
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        checkpoint_dir=args.checkpoint_dir,
        seed=0,
    )
    rank = int(os.environ.get("RANK", "0"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stage = next(s for s in model.training_summary["stages"] if s["stage"] == "contrastive")
    info = {
        "rank": rank,
        "checksum": model.weights_checksum(),
        "steps": stage["steps"],
        "epochs": stage["epochs"],
        "devices": stage["devices"],
        "resumed_from": stage["resumed_from"],
        "history": len(model.history),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main()
