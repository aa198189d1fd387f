"""Shared fixtures: the real data folder (skipped with a reason when absent) and tiny synthetic data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import comtip as ct

os.environ.setdefault("MPLBACKEND", "agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _quiet_settings(tmp_path_factory):
    """No progress bars in tests, a private cache folder, and no current model leaking between tests."""
    ct.settings.show_progress_bar = False
    old_model = ct.settings.model
    yield
    ct.settings._model = old_model


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    # gene-text embeddings are cached per session, not in the user's home
    if "COMTIP_CACHE_DIR" not in os.environ:
        ct.settings.cache_dir = tmp_path_factory.mktemp("comtip_cache")
    return


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``$COMTIP_DATA_DIR`` (CI: ``../shared/data``); tests that need it are skipped when it is absent."""
    env = os.environ.get("COMTIP_DATA_DIR")
    if not env:
        default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
        env = str(default) if default.is_dir() else ""
    if not env or not Path(env).is_dir():
        pytest.skip("real data not available: set COMTIP_DATA_DIR to comtip's data folder (CI: ../shared/data)")
    return Path(env)


@pytest.fixture(scope="session")
def her2st_dir(data_dir) -> Path:
    path = data_dir / "her2st"
    if not (path / "ST-cnts" / "C2.tsv.gz").is_file():
        pytest.skip(f"HER2ST not found under {data_dir}")
    return data_dir


@pytest.fixture
def rng():
    return np.random.default_rng(0)


SYNTHETIC_GENES = [
    "ERBB2", "KRT19", "ACTB", "GAPDH", "COL1A1", "FN1", "MGP", "SCGB2A2", "IGKC", "CD74",
    "TFF3", "FASN", "PTPRC", "CD3E", "EPCAM", "VIM", "MKI67", "ESR1", "PGR", "KRT8",
    "KRT18", "TAGLN", "ACTA2", "LUM", "DCN", "POSTN", "SPARC", "CD68", "LYZ", "MUC1",
]  # fmt: skip


def make_sdata(
    *, n_side: int = 6, sections: tuple[str, ...] = ("S1",), mpp: float = 1.0, spacing_um: float = 60.0, seed: int = 0
):
    """Tiny synthetic SpatialData through comtip's own reader: a textured RGB image per section, spots on a grid,
    Poisson counts of real gene symbols whose rates follow the image's colour under each spot."""
    import pandas as pd

    from comtip.io import read_st
    from comtip.io._utils import combine_sections

    rng = np.random.default_rng(seed)
    parts = []
    for s_i, section in enumerate(sections):
        size = int((n_side + 1) * spacing_um / mpp)
        yy, xx = np.mgrid[0:size, 0:size]
        img = np.stack(
            [
                128 + 100 * np.sin(xx / (17 + s_i)) * np.cos(yy / 23),
                128 + 100 * np.cos(xx / 31) * np.sin(yy / (13 + s_i)),
                128 + 60 * np.sin((xx + yy) / 19),
            ],
            axis=-1,
        )
        img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
        px = (np.arange(n_side) + 0.75) * spacing_um / mpp
        gx, gy = np.meshgrid(px, px)
        spots = pd.DataFrame({"x": np.repeat(np.arange(n_side), n_side), "y": np.tile(np.arange(n_side), n_side)})
        spots["pixel_x"] = gx.T.ravel()
        spots["pixel_y"] = gy.T.ravel()
        spots.index = [f"{x}x{y}" for x, y in zip(spots["x"], spots["y"], strict=True)]
        r = int(20 / mpp)
        feats = np.array(
            [
                img[int(y) - r : int(y) + r, int(x) - r : int(x) + r].mean(axis=(0, 1)) / 255
                for x, y in zip(spots["pixel_x"], spots["pixel_y"], strict=True)
            ]
        )
        w = rng.normal(0, 2.0, (3, len(SYNTHETIC_GENES)))
        rate = np.exp(1.5 + (feats - 0.5) @ w)
        counts = rng.poisson(rate)
        cnt = pd.DataFrame(counts, index=spots.index, columns=SYNTHETIC_GENES)
        import tempfile
        from pathlib import Path

        from PIL import Image

        tmp = Path(tempfile.mkdtemp(prefix="comtip_synth_"))
        Image.fromarray(img).save(tmp / f"{section}.png")
        one = read_st(
            cnt, spots, tmp / f"{section}.png", section=section, mpp=mpp, spot_diameter_um=40, spot_pitch_um=spacing_um
        )
        table = one.tables["table"].copy()
        table.uns.pop("spatialdata_attrs", None)
        parts.append((dict(one.images), dict(one.shapes), table, section))
    return combine_sections(parts)


@pytest.fixture
def sdata():
    """Two synthetic sections (36 spots each), tiles computed at 32 px."""
    sd = make_sdata(sections=("S1", "S2"))
    ct.pp.spot_tiles(sd, tile_size_um=40, tile_size_px=32)
    return sd


@pytest.fixture
def sdata_factory():
    """``make_sdata`` itself, for tests that need other sizes or pixel sizes."""
    return make_sdata


@pytest.fixture(scope="session")
def trained():
    """A tiny CoMTIP pretrained on three synthetic sections (two train, one validation), and a held-out section.

    Session-scoped: tests must not modify the model (use copy.deepcopy) nor the returned training SpatialData.
    """
    ct.settings.show_progress_bar = False
    train = make_sdata(sections=("S1", "S2", "S3"))
    ct.pp.spot_tiles(train, tile_size_um=40, tile_size_px=64)
    model = ct.tl.pretrain(
        train,
        config=ct.CoMTIPConfig.tiny(),
        max_epochs=2,
        readout_epochs=2,
        readout_refit=True,  # not the default; on here so that every stage runs
        batch_size=16,
        n_genes=30,
        seed=0,
    )
    return model, train


@pytest.fixture
def test_sdata():
    """A fresh held-out synthetic section with tiles (64 px, 40 µm), as the tiny model was trained on."""
    sd = make_sdata(sections=("T1",), seed=7)
    ct.pp.spot_tiles(sd, tile_size_um=40, tile_size_px=64)
    return sd


@pytest.fixture
def visium_adata(test_sdata):
    """The spots of ``test_sdata`` as a scanpy Visium-style AnnData (``uns['spatial']`` with the H&E, full-res px)."""
    import anndata as ad
    import pandas as pd

    from comtip._images import level_arrays

    t = test_sdata.tables["table"]
    g = test_sdata.shapes["T1_spots"].geometry
    img = np.moveaxis(np.asarray(level_arrays(test_sdata.images["T1_he"])[0].data), 0, -1)
    adata = ad.AnnData(
        X=t.layers["counts"].copy(),
        obs=pd.DataFrame(index=[f"spot{i}" for i in range(t.n_obs)]),
        var=pd.DataFrame(index=t.var_names),
    )
    adata.obsm["spatial"] = np.column_stack([g.x, g.y])
    adata.uns["spatial"] = {
        "T1": {"images": {"hires": img}, "scalefactors": {"tissue_hires_scalef": 1.0, "spot_diameter_fullres": 55.0}}
    }
    return adata
