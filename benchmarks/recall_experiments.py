"""Two training changes tried for the shared-space Recall@5: a record of their logic (not kept in the package).

``--variant zorder``: gene sentences take a spot's top-L genes by z-score (log-normalised value minus the gene's
training mean, over its training sd) instead of by value, so that they hold what sets the spot apart rather than the
genes every spot expresses most. The mean and sd come from the first sentences built, which in ``ct.tl.pretrain`` are
the training spots' (without gene-side pretraining); the same order is then used for every sentence, in training and
in the harness.

``--variant soft``: InfoNCE with soft targets (BLEEP): each row's target is the softmax of the mean of the image-image
and sentence-sentence cosine similarities in the batch, times the model's logit scale, instead of the identity.

Neither was kept (``benchmarks/README.md``, *Recall@5: what else was tried*), so the package has no option for them,
and this script no longer runs them: it did so by replacing a function inside comtip's private modules (the gene
sentences of ``comtip.data``'s dataset, the InfoNCE of ``comtip.model``) before running ``accuracy.py``, which the
benchmarks do not do any more. The two functions below are the variants, unchanged. The figures in
``results/recall_zorder_seed*.json`` and ``results/recall_soft_seed0.json`` were measured with this script at commit
974d37a; to rerun one, check that commit out (``git worktree add ../recall 974d37a``) and run there, e.g.:
  python benchmarks/recall_experiments.py --variant zorder --pretrain seed=1 \
      --methods comtip_zero_shot comtip_retrieval comtip_probe --json OUT
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def zscore_sentences(stats: dict):
    """``gene_sentences`` with genes ranked by training z-score; the values in the sentence stay log-normalised."""

    def gene_sentences(values, length):
        values = np.asarray(values, dtype=np.float32)
        if not stats:  # the first call: the training spots in ct.tl.pretrain
            sd = values.std(0)
            stats.update(mean=values.mean(0), sd=np.where(sd > 0, sd, 1.0))
            print(f"z-order: mean and sd from {values.shape[0]} spots", file=sys.stderr)
        z = np.where(values > 0, (values - stats["mean"]) / stats["sd"], -np.inf)
        k = min(length, values.shape[1])
        order = np.argsort(-z, axis=1, kind="stable")[:, :k]
        val = np.take_along_axis(values, order, axis=1)
        mask = val > 0
        idx, val = np.where(mask, order, 0).astype(np.int64), np.where(mask, val, 0).astype(np.float32)
        pad = ((0, 0), (0, length - k))
        return np.pad(idx, pad), np.pad(val, pad), np.pad(mask, pad)

    return gene_sentences


def soft_info_nce(image_emb, gene_emb, logit_scale):
    """Symmetric InfoNCE against BLEEP's soft targets."""
    import torch
    import torch.nn.functional as F

    logits = logit_scale * image_emb @ gene_emb.T
    with torch.no_grad():
        target = F.softmax(0.5 * (image_emb @ image_emb.T + gene_emb @ gene_emb.T) * logit_scale, dim=-1)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T))


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 3)[3],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--variant", required=True, choices=["zorder", "soft"])
    args, _ = p.parse_known_args()
    msg = (
        f"recall_experiments.py --variant {args.variant}: not kept, and no longer run against this version of comtip "
        "(it patched private modules). Rerun it at commit 974d37a: see this script's docstring."
    )
    raise SystemExit(msg)


if __name__ == "__main__":
    main()
