"""Corpora on disk: round trip, append, kill + resume, byte-identical writes, and bad input."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import comtip as ct
from comtip.corpus import CorpusError

from .conftest import make_sdata

TILE = {"tile_size_um": 40, "tile_size_px": 32}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _all_rows(corpus):
    """obs, tiles and dense counts of every row of the corpus, in shard order."""
    obs, tiles, counts = [], [], []
    for i in range(len(corpus.shards)):
        sh = corpus.shard(i)
        rows = np.arange(sh.n)
        obs.append(sh.obs)
        tiles.append(sh.tiles(rows))
        counts.append(sh.counts(rows).toarray())
    return pd.concat(obs, ignore_index=True), np.concatenate(tiles), np.concatenate(counts)


@pytest.fixture
def two():
    """Two synthetic sections S1, S2 (36 spots each) with tiles of 40 µm at 32 px."""
    sd = make_sdata(sections=("S1", "S2"))
    ct.pp.spot_tiles(sd, **TILE)
    return sd


def test_round_trip(two, tmp_path):
    from comtip.data import TileReader

    corpus = ct.pp.write_corpus(two, tmp_path / "c", shard_size=16, **TILE)
    assert isinstance(corpus, ct.Corpus)
    assert corpus.n_spots == 72
    assert list(corpus.samples.index) == ["S1", "S2"]
    assert corpus.samples["n_spots"].tolist() == [36, 36]
    assert corpus.samples["complete"].all()
    assert corpus.shards["n_spots"].tolist() == [16, 16, 16, 16, 8]
    assert corpus.shards.loc["shard-000002", "samples"] == ["S1", "S2"]
    assert (corpus.tile_size_um, corpus.tile_size_px, corpus.mpp) == (40.0, 32, 40 / 32)
    assert corpus.samples.loc["S1", "source_pixel_size_um"] == pytest.approx(1.0)

    obs, tiles, counts = _all_rows(corpus)
    table = two.tables["table"]
    assert obs["obs_name"].tolist() == list(table.obs_names)
    assert obs["sample_id"].tolist() == table.obs["section"].astype(str).tolist()
    assert obs["sample_row"].tolist() == list(range(36)) * 2
    # tiles: what the batched reader gives for the same spots
    frame = pd.DataFrame(two.shapes["comtip_tiles"].drop(columns="geometry")).set_index("obs_name")
    frame = frame.loc[list(table.obs_names)].reset_index()
    expected = TileReader(two, frame).read(np.arange(len(frame))).permute(0, 2, 3, 1).numpy()
    assert tiles.dtype == np.uint8 and tiles.shape == (72, 32, 32, 3)
    np.testing.assert_array_equal(tiles, expected)
    # centres in the image's pixel space (1 µm/px here), next to the tile box centres
    box = np.column_stack([frame["x0"] + frame["size"] / 2, frame["y0"] + frame["size"] / 2])
    np.testing.assert_allclose(obs[["x", "y"]].to_numpy(), box)
    # counts over the union equal the table's raw counts
    raw = pd.DataFrame(table.layers["counts"].toarray(), columns=table.var_names)
    np.testing.assert_array_equal(counts, raw[corpus.genes].to_numpy())
    np.testing.assert_allclose(obs["total_counts"], raw.sum(axis=1))
    assert obs["total_counts"].dtype == np.float32

    # statistics, against a direct computation
    for sid in ("S1", "S2"):
        sub = counts[(obs["sample_id"] == sid).to_numpy()].astype(np.float64)
        norm = np.log1p(1e4 * sub / sub.sum(axis=1, keepdims=True))
        st = corpus.sample_stats(sid)
        det = np.flatnonzero((sub > 0).any(axis=0))
        np.testing.assert_array_equal(st["genes"], det)
        np.testing.assert_array_equal(corpus.sample_genes(sid), det)
        np.testing.assert_array_equal(st["n_detected"], (sub[:, det] > 0).sum(axis=0))
        np.testing.assert_allclose(st["sum"], norm[:, det].sum(axis=0), rtol=1e-10)
        np.testing.assert_allclose(st["sumsq"], (norm[:, det] ** 2).sum(axis=0), rtol=1e-10)
        assert st["n_spots"] == 36
        assert corpus.samples.loc[sid, "n_genes"] == len(det)

    # rows in any order; picklable without open files; opened again cheaply
    sh = corpus.shard("shard-000001")
    np.testing.assert_array_equal(sh.tiles([5, 2, 3]), tiles[[21, 18, 19]])
    assert sparse.isspmatrix_csr(sh.counts([5, 2])) and sh.counts([5, 2]).shape == (2, len(corpus.genes))
    again = pickle.loads(pickle.dumps(corpus))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(sh)).tiles([1]), tiles[[17]])
    np.testing.assert_array_equal(again.shard(4).counts([7]).toarray(), counts[[71]])
    assert ct.io.read_corpus(tmp_path / "c").manifest == corpus.manifest
    corpus.verify()


def test_tiles_computed_and_not_kept(tmp_path):
    sd = make_sdata(sections=("S1",))
    shapes = list(sd.shapes)
    ct.pp.write_corpus(sd, tmp_path / "a", metadata={"species": "Homo sapiens", "organ": "breast"}, **TILE)
    assert list(sd.shapes) == shapes  # nothing left behind
    ct.pp.spot_tiles(sd, **TILE)
    ct.pp.write_corpus(sd, tmp_path / "b", metadata={"S1": {"species": "Homo sapiens", "organ": "breast"}}, **TILE)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")  # the same tiles either way
    samples = ct.io.read_corpus(tmp_path / "a").samples
    assert samples.loc["S1", "species"] == "Homo sapiens" and samples.loc["S1", "organ"] == "breast"
    assert samples.loc["S1", "technology"] is None


def test_deterministic(two, tmp_path):
    ct.pp.write_corpus(two, tmp_path / "a", shard_size=16, **TILE)
    ct.pp.write_corpus(two, tmp_path / "b", shard_size=16, **TILE)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert sorted(a) == sorted(b) and len(a) == 2 * 5 + 2 + 1
    assert a == b


def test_append(tmp_path):
    s1, s2 = make_sdata(sections=("S1",)), make_sdata(sections=("S2",), seed=1)
    t = s2.tables["table"]
    s2.tables["table"] = t[:, [g for g in t.var_names if g != "ERBB2"]].copy()  # S2 lacks a gene
    path = tmp_path / "c"
    first = ct.pp.write_corpus(s1, path, shard_size=16, **TILE)
    before = _files(path / "shards")
    mtimes = {p: p.stat().st_mtime_ns for p in (path / "shards").iterdir()}
    corpus = ct.pp.write_corpus(s2, path, shard_size=16, **TILE)
    assert corpus.shards.index.tolist() == [f"shard-{i:06d}" for i in range(6)]  # S2 starts a new shard
    assert corpus.shards.loc["shard-000003", "samples"] == ["S2"]
    assert corpus.genes[: len(first.genes)] == first.genes
    assert "ERBB2" not in [corpus.genes[i] for i in corpus.sample_genes("S2")]
    after = _files(path / "shards")
    assert all(after[k] == v for k, v in before.items())  # existing shards never rewritten
    assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items())
    # the same samples again: skipped, nothing written
    again = ct.pp.write_corpus([s1, s2], path, shard_size=16, **TILE)
    assert again.manifest == corpus.manifest and _files(path / "shards") == after
    # another sample reusing an id
    other = make_sdata(sections=("S1",), seed=5)
    with pytest.raises(CorpusError, match=r"'S1' is already in corpus.*rename"):
        ct.pp.write_corpus(other, path, **TILE)
    # mode="w" replaces the corpus
    assert ct.pp.write_corpus(other, path, mode="w", **TILE).samples.index.tolist() == ["S1"]


def test_kill_and_resume(two, tmp_path, monkeypatch):
    from comtip.corpus import _write

    real = _write._write_shard
    calls = []

    def dies_on_third(root, name, tiles, rows):
        calls.append(name)
        if len(calls) == 3:
            (root / "shards" / f"{name}.tiles.npy.tmp").write_bytes(b"half a shard")
            msg = "killed"
            raise KeyboardInterrupt(msg)
        return real(root, name, tiles, rows)

    monkeypatch.setattr(_write, "_write_shard", dies_on_third)
    path = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        ct.pp.write_corpus(two, path, shard_size=16, **TILE)
    monkeypatch.setattr(_write, "_write_shard", real)
    killed = ct.io.read_corpus(path)  # a readable corpus of the finished shards
    assert killed.shards.index.tolist() == ["shard-000000", "shard-000001"]
    assert killed.n_spots == 32
    assert killed.samples.loc["S1", "n_spots"] == 32 and not killed.samples.loc["S1", "complete"]
    assert killed.sample_stats("S1")["n_spots"] == 36  # statistics of the whole sample
    assert killed.shard(1).tiles([15]).shape == (1, 32, 32, 3)
    killed.verify()
    # the same call again completes it, as if never interrupted
    done = ct.pp.write_corpus(two, path, shard_size=16, **TILE)
    assert done.samples["complete"].all() and done.n_spots == 72
    ct.pp.write_corpus(two, tmp_path / "whole", shard_size=16, **TILE)
    assert _files(path) == _files(tmp_path / "whole")


def test_corrupt_shards(two, tmp_path):
    path = tmp_path / "c"
    ct.pp.write_corpus(two, path, shard_size=16, **TILE)
    tiles1 = path / "shards" / "shard-000001.tiles.npy"
    # flipped byte, same size: only the checksum sees it
    data = bytearray(tiles1.read_bytes())
    data[-1] ^= 0xFF
    tiles1.write_bytes(bytes(data))
    corpus = ct.io.read_corpus(path)
    corpus.shard(1).tiles([0])
    with pytest.raises(CorpusError, match=r"shard-000001.*checksum"):
        corpus.verify()
    # truncated: the size check when the shard is opened
    tiles1.write_bytes(bytes(data[:-100]))
    with pytest.raises(CorpusError, match=r"shard-000001.*bytes.*re-run the same ct.pp.write_corpus"):
        ct.io.read_corpus(path).shard(1).tiles([0])
    # missing
    tiles1.unlink()
    with pytest.raises(CorpusError, match=r"shard-000001.*missing"):
        ct.io.read_corpus(path).shard(1).tiles([0])
    with pytest.raises(CorpusError, match=r"shard-000001.*missing"):
        ct.io.read_corpus(path).verify()
    rows2 = path / "shards" / "shard-000002.rows.npz"
    rows2.write_bytes(rows2.read_bytes()[:50])
    with pytest.raises(CorpusError, match=r"shard-000002"):
        _ = ct.io.read_corpus(path).shard(2).obs
    (path / "samples" / "S2.npz").unlink()
    with pytest.raises(CorpusError, match=r"sample 'S2'.*missing"):
        ct.io.read_corpus(path).sample_stats("S2")


def test_manifest_mismatch(two, tmp_path):
    path = tmp_path / "c"
    ct.pp.write_corpus(two, path, shard_size=16, **TILE)
    good = json.loads((path / "manifest.json").read_text())

    def with_manifest(change):
        m = json.loads(json.dumps(good))
        change(m)
        (path / "manifest.json").write_text(json.dumps(m))

    with_manifest(lambda m: m["shards"][1].update(n_spots=15))
    with pytest.raises(CorpusError, match=r"shard-000001.*15 spots.*does not match"):
        ct.io.read_corpus(path)
    with_manifest(lambda m: m["shards"].pop())  # a shard dropped from the manifest
    with pytest.raises(CorpusError, match=r"spots but its shards hold"):
        ct.io.read_corpus(path)
    with_manifest(lambda m: m["shards"][0].update(samples=["S1", "S9"]))
    with pytest.raises(CorpusError, match=r"sample 'S9'"):
        ct.io.read_corpus(path)
    with_manifest(lambda m: m.update(version=99))
    with pytest.raises(CorpusError, match="version 99"):
        ct.io.read_corpus(path)
    with pytest.raises(CorpusError, match="manifest.json is missing"):
        ct.io.read_corpus(tmp_path)


def test_bad_input(two, tmp_path):
    path = tmp_path / "c"
    ct.pp.write_corpus(two, path, shard_size=16, **TILE)
    # another pixel size: appending to the corpus, or tiles of the SpatialData
    with pytest.raises(CorpusError, match=r"40 µm at 32 px.*tile_size_px=32"):
        ct.pp.write_corpus(make_sdata(sections=("S3",)), path, tile_size_um=40, tile_size_px=48)
    with pytest.raises(CorpusError, match=r"Sample 'S1' has tiles of 40 µm at 32 px.*overwrite=True"):
        ct.pp.write_corpus(two, tmp_path / "other", tile_size_um=40, tile_size_px=48)
    # duplicated sample ids
    with pytest.raises(CorpusError, match=r"'S1' appears twice"):
        ct.pp.write_corpus([two, make_sdata(sections=("S1",))], tmp_path / "dup", **TILE)
    # a sample without tiles (its image is gone: a count-only section)
    sd = make_sdata(sections=("S1", "S2"))
    del sd.images["S2_he"]
    with pytest.raises(CorpusError, match=r"Sample 'S2' has no tiles"):
        ct.pp.write_corpus(sd, tmp_path / "notiles", **TILE)
    # a sample without any count
    sd = make_sdata(sections=("S1", "S2"))
    counts = sd.tables["table"].layers["counts"].tolil()
    counts[36:] = 0
    sd.tables["table"].layers["counts"] = counts.tocsr()
    with pytest.raises(CorpusError, match=r"Sample 'S2' has no gene with a count above 0"):
        ct.pp.write_corpus(sd, tmp_path / "zeros", **TILE)
    # no raw counts
    sd = make_sdata(sections=("S1",))
    del sd.tables["table"].layers["counts"]
    sd.tables["table"].uns["comtip_input"] = {"x_is_counts": False}
    with pytest.raises(CorpusError, match=r"no raw counts.*layer="):
        ct.pp.write_corpus(sd, tmp_path / "lognorm", **TILE)
    # no section column, a folder that is not a corpus, a bad mode
    sd = make_sdata(sections=("S1",))
    del sd.tables["table"].obs["section"]
    with pytest.raises(CorpusError, match=r"obs\['section'\]"):
        ct.pp.write_corpus(sd, tmp_path / "nosection", **TILE)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(CorpusError, match="not a comtip corpus"):
        ct.pp.write_corpus(two, tmp_path / "busy", **TILE)
    with pytest.raises(ValueError, match="mode"):
        ct.pp.write_corpus(two, tmp_path / "m", mode="x", **TILE)
    # nothing was written by the refused calls; the corpus is as it was
    for name in ("other", "dup", "notiles", "zeros", "lognorm", "nosection", "m"):
        assert not (tmp_path / name).exists()
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine" and len(list((tmp_path / "busy").iterdir())) == 1
    ct.io.read_corpus(path).verify()


def test_hest_sources(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from _hest_fixture import write_hest_fixture

    root = write_hest_fixture(tmp_path / "hest", ("H1", "H2"))
    path = tmp_path / "c"
    sd = make_sdata(sections=("S1",), n_side=3, spacing_um=150)  # tiles as HEST's: 112 µm at 224 px
    corpus = ct.pp.write_corpus([sd, (root, "H2")], path, tile_size_um=112, tile_size_px=224)
    assert corpus.samples.index.tolist() == ["S1", "H2"]
    h2 = corpus.samples.loc["H2"]
    assert h2["source"].startswith("hest:")
    assert h2["n_spots"] == 44  # the fixture's patch file lacks the last of the 45 spots: left out, with a warning
    assert h2["species"] == json.loads((root / "metadata" / "H2.json").read_text()).get("species")
    # a HEST folder: all its samples; H2 is already there and identical
    corpus = ct.pp.write_corpus(root, path, tile_size_um=112, tile_size_px=224)
    assert corpus.samples.index.tolist() == ["S1", "H2", "H1"]
    sh = corpus.shard(corpus.samples.loc["H1", "shards"][0])
    assert sh.tiles([0]).shape == (1, 224, 224, 3)
    corpus.verify()
