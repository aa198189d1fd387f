"""The evaluation room: EVAL.md's protocol, its panels, metrics, reference methods and baselines, in public.

:func:`evaluate` scores CoMTIP (zero-shot, retrieval, probe) next to the frozen ImageNet baselines and the training
mean on the same spots, with panels fixed on the training sections: the table that ``comtip evaluate`` prints and
the scripts in ``benchmarks/`` report. Its parts are public so that a benchmark or a paper can rebuild any row of
it: the panels (:func:`eval_panels`), the one implementation of each metric (:func:`pearson_per_gene`,
:func:`pearson_depth_adjusted`, :func:`recall_at_k`, …), the reference methods (:func:`reference_predict`), CoMTIP's
zero-shot read-out (:func:`zero_shot`), the ImageNet baseline (:class:`ImageNetEncoder`, :func:`imagenet_features`)
and the spots as the protocol reads them (:func:`load_spots`). :func:`run_demo` is ``comtip demo``.

``bench`` sits above :mod:`comtip.tl` (it uses the tools; the tools never import it). torch is imported on first use.
"""

from .._constants import SPATIAL_CONTEXT
from .._metrics import (
    panel_metrics,
    pearson_depth_adjusted,
    pearson_per_gene,
    profile_recall,
    recall_at_k,
    residualize,
    spearman_per_gene,
)
from .._spatial import mix_with_neighbours, neighbour_means
from ..pp import eval_panels
from ..tl._reference import knn_retrieval, ridge_probe
from ._corpus import corpus_panel, gene_statistics
from ._demo import DEMO_PRETRAIN, demo_config, run_demo
from ._evaluate import METHODS, evaluate
from ._predict import new_gene_levels, reference_predict, zero_shot
from ._spots import (
    Spots,
    embed_gene_sentences,
    image_embeddings,
    load_spots,
    resolve_spots,
    with_spatial_context,
)

__all__ = [
    "DEMO_PRETRAIN",
    "METHODS",
    "SPATIAL_CONTEXT",
    "ImageNetEncoder",
    "Spots",
    "corpus_panel",
    "demo_config",
    "embed_gene_sentences",
    "eval_panels",
    "evaluate",
    "gene_statistics",
    "image_embeddings",
    "imagenet_features",
    "knn_retrieval",
    "load_spots",
    "mix_with_neighbours",
    "neighbour_means",
    "new_gene_levels",
    "panel_metrics",
    "pearson_depth_adjusted",
    "pearson_per_gene",
    "profile_recall",
    "recall_at_k",
    "reference_predict",
    "residualize",
    "resolve_spots",
    "ridge_probe",
    "run_demo",
    "spearman_per_gene",
    "with_spatial_context",
    "zero_shot",
]

_TORCH = {"ImageNetEncoder", "imagenet_features"}  # in ._imagenet, which imports torch


def __getattr__(name: str):
    # torch is imported on first use, so that `import comtip` (which imports this package) stays fast
    if name in _TORCH:
        from . import _imagenet

        return getattr(_imagenet, name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted({*globals(), *_TORCH})
