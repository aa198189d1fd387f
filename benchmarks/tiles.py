"""Tile-reading speed: comtip's batched reader against spatialdata's ImageTilesDataset and a bare numpy slice.

All spots of HER2ST C2–C6, 112 µm tiles resized to 224 px, in one run:

- ``comtip``: ``ct.pp.spot_tiles`` + ``TileReader`` on the lazy JPEG-backed images (decoding included);
- ``comtip_in_memory``: the same reader on images already decoded into memory;
- ``imagetilesdataset``: ``spatialdata.dataloader.ImageTilesDataset`` (bounding-box query per tile, no rasterize),
  on the same in-memory images, each tile computed and resized to 224 px;
- ``numpy_slice``: slicing the in-memory arrays at the tile boxes and resizing (the ceiling).

Usage: python benchmarks/tiles.py [--data-dir D] [--sections C2 ...] [--itd-max N] [--json OUT]
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import Timer, emit, machine, peak_rss_mb


def _resize(tiles):
    """The same resize as comtip's reader (antialiased bicubic on uint8 = PIL's BICUBIC)."""
    import torch

    from comtip.data import resize_tiles

    return resize_tiles(torch.from_numpy(np.stack(tiles)), 224)


def _imagetilesdataset(sdata, tiles):
    """spatialdata's ImageTilesDataset over all spots, same physical tile (112 µm). In spatialdata 0.7.3 it rejects a
    table annotating several regions, so each section gets its own dataset (concatenated)."""
    from spatialdata import SpatialData
    from spatialdata.dataloader import ImageTilesDataset
    from spatialdata.models import TableModel
    from torch.utils.data import ConcatDataset

    table = sdata.tables["table"]
    itds = []
    for region in dict.fromkeys(tiles["region"]):
        section = region.replace("_spots", "")
        sub = table[table.obs["region"] == region].copy()
        sub.obs["region"] = sub.obs["region"].astype(str)
        sub.uns.pop("spatialdata_attrs")
        sub = TableModel.parse(sub, region=region, region_key="region", instance_key="spot_id")
        one = SpatialData(
            images={f"{section}_he": sdata.images[f"{section}_he"]},
            shapes={region: sdata.shapes[region]},
            tables={"table": sub},
        )
        itds.append(
            ImageTilesDataset(
                one,
                regions_to_images={region: f"{section}_he"},
                regions_to_coordinate_systems={region: section},
                tile_dim_in_units=112.0,
                rasterize=False,
                return_annotations="spot_id",
                table_name="table",
            )
        )
    return ConcatDataset(itds)


def _time_itd(itd, idx):
    with Timer() as t:
        # bounding-box queries return 162-164 px tiles: each is resized on its own, as a per-tile loader would
        for j in idx:
            _resize([np.asarray(itd[int(j)][0].data)])
    return t.s


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("COMTIP_DATA_DIR", "../shared/data"))
    p.add_argument("--sections", nargs="+", default=["C2", "C3", "C4", "C5", "C6"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--itd-max", type=int, default=300, help="tiles timed for ImageTilesDataset (it is slow)")
    p.add_argument("--itd-lazy-n", type=int, default=5, help="tiles timed for ImageTilesDataset on the lazy images")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import torch
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    import comtip as ct
    from comtip.data import TileReader, level_arrays

    ct.settings.show_progress_bar = False
    torch.set_num_threads(os.cpu_count() or 1)
    with Timer() as t_all:
        sdata = ct.datasets.her2st(args.sections, data_dir=args.data_dir)
        with Timer() as t_boxes:
            ct.pp.spot_tiles(sdata, tile_size_um=112, tile_size_px=224)
        tiles = sdata.shapes["comtip_tiles"]
        n = len(tiles)
        order = np.lexsort((tiles["y0"].to_numpy(), tiles["image"].to_numpy()))

        # comtip, lazy JPEG images (decode included)
        reader = TileReader(sdata, tiles, cache_mb=400)
        with Timer() as t_lazy:
            out = [reader.read(order[i : i + args.batch_size]) for i in range(0, n, args.batch_size)]
        lazy = torch.cat(out)

        # ImageTilesDataset on the SpatialData as read (lazy JPEGs): each query decodes the image again, so few are timed
        m_lazy = args.itd_lazy_n
        t_itd_lazy = (
            _time_itd(_imagetilesdataset(sdata, tiles), np.linspace(0, n - 1, m_lazy).astype(int))
            if m_lazy
            else float("nan")
        )

        # decode the images into memory for the other three
        with Timer() as t_decode:
            arrays = {}
            for key in list(sdata.images):
                img = sdata.images[key]
                arr = np.asarray(level_arrays(img)[0].data)
                arrays[key] = arr
                sdata.images[key] = Image2DModel.parse(
                    arr, dims=("c", "y", "x"), transformations=get_transformation(level_arrays(img)[0], get_all=True)
                )
        reader_mem = TileReader(sdata, tiles)
        with Timer() as t_mem:
            out = [reader_mem.read(order[i : i + args.batch_size]) for i in range(0, n, args.batch_size)]
        mem = torch.cat(out)

        # bare numpy slice + the same resize
        with Timer() as t_np:
            out = []
            for i in range(0, n, args.batch_size):
                rows = tiles.iloc[order[i : i + args.batch_size]]
                out.append(
                    _resize([arrays[r.image][:, r.y0 : r.y0 + r.size, r.x0 : r.x0 + r.size] for r in rows.itertuples()])
                )
        bare = torch.cat(out)

        itd = _imagetilesdataset(sdata, tiles)
        m = min(args.itd_max, len(itd))
        t_itd = _time_itd(itd, np.linspace(0, len(itd) - 1, m).astype(int))

    same = bool(torch.equal(lazy, mem))
    max_diff_np = int((mem.int() - bare.int()).abs().max())
    res = {
        "benchmark": "tiles",
        "n_tiles": int(n),
        "sections": args.sections,
        "tile": {"um": 112, "px": 224, "native_px": sorted(set(map(int, tiles["size"])))},
        "tiles_per_s": round(n / t_lazy.s, 1),
        "tiles_per_s_in_memory": round(n / t_mem.s, 1),
        "imagetilesdataset_tiles_per_s": round(m / t_itd, 1),
        "imagetilesdataset_n_timed": int(m),
        "imagetilesdataset_lazy_tiles_per_s": round(m_lazy / t_itd_lazy, 2) if m_lazy else None,
        "imagetilesdataset_lazy_n_timed": int(m_lazy),
        "numpy_slice_tiles_per_s": round(n / t_np.s, 1),
        # like for like: both on images decoded in memory (the headline), and both on the SpatialData as read
        "speedup_vs_imagetilesdataset": round((n / t_mem.s) / (m / t_itd), 1),
        "speedup_vs_imagetilesdataset_lazy": round((n / t_lazy.s) / (m_lazy / t_itd_lazy), 1) if m_lazy else None,
        "fraction_of_numpy_slice_in_memory": round((n / t_mem.s) / (n / t_np.s), 3),
        "lazy_equals_in_memory": same,
        "max_abs_diff_vs_numpy_slice": max_diff_np,
        "seconds": {
            "spot_tiles": round(t_boxes.s, 3),
            "comtip_lazy": round(t_lazy.s, 2),
            "decode_to_memory": round(t_decode.s, 2),
            "comtip_in_memory": round(t_mem.s, 2),
            "numpy_slice": round(t_np.s, 2),
            "imagetilesdataset": round(t_itd, 2),
            "imagetilesdataset_lazy": round(t_itd_lazy, 2),
        },
        "wall_s": round(t_all.s, 1),
        "peak_rss_mb": peak_rss_mb(),
        "machine": machine(),
    }
    emit(res, args.json)
    return res


if __name__ == "__main__":
    main()
