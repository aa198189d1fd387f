"""Run under ``torchrun --nproc_per_node=2``: stream a corpus to a tiny CoMTIP with Lightning DDP (gloo, CPU).

Every rank writes the global ids of the spots of each batch it trained on to ``<out>/rank<r>.jsonl`` (one line per
batch: epoch and ids) and, at the end, rank 0 writes the trained weights to ``<out>/weights.pt``. With
``--die-at-batch K`` rank 1 stops dead (``os._exit``) when it is handed the K-th batch of epoch 1: a killed run, which
the same command without that flag resumes from ``--ckpt``.

Used by ``tests/test_stream.py``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

import comtip as ct
from comtip.data import CorpusStream
from comtip.train import fit


class RecordingStream(CorpusStream):
    """A corpus stream that logs the spots of every batch it reads (and can die at a given batch)."""

    out: str = ""
    die_at: int = -1

    def read(self, items, epoch):
        batch = super().read(items, epoch)
        ids = batch["index"].tolist()
        with open(Path(self.out) / f"rank{self.rank}.jsonl", "a") as f:
            f.write(json.dumps({"epoch": int(epoch), "ids": ids}) + "\n")
        if self.die_at >= 0 and self.rank == 1 and epoch == 1:
            with open(Path(self.out) / f"rank{self.rank}.jsonl") as f:
                n = sum(1 for line in f if json.loads(line)["epoch"] == 1)
            if n > self.die_at:
                os._exit(3)
        return batch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("corpus")
    p.add_argument("out")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--die-at-batch", type=int, default=-1)
    p.add_argument("--epochs", type=int, default=2)
    a = p.parse_args()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    ct.settings.show_progress_bar = False
    corpus = ct.io.read_corpus(a.corpus)
    genes = list(corpus.genes)[:12]
    RecordingStream.out, RecordingStream.die_at = a.out, a.die_at_batch
    stream = RecordingStream(corpus, genes, sentence_length=8, batch_size=4, buffer_size=8, augment=True, seed=0)
    levels = torch.linspace(0, 3, 4).repeat(len(genes), 1) + torch.arange(len(genes))[:, None] * 1e-3
    torch.manual_seed(0)
    config = ct.CoMTIPConfig.tiny(
        image_size=32, gene_embedding="learned", mfm_weight=0.0, paat_adv_weight=0.0, depth_weight=0.0
    )
    model = ct.CoMTIP(config, genes, None, levels.numpy())
    fit(
        model,
        stream,
        None,
        max_epochs=a.epochs,
        batch_size=4,
        lr=1e-3,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        checkpoint_dir=a.ckpt,
        checkpoint_every_n_steps=1,
        seed=0,
        num_workers=0,
        show_progress_bar=False,
        monitor=None,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, Path(a.out) / "weights.pt")


if __name__ == "__main__":
    main()
