"""Streaming a corpus on disk: every spot once per epoch across ranks and workers, masks, resume, DDP, pretrain."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import comtip as ct
from comtip.data import CorpusStream

from .conftest import make_sdata


def _three_samples(drop_gene: str | None = "KRT19"):
    """Three synthetic samples (A, B, C; 36 spots each); C did not measure ``drop_gene``."""
    sds = []
    for i, name in enumerate(("A", "B", "C")):
        sd = make_sdata(sections=(name,), seed=i)
        if name == "C" and drop_gene is not None:
            table = sd.tables["table"]
            sd.tables["table"] = table[:, [g for g in table.var_names if g != drop_gene]].copy()
        ct.pp.spot_tiles(sd, tile_size_um=40, tile_size_px=32)
        sds.append(sd)
    return sds


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stream") / "corpus"
    ct.pp.write_corpus(_three_samples(), path, tile_size_um=40, tile_size_px=32, shard_size=40)
    return path


def _ids(stream, epoch=0):
    stream.set_epoch(epoch)
    return [b["index"].tolist() for b in stream]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_cover_every_spot_once(corpus_dir, world):
    corpus = ct.io.read_corpus(corpus_dir)
    assert corpus.n_spots == 108
    base = CorpusStream(corpus, corpus.genes[:10], batch_size=8, buffer_size=16, seed=3)
    per_rank = [[i for b in _ids(base.for_rank(world, r)) for i in b] for r in range(world)]
    assert len({len(ids) for ids in per_rank}) == 1  # equal shares: DDP steps alike
    seen = np.concatenate(per_rank)
    assert set(seen.tolist()) == set(range(108))  # every spot, padding only by wrapping around
    assert len(seen) - 108 < world
    # another epoch, another order; the same epoch again, the same order
    assert _ids(base, 1) != _ids(base, 0)
    assert _ids(base, 0) == _ids(base, 0)


def test_workers_and_resume_give_the_same_batches(corpus_dir):
    corpus = ct.io.read_corpus(corpus_dir)
    stream = CorpusStream(corpus, corpus.genes[:10], batch_size=8, buffer_size=16, augment=True, seed=1)
    alone = list(stream)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    with_workers = list(loader)
    assert [b["index"].tolist() for b in with_workers] == [b["index"].tolist() for b in alone]
    assert torch.equal(with_workers[3]["image"], alone[3]["image"])  # augmentation seeded per spot, not per worker
    stream.set_position(0, 5)
    assert [b["index"].tolist() for b in stream] == [b["index"].tolist() for b in alone[5:]]
    stream.set_position(0, len(stream))  # a whole epoch done: the next one starts
    assert (stream.epoch, stream.start_batch) == (1, 0)


def test_gene_absent_from_a_sample_is_masked(corpus_dir):
    corpus = ct.io.read_corpus(corpus_dir)
    genes = ["KRT19", "ERBB2"]
    stream = CorpusStream(corpus, genes, batch_size=108, shuffle=False)
    batch = next(iter(stream))
    sample = np.concatenate([corpus.shard(n).obs["sample_id"].to_numpy() for n in corpus.shards.index])
    sample = sample[batch["index"].numpy()]
    mask = batch["expr_mask"].numpy()
    assert not mask[sample == "C", 0].any() and mask[sample != "C", 0].all()
    assert mask[:, 1].all()
    # the masked value is left out of the prompt loss, not read as a zero
    from comtip.model._losses import prompt_loss

    g = torch.Generator().manual_seed(0)
    img, prm = torch.randn(4, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    levels = torch.tensor([[0.0, 1.0, 2.0]] * 2)
    values = torch.tensor([[0.0, 1.0], [2.0, 1.5], [0.5, 0.0], [1.0, 2.0]])
    m = torch.tensor([[False, True], [True, True], [True, True], [True, False]])
    masked = prompt_loss(img, prm, levels, values, torch.tensor(5.0), mask=m)
    per_entry = torch.stack(
        [
            prompt_loss(
                img[i : i + 1], prm[j : j + 1], levels[j : j + 1], values[i : i + 1, j : j + 1], torch.tensor(5.0)
            )
            for i, j in zip(*torch.nonzero(m, as_tuple=True), strict=True)
        ]
    )
    assert torch.allclose(masked, per_entry.mean())


def test_pretrain_on_a_corpus(corpus_dir, tmp_path, caplog):
    model = ct.tl.pretrain(
        str(corpus_dir),
        config=ct.CoMTIPConfig.tiny(),  # 32 px tiles, upsampled to the tiny model's 64 px
        max_epochs=1,
        readout_epochs=1,
        batch_size=8,
        n_genes=30,
        n_reference=20,
        seed=0,
    )
    s = model.training_summary
    assert s["sections"] == ["A", "B"] and s["validation_sections"] == ["C"]
    assert s["n_train_spots"] == 72 and s["n_val_spots"] == 36
    assert model.reference["embeddings"].shape == (20, model.embed_dim)
    assert [e["stage"] for e in model.history] == ["contrastive", "readout"]
    assert set(model.genes) <= set(ct.io.read_corpus(corpus_dir).genes)
    # the model predicts on a SpatialData as one trained on it would
    test = make_sdata(sections=("T",), seed=9)
    ct.pp.spot_tiles(test, tile_size_um=40, tile_size_px=32)
    ct.tl.predict_expression(test, model, genes=["ERBB2", "KRT19"])
    table = test.tables["table"]
    cols = [table.var_names.get_loc(g) for g in ("ERBB2", "KRT19")]
    assert np.isfinite(table.layers["comtip_pred"][:, cols]).all()


def test_pretrain_corpus_bad_input(corpus_dir, tmp_path):
    with pytest.raises(KeyError, match="Z9"):
        ct.tl.pretrain(corpus_dir, config=ct.CoMTIPConfig.tiny(image_size=32), samples=["A", "Z9"])
    with pytest.raises(ValueError, match="validation"):
        ct.tl.pretrain(corpus_dir, config=ct.CoMTIPConfig.tiny(image_size=32), samples=["A", "B"], validation="C")
    with pytest.raises(FileNotFoundError, match="write_corpus"):
        ct.tl.pretrain(tmp_path, config=ct.CoMTIPConfig.tiny(image_size=32))


def _torchrun(corpus: Path, out: Path, ckpt: Path, *extra: str) -> subprocess.CompletedProcess:
    script = Path(__file__).parent / "scripts" / "ddp_corpus.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    return subprocess.run(
        [*cmd, str(corpus), str(out), "--ckpt", str(ckpt), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _batches(out: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (out / f"rank{rank}.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ddp_two_processes_cover_the_corpus_and_resume(corpus_dir, tmp_path):
    """2 DDP processes (gloo, CPU): disjoint shares that cover every spot once per epoch; a killed run resumes."""
    full = _torchrun(corpus_dir, tmp_path / "full", tmp_path / "ckpt_full")
    assert full.returncode == 0, full.stderr[-3000:]
    per_rank = [_batches(tmp_path / "full", r) for r in range(2)]
    for epoch in (0, 1):
        ids = [{i for b in batches if b["epoch"] == epoch for i in b["ids"]} for batches in per_rank]
        assert not ids[0] & ids[1]  # 108 spots split 54 / 54: no padding needed, disjoint
        assert ids[0] | ids[1] == set(range(108))

    killed = _torchrun(corpus_dir, tmp_path / "killed", tmp_path / "ckpt", "--die-at-batch", "3")
    assert killed.returncode != 0
    assert (tmp_path / "ckpt" / "contrastive-last.ckpt").is_file()
    shutil.rmtree(tmp_path / "killed")
    resumed = _torchrun(corpus_dir, tmp_path / "killed", tmp_path / "ckpt")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr
    # the resumed run trains on the rest of epoch 1 only, and ends where the uninterrupted run ended
    rest = _batches(tmp_path / "killed", 0)
    assert rest and all(b["epoch"] == 1 for b in rest)
    assert [b["ids"] for b in rest] == [b["ids"] for b in per_rank[0] if b["epoch"] == 1][-len(rest) :]
    a = torch.load(tmp_path / "full" / "weights.pt")
    b = torch.load(tmp_path / "killed" / "weights.pt")
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_hest_folder_to_pretrained_model_from_the_command_line(tmp_path, capsys):
    """The path of docs/hest.md: a downloaded HEST-1k subset -> `comtip write-corpus` -> `comtip pretrain` -> a model."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _hest_fixture import write_hest_fixture

    from comtip.cli import main

    root = write_hest_fixture(tmp_path / "hest_data", ("H1", "H2"))
    main(["-q", "write-corpus", str(root), "--out", str(tmp_path / "corpus"), "--shard-size", "32"])
    corpus = ct.io.read_corpus(tmp_path / "corpus")
    assert list(corpus.samples.index) == ["H1", "H2"] and corpus.tile_size_px == 224
    args = ["--config", "tiny", "--max-epochs", "1", "--readout-epochs", "1", "--batch-size", "8", "--n-genes", "30"]
    main(["-q", "pretrain", str(tmp_path / "corpus"), "--out", str(tmp_path / "model"), *args, "--samples", "H1", "H2"])
    model = ct.CoMTIP.load(tmp_path / "model")
    assert model.training_summary["validation_sections"] == ["H2"]
    assert model.training_summary["corpus"] == str(tmp_path / "corpus")
    with pytest.raises(SystemExit, match="corpus folder"):
        main(["-q", "pretrain", str(root), "--out", str(tmp_path / "m2"), "--samples", "H1"])


def test_pretrain_corpus_refuses_a_sample_that_shares_no_gene(tmp_path):
    """A validation sample whose genes are all outside the panel (e.g. another species' symbols) is named, not skipped."""
    sds = _three_samples(drop_gene=None)[:2]
    other = make_sdata(sections=("Z",), seed=5)
    table = other.tables["table"]
    table.var_names = [f"NOTAGENE{i}" for i in range(table.n_vars)]
    sds.append(other)
    ct.pp.write_corpus(sds, tmp_path / "c", tile_size_um=40, tile_size_px=32)
    with pytest.raises(ValueError, match="'Z' .* shares no gene with the panel"):
        ct.tl.pretrain(tmp_path / "c", config=ct.CoMTIPConfig.tiny(), validation="Z", n_genes=20)
