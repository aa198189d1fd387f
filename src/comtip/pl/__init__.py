"""Plots of what ``ct.tl`` wrote.

Predicted vs measured expression on the H&E (:func:`predicted_vs_measured`), ranked per-gene scores
(:func:`gene_scores`), a model's training curves (:func:`training_curves`) and UMAPs of the embeddings
(:func:`embedding`). Plots only read results (``.layers['comtip_pred']``, ``.var['comtip_pearson']``,
``.obsm['X_comtip_*']``, ``.uns['comtip']``, ``model.history``); they run no model and write nothing into the data.
Each takes a SpatialData or an AnnData (with scanpy's ``uns['spatial']`` where the H&E is drawn), returns the
matplotlib Figure, and takes ``save=`` (a path) and ``show=`` like scanpy.
"""

from ._embedding import embedding
from ._expression import gene_scores, predicted_vs_measured
from ._training import training_curves

__all__ = ["embedding", "gene_scores", "predicted_vs_measured", "training_curves"]
