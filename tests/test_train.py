"""Training: DDP replicas stay identical, an interrupted run resumes to the same weights, samplers and views."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from comtip.train import EpochSampler

SCRIPT = Path(__file__).parent / "scripts" / "pretrain_tiny.py"


def _env():
    env = dict(os.environ)
    env.setdefault("COMTIP_CACHE_DIR", str(Path(os.environ.get("TMPDIR", "/tmp")) / "comtip_test_cache"))
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(args, **kw):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=_env(), capture_output=True, text=True, timeout=600, **kw
    )


def test_epoch_sampler_shards_and_reshuffles():
    a = EpochSampler(10, seed=1, num_replicas=2, rank=0)
    b = EpochSampler(10, seed=1, num_replicas=2, rank=1)
    first = sorted([i % 10 for i in a] + [i % 10 for i in b])
    assert first == list(range(10))  # disjoint shards covering every sample
    e0 = list(a)
    a.set_epoch(1)
    e1 = list(a)
    assert all(i >= 10 for i in e1)  # the epoch travels with the index
    assert [i % 10 for i in e1] != [i % 10 for i in e0]
    c = EpochSampler(10, seed=1, num_replicas=2, rank=0)
    assert list(c) == e0  # same seed, same order


@pytest.mark.slow
def test_ddp_two_processes_keep_replicas_identical(tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29500 + os.getpid() % 400),
        str(SCRIPT),
        str(out),
        "--devices",
        "2",
        "--epochs",
        "1",
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["devices"] == 2
    assert ranks[0]["steps"] == ranks[1]["steps"] > 0
    assert ranks[0]["checksum"] == ranks[1]["checksum"]


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_gives_the_same_weights(tmp_path):
    ref = _run([str(tmp_path / "ref"), "--epochs", "3"])
    assert ref.returncode == 0, ref.stderr[-3000:]
    expected = json.loads((tmp_path / "ref" / "rank0.json").read_text())

    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(tmp_path / "run"), "--epochs", "3", "--checkpoint-dir", str(ckpt)],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = ckpt / "contrastive-last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert last.exists(), "no checkpoint was written"
    time.sleep(0.3)  # into the next epoch
    assert proc.poll() is None, "training ended before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "rank0.json").exists()

    resumed = _run([str(tmp_path / "run"), "--epochs", "3", "--checkpoint-dir", str(ckpt)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = json.loads((tmp_path / "run" / "rank0.json").read_text())
    assert got["resumed_from"] is not None
    assert got["steps"] == expected["steps"]
    assert got["history"] == expected["history"] == 3 + 1  # contrastive epochs + the read-out epoch
    assert got["checksum"] == expected["checksum"]


def test_prefix_feature_cache_matches_the_tower(trained):
    import copy

    import torch

    from comtip.data import SpotDataset
    from comtip.train import PrefixFeatureDataset

    model = copy.deepcopy(trained[0])
    _, sd = trained
    ds = SpotDataset(sd, genes=model.genes, sentence_length=8)
    cached = PrefixFeatureDataset(ds, model, augment=False)
    assert cached.features.shape[:2] == (len(ds), 1)
    with torch.no_grad():
        direct = model.image.forward_prefix(ds.images([0, 1]))
    torch.testing.assert_close(cached.features[:2, 0], direct)
    item = cached[3]
    assert "image" not in item
    assert item["image_prefix"].shape == direct.shape[1:]
    assert np.asarray(item["gene_idx"]).shape == (8,)


def _tiny_model():
    import torch

    import comtip as ct

    torch.manual_seed(0)
    genes = [f"GENE{i}" for i in range(6)]
    text = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    levels = torch.linspace(0, 3, 4).repeat(6, 1)
    return ct.CoMTIP(ct.CoMTIPConfig.tiny(), genes, text, levels)


def test_sync_batchnorm_keeps_the_activations_of_timm_norm_act_layers(monkeypatch):
    import copy
    from types import SimpleNamespace

    import torch
    from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
    from timm.layers import BatchNormAct2d

    from comtip.train import _fit
    from comtip.train._module import CoMTIPModule, convert_sync_batchnorm, revert_sync_batchnorm

    model = _tiny_model().eval()
    n_act = sum(isinstance(m, BatchNormAct2d) and not isinstance(m.act, torch.nn.Identity) for m in model.modules())
    assert n_act > 0
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = model.encode_image(x)
        # Lightning's sync_batchnorm=True turns BatchNormAct2d into a plain SyncBatchNorm: the activations are gone
        lightning = TorchSyncBatchNorm().apply(copy.deepcopy(model))
        assert not torch.allclose(lightning.encode_image(x), ref, atol=1e-4)
        # the conversion fit() uses under DDP on GPUs (SyncBatchNorm runs on CPU in eval mode) keeps them
        converted = convert_sync_batchnorm(model)
        assert len(converted) >= n_act
        assert not any(type(m) is BatchNormAct2d for m in model.modules())
        torch.testing.assert_close(model.encode_image(x), ref)
        revert_sync_batchnorm(converted)
        assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
        torch.testing.assert_close(model.encode_image(x), ref)

    # the module converts in setup() only for multi-process GPU training, and puts the layers back in teardown()
    module = CoMTIPModule(model)
    for world, device, expect in [(2, "cuda", True), (1, "cuda", False), (2, "cpu", False)]:
        module._trainer = SimpleNamespace(world_size=world, strategy=SimpleNamespace(root_device=torch.device(device)))
        module.setup("fit")
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()) is expect
        module.teardown("fit")
        assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())

    # and fit() no longer asks Lightning for its sync_batchnorm, even with CUDA present
    class Stop(Exception):
        pass

    def trainer(**kwargs):
        assert not kwargs["sync_batchnorm"]
        raise Stop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("lightning.pytorch.Trainer", trainer)
    with pytest.raises(Stop):
        _fit.fit(model, list(range(8)), batch_size=4, precision="32-true", show_progress_bar=False)


# ------------------------------------------------------------------ training settings, data prepared once, checkpoints
def test_train_config_defaults_overrides_and_errors(sdata):
    import comtip as ct
    from comtip.tl._pretrain import training_settings
    from comtip.train import TrainConfig

    tc = TrainConfig()
    assert (tc.max_epochs, tc.batch_size, tc.lr, tc.readout_epochs, tc.readout_refit) == (20, 32, 1e-3, 30, False)
    # flat keywords override the fields of training=, without a warning
    base = TrainConfig(max_epochs=5, batch_size=16)
    got = training_settings(base, {"max_epochs": 2, "seed": 3})
    assert (got.max_epochs, got.batch_size, got.seed) == (2, 16, 3)
    assert base.max_epochs == 5  # not modified
    with pytest.raises(TypeError, match=r"max_epoch.*TrainConfig: max_epochs"):
        ct.tl.pretrain(sdata, config=ct.CoMTIPConfig.tiny(), max_epoch=1)  # refused before any work
    with pytest.raises(TypeError, match="TrainConfig"):
        ct.tl.pretrain(sdata, training={"max_epochs": 1})
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(TypeError, match="Unknown training setting"):
        tc.replace(epochs=3)


def test_train_config_and_flat_keywords_train_alike(sdata):
    import comtip as ct
    from comtip.train import TrainConfig

    kw = {"config": ct.CoMTIPConfig.tiny(), "n_genes": 30, "validation": None}
    flat = ct.tl.pretrain(sdata, max_epochs=1, readout_epochs=0, batch_size=16, accelerator="cpu", seed=2, **kw)
    grouped = ct.tl.pretrain(
        sdata, training=TrainConfig(max_epochs=1, readout_epochs=0, batch_size=16, accelerator="cpu", seed=2), **kw
    )
    assert flat.weights_checksum() == grouped.weights_checksum()


def test_pretrain_prepares_each_spot_and_tile_once(sdata_factory, monkeypatch):
    """One SpotDataset for the training + validation spots (tiles read once), one for the count-only spots."""
    import warnings

    import comtip as ct
    from comtip.data import SpotDataset, TileReader

    sd = sdata_factory(sections=("S1", "S2", "S3", "S4"))
    ct.pp.spot_tiles(sd, tile_size_um=40, tile_size_px=64)
    del sd.images["S4_he"]  # S4: count-only
    builds, rows_read = [], []
    init, read = SpotDataset.__init__, TileReader.read

    def counting_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        builds.append(list(self.obs_names))

    def counting_read(self, rows, **kwargs):
        rows_read.extend(int(r) for r in np.asarray(rows))
        return read(self, rows, **kwargs)

    monkeypatch.setattr(SpotDataset, "__init__", counting_init)
    monkeypatch.setattr(TileReader, "read", counting_read)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = ct.tl.pretrain(
            sd,
            config=ct.CoMTIPConfig.tiny(),
            gene_pretrain_epochs=1,
            max_epochs=1,
            readout_epochs=1,
            readout_refit=True,  # every view: genes, train, validation, augmented validation, train + validation
            batch_size=16,
            n_genes=30,
            accelerator="cpu",
            seed=0,
        )
    s = model.training_summary
    assert s["count_only_sections"] == ["S4"] and s["stages"][-1]["stage"] == "readout_refit"
    assert len(builds) == 2
    assert len(builds[0]) == s["n_train_spots"] + s["n_val_spots"] and len(builds[1]) == 36
    assert not set(builds[0]) & set(builds[1])  # each spot normalised once
    assert sorted(rows_read) == list(range(len(builds[0])))  # each tile read once (reference included)


def test_spot_dataset_views_match_datasets_of_their_own(sdata):
    import torch

    from comtip.data import SpotDataset

    panel = list(sdata.tables["table"].var_names[:20])
    names = list(sdata.tables["table"].obs_names)
    base = SpotDataset(sdata, genes=panel, sentence_length=8, obs_names=names, cache_tiles=True)
    pos = np.arange(40, 10, -3)
    view = base.subset(pos, augment=True, seed=5)
    alone = SpotDataset(sdata, genes=panel, sentence_length=8, obs_names=[names[i] for i in pos], augment=True, seed=5)
    for ds in (view, alone):
        ds.set_epoch(2)
    a, b = view.__getitems__([0, 4, 7]), alone.__getitems__([0, 4, 7])
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=0)
    np.testing.assert_array_equal(view.tile_read_order(), alone.tile_read_order())
    genes = view.subset([1, 2], images=False)
    assert "image" not in genes[0] and genes.reader is None and view.reader is not None
    both = SpotDataset.concat([genes, base.subset([0])])
    assert list(both.obs_names) == [names[pos[1]], names[pos[2]], names[0]]
    np.testing.assert_array_equal(both.expr[2], base.expr[0])


def test_atomic_checkpoint_io_keeps_the_last_good_file(tmp_path, monkeypatch):
    import torch

    from comtip.train import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "ckpt" / "contrastive-last.ckpt"
    io.save_checkpoint({"epoch": 1, "w": torch.arange(3)}, path)
    real_save = torch.save

    def killed_mid_write(obj, f, *args, **kwargs):
        f.write(b"partial bytes of a checkpoint")
        raise KeyboardInterrupt  # e.g. the job's time is up

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"epoch": 2, "w": torch.arange(5)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    kept = torch.load(path, weights_only=True)
    assert kept["epoch"] == 1 and torch.equal(kept["w"], torch.arange(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["contrastive-last.ckpt"]  # no temporary file left


def test_fit_writes_through_the_atomic_io_and_skips_non_finite_best(monkeypatch):
    from types import SimpleNamespace

    import torch

    from comtip.train import AtomicCheckpointIO, BestCheckpoint, _fit

    class Stop(Exception):
        pass

    def trainer(**kwargs):
        assert any(isinstance(p, AtomicCheckpointIO) for p in kwargs["plugins"])
        raise Stop

    monkeypatch.setattr("lightning.pytorch.Trainer", trainer)
    with pytest.raises(Stop):
        _fit.fit(_tiny_model(), list(range(8)), batch_size=4, precision="32-true", show_progress_bar=False)

    # an epoch whose monitored value is NaN or missing is never kept as the best
    best = BestCheckpoint("/nonexistent", stage="contrastive", monitor="val/recall5")
    called = []
    monkeypatch.setattr("lightning.pytorch.callbacks.ModelCheckpoint.on_train_epoch_end", lambda *a: called.append(1))
    strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: decision)
    for metrics in ({"val/recall5": torch.tensor(float("nan"))}, {}, {"val/recall5": torch.tensor(0.5)}):
        best.on_train_epoch_end(SimpleNamespace(callback_metrics=metrics, strategy=strategy), None)
    assert called == [1]


def test_best_epoch_is_restored_and_set_data_is_deprecated(sdata, tmp_path):
    import torch

    import comtip as ct
    from comtip.data import SpotDataset
    from comtip.train import fit
    from comtip.train._module import CoMTIPModule

    genes = list(sdata.tables["table"].var_names[:12])
    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(len(genes), 8), dim=1)
    model = ct.CoMTIP(ct.CoMTIPConfig.tiny(), genes, text, torch.linspace(0, 3, 4).repeat(len(genes), 1))
    ds = SpotDataset(sdata, genes=genes, sentence_length=8, cache_tiles=True)
    train, val = ds.subset(np.arange(48), augment=True), ds.subset(np.arange(48, 72))
    summary = fit(
        model,
        train,
        val,
        max_epochs=3,
        batch_size=16,
        lr=1e-3,
        accelerator="cpu",
        checkpoint_dir=tmp_path,
        show_progress_bar=False,
        monitor="val/recall5",
    )
    recall = [h["val_recall5"] for h in model.history]
    assert summary["best_epoch"] == int(np.argmax(recall)) and summary["best_value"] == round(max(recall), 4)
    assert {p.name for p in tmp_path.iterdir()} == {"contrastive-last.ckpt", "contrastive-best.ckpt"}
    best = torch.load(tmp_path / "contrastive-best.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(v, best[f"model.{k}"].to(v.device)) for k, v in model.state_dict().items())

    module = CoMTIPModule(model)
    with pytest.warns(DeprecationWarning, match="CoMTIPDataModule"):
        module.set_data(train, val, batch_size=16)
    assert len(module.train_dataloader()) == 3
