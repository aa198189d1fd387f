"""ct.datasets.her2st knows the whole public repository: 36 sections, an image each, git blob SHA-1 checks."""

from __future__ import annotations

import hashlib
import re
import shutil

import numpy as np
import pandas as pd
import pytest

import comtip as ct
from comtip import _constants as C
from comtip.datasets import _download, _her2st
from comtip.datasets._registry import HER2ST_FILES, RemoteFile, local_name


def _blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def test_registry_has_36_sections_with_an_image_each():
    sections = ct.datasets.HER2ST_SECTIONS
    patients = {"A": 6, "B": 6, "C": 6, "D": 6, "E": 3, "F": 3, "G": 3, "H": 3}
    assert len(sections) == 36
    assert {p: sum(s[0] == p for s in sections) for p in patients} == patients
    images = ct.datasets.HER2ST_IMAGES
    assert sorted(images) == sorted(sections)
    for s in sections:
        for rel in (f"ST-cnts/{s}.tsv.gz", f"ST-spotfiles/{s}_selection.tsv", images[s]):
            assert rel in HER2ST_FILES, rel
            assert re.fullmatch(r"[0-9a-f]{40}", HER2ST_FILES[rel].git_sha1), rel
        assert images[s].startswith(f"ST-imgs/{s}_") and images[s].endswith(".jpg")
        assert HER2ST_FILES[images[s]].remote == f"data/ST-imgs/{s[0]}/{s}/{images[s].split('_', 1)[1]}"
    assert all(images[f"A{i}"].endswith("_HE_small.jpg") for i in range(1, 7))
    assert local_name("data/ST-pat/lbl/B1_labeled_coordinates.tsv") == "ST-pat-lbl/B1_labeled_coordinates.tsv"
    assert ct.datasets.HER2ST_IMAGED == ("C2", "C3", "C4", "C5", "C6")  # the default sections are unchanged


def test_git_blob_sha1_is_gits(tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert _download.git_blob_sha1(empty) == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # `git hash-object` of ""
    hello = tmp_path / "hello"
    hello.write_bytes(b"hello\n")
    assert _download.git_blob_sha1(hello) == "ce013625030ba8dba906f756967f9e9ca394464a"


@pytest.mark.realdata
def test_listing_matches_the_local_files(her2st_dir):
    for rel in ("ST-imgs/C2_5714_HE_BT_C2.jpg", "ST-cnts/C2.tsv.gz", "ST-spotfiles/C6_selection.tsv"):
        path = her2st_dir / "her2st" / rel
        entry = HER2ST_FILES[rel]
        assert path.stat().st_size == entry.size
        _download.check_git_sha1(path, entry.git_sha1, size=entry.size)


@pytest.fixture
def fake_download(monkeypatch):
    """``_download`` writes the bytes of ``served[url]`` instead of downloading; requested URLs are recorded."""
    served: dict[str, bytes] = {}

    def download(url, dest, *, known_hash):
        dest.write_bytes(served[url])

    monkeypatch.setattr(_download, "_download", download)
    return served


def test_download_checked_by_git_sha1(tmp_path, monkeypatch, fake_download):
    rel = "ST-pat-lbl/Z9_labeled_coordinates.tsv"
    good = b"x\ty\tlabel\n1\t2\ttumour\n"
    monkeypatch.setitem(
        HER2ST_FILES, rel, RemoteFile("data/ST-pat/lbl/Z9_labeled_coordinates.tsv", _blob_sha1(good), len(good))
    )
    url = _her2st._remote(rel)
    assert url.endswith("/85df7411/data/ST-pat/lbl/Z9_labeled_coordinates.tsv")
    dest = tmp_path / "her2st" / rel

    fake_download[url] = good[:-1] + b"X"  # same size, one byte changed
    with pytest.raises(ValueError, match=r"git blob SHA-1 [0-9a-f]{40}, not the published .*corrupted"):
        _her2st._her2st_file(tmp_path, rel, download=True)
    assert not dest.exists() and not dest.with_name(dest.name + ".part").exists()

    fake_download[url] = good[:10]  # truncated
    with pytest.raises(
        ValueError, match=rf"Z9_labeled_coordinates.tsv from .* has 10 bytes, not the {len(good)} of the published file"
    ):
        _her2st._her2st_file(tmp_path, rel, download=True)
    assert not dest.exists()

    fake_download[url] = good
    assert _her2st._her2st_file(tmp_path, rel, download=True) == dest
    assert dest.read_bytes() == good
    assert _her2st._her2st_file(tmp_path, rel, download=False) == dest  # now local: no download
    assert _her2st._her2st_file(tmp_path, "ST-cnts/B1.tsv.gz", download=False) is None


@pytest.mark.realdata
def test_b1_is_downloaded_with_its_image(data_dir, tmp_path, monkeypatch):
    """B1 (no file of patient B in the data folder) is read from files the mocked downloader serves: counts, spots,
    labels and its H&E image (here the her2st_tiny crop, 1.376 µm/px, whose scale is fitted from the spot file)."""
    tiny = data_dir / "her2st_tiny"
    spots = pd.read_csv(tiny / "spots.tsv", sep="\t", index_col=0).rename(columns={"array_x": "x", "array_y": "y"})
    spots["selected"] = 1
    requested = []

    def fetch(url, dest, *, known_hash, git_sha1=None, size=None):
        requested.append((url, git_sha1))
        dest.parent.mkdir(parents=True, exist_ok=True)
        if url.endswith("ST-cnts/B1.tsv.gz"):
            shutil.copy(tiny / "counts.tsv.gz", dest)
        elif url.endswith("ST-spotfiles/B1_selection.tsv"):
            spots.to_csv(dest, sep="\t", index=False)
        elif url.endswith("ST-imgs/B/B1/BT10737_C1_HE.jpg"):
            shutil.copy(tiny / "C2_crop_HE.jpg", dest)
        elif url.endswith("ST-pat/lbl/B1_labeled_coordinates.tsv"):
            pd.DataFrame({"x": spots["x"][:3], "y": spots["y"][:3], "label": "invasive cancer"}).to_csv(dest, sep="\t")
        else:
            raise AssertionError(url)
        return dest

    monkeypatch.setattr(_her2st, "fetch", fetch)
    sdata = ct.datasets.her2st(["B1"], data_dir=tmp_path)
    assert {u.rsplit("/85df7411/", 1)[1] for u, _ in requested} == {
        "data/ST-cnts/B1.tsv.gz",
        "data/ST-spotfiles/B1_selection.tsv",
        "data/ST-imgs/B/B1/BT10737_C1_HE.jpg",
        "data/ST-pat/lbl/B1_labeled_coordinates.tsv",
    }
    assert all(re.fullmatch(r"[0-9a-f]{40}", sha) for _, sha in requested)  # every download is checked
    assert set(sdata.images) == {"B1_he"} and set(sdata.shapes) == {"B1_spots"}
    table = sdata.tables[C.TABLE_KEY]
    assert table.n_obs == 49 and set(table.obs[C.SECTION_KEY]) == {"B1"}
    assert (table.obs["label"] == "invasive cancer").sum() == 3
    mpp = _her2st._section_mpp("B1", spots)
    assert np.isclose(mpp, 1.376, rtol=0.03), mpp
    with pytest.raises(FileNotFoundError, match=r"'B2': files missing .*download=False"):
        ct.datasets.her2st(["B2"], data_dir=tmp_path, download=False)


@pytest.mark.realdata
def test_count_only_without_download(her2st_dir):
    sdata = ct.datasets.her2st(["A1"], data_dir=her2st_dir, download=False)  # image not in the folder
    assert not sdata.images and set(sdata.shapes) == {"A1_spots"}
    from comtip.io._st import read_st_spots

    a1 = read_st_spots(her2st_dir / "her2st" / "ST-spotfiles" / "A1_selection.tsv", section="A1")
    assert 0.85 < _her2st._section_mpp("A1", a1) < 0.98  # patient A's images are downscaled


def test_images_of_some_sections_only(her2st_dir):
    """Imaged training sections plus count-only ones (gene-side pretraining), nothing downloaded."""
    sdata = ct.datasets.her2st(["C2", "A1"], data_dir=her2st_dir, images=["C2"])
    assert set(sdata.images) == {"C2_he"}
    assert set(sdata.tables["table"].obs["section"].astype(str)) == {"C2", "A1"}
    with pytest.raises(ValueError, match="add them to sections"):
        ct.datasets.her2st(["C2"], data_dir=her2st_dir, images=["C3"])
