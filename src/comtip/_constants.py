"""Every default key comtip reads or writes, in one place."""

from __future__ import annotations

# --- SpatialData elements -------------------------------------------------------------------
TABLE_KEY = "table"
TILES_KEY = "comtip_tiles"
IMAGE_SUFFIX = "_he"  # image element of a section: f"{section}{IMAGE_SUFFIX}"
SPOTS_SUFFIX = "_spots"  # shapes element of a section: f"{section}{SPOTS_SUFFIX}"

# --- table columns ----------------------------------------------------------------------------
REGION_KEY = "region"
INSTANCE_KEY = "spot_id"
SECTION_KEY = "section"
COUNTS_LAYER = "counts"
ORIGINAL_SYMBOLS = "original_symbols"
INPUT_KEY = "comtip_input"  # table.uns[INPUT_KEY] = {"x_is_counts": bool, "x_transform": None | "log1p" | ...}

# --- results ----------------------------------------------------------------------------------
EMBED_KEY = "X_comtip"  # -> .obsm["X_comtip_image"], .obsm["X_comtip_gene"]
IMAGE_EMBED_SUFFIX = "_image"
GENE_EMBED_SUFFIX = "_gene"
PRED_LAYER = "comtip_pred"
PEARSON_KEY = "comtip_pearson"
SPEARMAN_KEY = "comtip_spearman"
UNS_KEY = "comtip"

# --- physical defaults (EVAL.md) -------------------------------------------------------------
TILE_SIZE_UM = 112.0
TILE_SIZE_PX = 224
# share of a spot's neighbours in its image embedding at prediction (picked on HER2ST's validation section C5)
SPATIAL_CONTEXT = 0.5
HER2ST_MPP = 0.688  # µm per full-resolution pixel (290.6 px per 200 µm array step)
HER2ST_SPOT_DIAMETER_UM = 100.0
VISIUM_SPOT_DIAMETER_UM = 55.0
TARGET_SUM = 1e4

# --- SpatialData attrs: where comtip records the unit of each coordinate system ---------------
ATTRS_KEY = "comtip"
ATTRS_UNITS = "coordinate_system_units"  # sdata.attrs["comtip"]["coordinate_system_units"][cs] = "um"
