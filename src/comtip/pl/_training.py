"""Training curves of a CoMTIP model: each loss part (train and validation) and the validation metrics per epoch."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ._utils import finish

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# a ``val_<name>`` without a ``train_<name>`` twin is a validation metric (recall5, pcc, pcc_adj, ...); the rest are
# loss parts
_NOT_CURVES = {"stage", "epoch", "step", "epoch_s"}


def _history(model) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    if isinstance(model, Sequence) and not isinstance(model, str):
        return [dict(e) for e in model], {}
    if not hasattr(model, "history"):
        msg = f"Expected a comtip.CoMTIP (or its .history, a list of per-epoch dicts), got {type(model).__name__}."
        raise TypeError(msg)
    return list(model.history), dict(getattr(model, "training_summary", {}) or {})


def _parts(history: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """Loss parts (``train_<p>`` and/or ``val_<p>``) and validation metrics, in the order they first appear."""
    train: dict[str, None] = {}
    val: dict[str, None] = {}
    for e in history:
        for k, v in e.items():
            if k in _NOT_CURVES or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            if k.startswith("train_"):
                train[k[6:]] = None
            elif k.startswith("val_"):
                val[k[4:]] = None
    parts = list(dict.fromkeys([*train, *(p for p in val if p in train)]))
    metrics = [p for p in val if p not in train]
    order = ["loss"] if "loss" in parts else []
    return order + [p for p in parts if p != "loss"], metrics


def training_curves(
    model,
    *,
    parts: Sequence[str] | None = None,
    ncols: int = 4,
    panel_size: tuple[float, float] = (3.0, 2.3),
    save: str | os.PathLike | None = None,
    show: bool | None = None,
    return_fig: bool | None = None,
) -> Figure | None:
    """Loss parts and validation metrics of a model's training, per epoch.

    One small panel per loss part (``loss``, ``infonce``, ``prompt``, ``mfm``, ``paat_*``, …) with its training and
    validation curves, and one last panel with the validation metrics (every ``val_*`` without a ``train_*`` twin:
    ``recall5``, ``pcc``, ``pcc_adj``). The epoch whose weights the model kept
    (``model.training_summary['stages'][-1]['best_epoch']``) is marked in every panel. With several training stages
    (e.g. gene-side pretraining, then contrastive), epochs are counted on across stages and each stage's start is
    marked. Epochs are numbered from 0, as Lightning counts them.

    Parameters
    ----------
    model
        A trained :class:`comtip.CoMTIP` (:func:`comtip.tl.pretrain`, or loaded with its history), or its
        ``.history``: a list of per-epoch dicts with ``train_<part>``, ``val_<part>``, ``stage`` and ``epoch``.
    parts
        Loss parts to draw (names without ``train_``/``val_``); default all of them.
    ncols
        Panels per row.
    panel_size
        Width and height of one panel in inches.
    save
        Write the figure to this path (``.png`` when it has no suffix).
    show
        Show the figure; ``None``: on interactive backends, unless ``save`` is given.
    return_fig
        Return the Figure; ``None``: when it is not shown.

    Returns
    -------
    The :class:`~matplotlib.figure.Figure` (see ``return_fig``): one axes per loss part (titled with the part's
    name; lines labelled ``train`` and ``val``), then one titled ``validation metrics`` when the history has any.

    Examples
    --------
    >>> model = ct.tl.pretrain(sdata, max_epochs=20)
    >>> ct.pl.training_curves(model)
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    history, summary = _history(model)
    if not history:
        msg = (
            "This model has no training history (model.history is empty): train it with ct.tl.pretrain, or load a "
            "model saved after training (model.save keeps the history)."
        )
        raise ValueError(msg)
    all_parts, metrics = _parts(history)
    if parts is not None:
        parts = [parts] if isinstance(parts, str) else list(parts)
        unknown = [p for p in parts if p not in all_parts]
        if unknown:
            msg = f"Loss parts {unknown} are not in the history; it has {all_parts}."
            raise ValueError(msg)
    else:
        parts = all_parts
    if ncols < 1:
        msg = f"ncols must be at least 1, got {ncols}."
        raise ValueError(msg)

    # x: the epoch, counted on across stages
    x = np.empty(len(history))
    starts: list[tuple[float, str]] = []
    offset, prev_stage = 0, None
    for i, e in enumerate(history):
        stage, epoch = e.get("stage"), int(e.get("epoch", i))
        if i > 0 and stage != prev_stage:
            offset = int(x[i - 1]) + 1 - epoch
        x[i] = epoch + offset
        if stage != prev_stage:
            starts.append((x[i], str(stage)))
        prev_stage = stage
    best_x, best_label = _best(history, summary, x, several_stages=len(starts) > 1)

    n_panels = len(parts) + (1 if metrics else 0)
    ncols = min(ncols, n_panels)
    nrows = int(np.ceil(n_panels / ncols))
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(panel_size[0] * ncols, panel_size[1] * nrows + 0.6), layout="constrained", squeeze=False
    )
    flat = list(axes.ravel())
    for ax in flat[n_panels:]:
        ax.remove()
    flat = flat[:n_panels]
    for ax, part in zip(flat, parts, strict=False):
        for split, color in (("train", "tab:blue"), ("val", "tab:orange")):
            y = np.array([_num(e.get(f"{split}_{part}")) for e in history])
            ok = np.isfinite(y)
            if ok.any():
                ax.plot(x[ok], y[ok], marker="o", ms=3, lw=1.2, color=color, label=split)
        ax.set_title(part)
    if metrics:
        ax = flat[-1]
        for j, name in enumerate(metrics):
            y = np.array([_num(e.get(f"val_{name}")) for e in history])
            ok = np.isfinite(y)
            ax.plot(x[ok], y[ok], marker="s", ms=3, lw=1.2, color=plt.get_cmap("tab10")(j + 2), label=f"val {name}")
        ax.set_title("validation metrics")
        ax.axhline(0, color="black", lw=0.5)
        ax.legend(fontsize="x-small", frameon=False)
    pad = 0.5 if len(x) > 1 else 1.0
    for i, ax in enumerate(flat):
        if best_x is not None:
            ax.axvline(best_x, color="tab:red", ls=":", lw=1.2)
        for sx, stage in starts[1:]:
            ax.axvline(sx - 0.5, color="grey", lw=0.8)
            ax.annotate(f" {stage}", (sx - 0.5, 1), xycoords=("data", "axes fraction"), fontsize="x-small", va="top")
        ax.set_xlim(x.min() - pad, x.max() + pad)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if i + ncols >= n_panels:  # lowest panel of its column
            ax.set_xlabel("epoch")
    # one legend for the loss panels: train, val and the best epoch
    handles = [
        Line2D([], [], color="tab:blue", marker="o", ms=3, label="train"),
        Line2D([], [], color="tab:orange", marker="o", ms=3, label="validation"),
    ]
    if best_x is not None:
        handles.append(Line2D([], [], color="tab:red", ls=":", label=best_label))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False, fontsize="small")
    name = getattr(model, "name", None)
    fig.suptitle(f"Training of {name}" if isinstance(name, str) else "Training")
    return finish(fig, show=show, save=save, return_fig=return_fig)


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _best(
    history: list[dict[str, Any]], summary: Mapping[str, Any], x: np.ndarray, *, several_stages: bool
) -> tuple[float | None, str]:
    """Position on the x axis of the best epoch of the last stage (the weights the model kept), and its legend label."""
    stages = summary.get("stages") or []
    if not stages:
        return None, ""
    last = stages[-1]
    if last.get("best_epoch") is None:  # no validation in the last stage: its last epoch is kept
        rows = [i for i, e in enumerate(history) if e.get("stage") == last.get("stage")]
        if not rows:
            return None, ""
        stage = f"{last.get('stage')} " if several_stages else ""
        return float(x[rows[-1]]), f"kept weights: {stage}epoch {int(history[rows[-1]].get('epoch', 0))} (the last)"
    for i, e in enumerate(history):
        if e.get("stage") == last.get("stage") and int(e.get("epoch", -1)) == int(last["best_epoch"]):
            monitor = last.get("monitor")
            value = last.get("best_value")
            extra = f": {monitor} = {value}" if monitor is not None and value is not None else ""
            stage = f"{last.get('stage')} " if several_stages else ""
            return float(x[i]), f"kept weights: {stage}epoch {int(last['best_epoch'])}{extra}"
    return None, ""
