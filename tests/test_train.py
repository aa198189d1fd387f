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
