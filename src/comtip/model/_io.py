"""Saving and loading CoMTIP models: ``model.safetensors`` + ``config.json``.

Saves are atomic (written next to the target, then moved into place); loading never unpickles.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ._comtip import CoMTIP

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
REFERENCE_FILE = "reference.safetensors"  # optional: training spots' image embeddings + panel expression
MODEL_FILES = (WEIGHTS_FILE, CONFIG_FILE, REFERENCE_FILE)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".joblib", ".npy", ".npz")
_REQUIRED = ("value_levels",)
_TEXT_KEY = "gene_encoder.text_emb"


def _major(version: str) -> int:
    m = re.match(r"\s*v?(\d+)", str(version))
    if m is None:
        msg = f"Cannot read the major version of comtip version string {version!r}."
        raise ValueError(msg)
    return int(m.group(1))


def state_dict_checksum(state: Mapping[str, Tensor]) -> str:
    """SHA-256 over a state dict: for each tensor in sorted name order, its name, dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _jsonable(obj: Any, where: str) -> Any:
    """Plain JSON types (NaN/inf become null); anything else raises naming the entry."""
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Tensor) and obj.numel() == 1:
        return _jsonable(obj.item(), where)
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy scalar
        return _jsonable(obj.item(), where)
    if isinstance(obj, PathLike):
        return os.fspath(obj)
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    msg = f"{where} holds a {type(obj).__name__}, which cannot be saved in config.json; store plain numbers/strings."
    raise ValueError(msg)


def _write_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _write_json(obj: dict[str, Any], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, allow_nan=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def save_model(model: CoMTIP, path: str | PathLike, *, overwrite: bool = False) -> Path:
    """Write ``model`` to the folder ``path`` atomically; see :meth:`comtip.CoMTIP.save`."""
    from .._version import __version__

    target = Path(path).expanduser().absolute()
    if target.exists():
        if not target.is_dir():
            msg = f"Cannot save the model to {target}: it exists and is not a folder; choose a folder path."
            raise ValueError(msg)
        contents = sorted(p.name for p in target.iterdir())
        if contents and not overwrite:
            msg = f"{target} already exists and is not empty; pass overwrite=True to replace the model in it."
            raise ValueError(msg)
        foreign = [n for n in contents if n not in MODEL_FILES]
        if foreign:
            msg = (
                f"{target} holds files that are not part of a comtip model ({foreign[:5]}); overwrite would delete "
                "them. Save to a new or empty folder."
            )
            raise ValueError(msg)
    target.parent.mkdir(parents=True, exist_ok=True)

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    checksum = state_dict_checksum(tensors)
    meta = {
        "comtip_version": __version__,
        "format_version": FORMAT_VERSION,
        "name": model.name,
        "config": model.config.to_dict(),
        "genes": list(model.genes),
        "weights_sha256": checksum,
        "training": {
            "summary": _jsonable(model.training_summary, "model.training_summary"),
            "history": _jsonable(model.history, "model.history"),
        },
    }
    st_meta = {"format": "pt", "comtip_version": __version__, "format_version": str(FORMAT_VERSION)}
    reference = _check_reference(model)
    if reference is not None:
        meta["reference"] = {
            "n_spots": int(reference["embeddings"].shape[0]),
            "genes": list(model.genes[: reference["expression"].shape[1]]),
            "sha256": state_dict_checksum(reference),
        }

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_safetensors(tensors, tmp / WEIGHTS_FILE, st_meta)
        if reference is not None:
            _write_safetensors(reference, tmp / REFERENCE_FILE, st_meta)
        _write_json(meta, tmp / CONFIG_FILE)
        if target.exists():
            backup = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, backup)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(backup, target)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved the model to %s (%d tensors, sha256 %s…)", target, len(tensors), checksum[:12])
    return target


def _check_reference(model: CoMTIP) -> dict[str, Tensor] | None:
    """The model's retrieval reference as plain CPU tensors, checked: ``embeddings`` (n, d), ``expression`` (n, G0).

    Optionally ``xy`` (n, 2) and ``section`` (n,): the spots' centres and section codes, for spatial context.
    """
    ref = getattr(model, "reference", None)
    if not ref:
        return None
    emb, expr = ref.get("embeddings"), ref.get("expression")
    if not isinstance(emb, Tensor) or not isinstance(expr, Tensor) or emb.dim() != 2 or expr.dim() != 2:
        msg = "model.reference must hold 2-D tensors 'embeddings' (n, d) and 'expression' (n, G)."
        raise ValueError(msg)
    if emb.shape[0] != expr.shape[0] or emb.shape[1] != model.embed_dim or expr.shape[1] > model.n_genes:
        msg = f"model.reference shapes {tuple(emb.shape)} / {tuple(expr.shape)} do not fit the model (d = {model.embed_dim}, {model.n_genes} genes)."
        raise ValueError(msg)
    out = {
        "embeddings": emb.detach().cpu().float().contiguous(),
        "expression": expr.detach().cpu().float().contiguous(),
    }
    xy, section = ref.get("xy"), ref.get("section")
    if xy is not None or section is not None:  # optional: the spots' centres and section codes (spatial context)
        ok = isinstance(xy, Tensor) and isinstance(section, Tensor)
        if not ok or tuple(xy.shape) != (emb.shape[0], 2) or tuple(section.shape) != (emb.shape[0],):
            msg = "model.reference 'xy' (n, 2) and 'section' (n,) must be given together, one row per reference spot."
            raise ValueError(msg)
        out["xy"] = xy.detach().cpu().double().contiguous()
        out["section"] = section.detach().cpu().long().contiguous()
    return out


def _read_reference(folder: Path, meta: dict[str, Any], genes: list[str]) -> dict[str, Tensor] | None:
    file = folder / REFERENCE_FILE
    info = meta.get("reference")
    if not file.is_file():
        if info:
            log.warning("%s is missing: the model's training reference (for retrieval/probe) is not loaded", file)
        return None
    from safetensors.torch import load_file

    try:
        ref = load_file(str(file), device="cpu")
    except Exception as e:
        msg = f"{file} could not be read as safetensors ({type(e).__name__}: {e}); it is truncated or corrupted: re-save the model."
        raise ValueError(msg) from e
    keys = set(ref)
    if (
        keys not in ({"embeddings", "expression"}, {"embeddings", "expression", "xy", "section"})
        or not info
        or state_dict_checksum(ref) != info.get("sha256")
    ):
        msg = f"{file} does not match the reference recorded in {CONFIG_FILE}; re-save the model."
        raise ValueError(msg)
    if list(info.get("genes", [])) != genes[: ref["expression"].shape[1]]:
        msg = f"{file}: its genes differ from the model's panel; re-save the model."
        raise ValueError(msg)
    return ref


def _read_config(folder: Path) -> dict[str, Any]:
    from .._version import __version__

    file = folder / CONFIG_FILE
    if not file.is_file():
        msg = f"{file} is missing: {folder} is not a comtip model folder (it needs {WEIGHTS_FILE} and {CONFIG_FILE})."
        raise ValueError(msg)
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        msg = f"{file} is not valid JSON ({e}); the save is damaged: re-save or re-download the model."
        raise ValueError(msg) from e
    if not isinstance(meta, dict) or "comtip_version" not in meta or "config" not in meta:
        msg = f"{file} is not a comtip model config (no 'comtip_version' / 'config')."
        raise ValueError(msg)
    saved = str(meta["comtip_version"])
    if _major(saved) > _major(__version__):
        msg = (
            f"{file} was written by comtip {saved}, a newer major version than the installed {__version__}; "
            "upgrade comtip (pip install -U comtip) to load it."
        )
        raise ValueError(msg)
    fmt = meta.get("format_version")
    if not isinstance(fmt, int) or fmt > FORMAT_VERSION:
        msg = f"{file} has format_version {fmt!r}; this comtip reads format {FORMAT_VERSION}: upgrade comtip."
        raise ValueError(msg)
    if _major(saved) < _major(__version__):
        log.warning("%s was written by comtip %s (installed: %s)", file, saved, __version__)
    genes = meta.get("genes")
    if not isinstance(genes, list) or not all(isinstance(g, str) for g in genes):
        msg = f"{file}: 'genes' must be a list of gene names."
        raise ValueError(msg)
    return meta


def _read_weights(folder: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    file = folder / WEIGHTS_FILE
    try:
        return load_file(str(file), device="cpu")
    except Exception as e:
        msg = (
            f"{file} could not be read as safetensors ({type(e).__name__}: {e}); the file is truncated or corrupted: "
            "re-save the model or download it again."
        )
        raise ValueError(msg) from e


def load_model(path: str | PathLike, *, device: str | torch.device | None = None, model_class: type[CoMTIP]) -> CoMTIP:
    """Load a model folder as ``model_class`` (:class:`comtip.CoMTIP`); see :meth:`comtip.CoMTIP.load`."""
    from ._config import CoMTIPConfig

    folder = Path(path).expanduser()
    if not folder.exists():
        msg = f"No model folder at {folder}."
        raise FileNotFoundError(msg)
    if not folder.is_dir():
        msg = f"{folder} is a file; CoMTIP.load expects the folder written by CoMTIP.save ({', '.join(MODEL_FILES)})."
        raise ValueError(msg)
    if not (folder / WEIGHTS_FILE).is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            msg = (
                f"{folder} has no {WEIGHTS_FILE} but {pickles}: pickle-based checkpoints can run arbitrary code and "
                "comtip never loads them. Re-save the model with CoMTIP.save() in a trusted session (safetensors + "
                "JSON), or convert the weights to safetensors yourself if you trust the file."
            )
        else:
            msg = f"{folder / WEIGHTS_FILE} is missing: {folder} is not a comtip model folder."
        raise ValueError(msg)
    meta = _read_config(folder)
    weights_file = folder / WEIGHTS_FILE
    tensors = _read_weights(folder)
    try:
        config = CoMTIPConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        msg = f"{folder / CONFIG_FILE}: invalid model config: {e}"
        raise ValueError(msg) from e
    required = [*_REQUIRED, *([_TEXT_KEY] if config.uses_text else [])]
    missing = [k for k in required if k not in tensors]
    if missing:
        msg = f"{weights_file} lacks the tensor(s) {missing}; the file does not belong to its {CONFIG_FILE}: re-save the model."
        raise ValueError(msg)
    genes = meta["genes"]
    if tensors["value_levels"].shape[0] != len(genes):
        msg = (
            f"{weights_file} holds value levels for {tensors['value_levels'].shape[0]} genes but {CONFIG_FILE} "
            f"lists {len(genes)}; re-save the model."
        )
        raise ValueError(msg)
    try:
        model = model_class(
            config,
            genes,
            tensors[_TEXT_KEY] if config.uses_text else None,
            tensors["value_levels"],
            load_pretrained=False,
        )
    except ValueError as e:
        msg = f"{folder}: the saved model cannot be rebuilt ({e}); re-save it with this comtip version."
        raise ValueError(msg) from e
    state = model.state_dict()
    missing = sorted(set(state) - set(tensors))
    extra = sorted(set(tensors) - set(state))
    wrong = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(state[k].shape)}"
        for k in sorted(set(state) & set(tensors))
        if tuple(tensors[k].shape) != tuple(state[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:6]}{' …' if len(missing) > 6 else ''}")
    if extra:
        problems.append(f"unexpected tensors {extra[:6]}{' …' if len(extra) > 6 else ''}")
    if wrong:
        problems.append(f"wrong shapes {wrong[:4]}{' …' if len(wrong) > 4 else ''}")
    if problems:
        msg = (
            f"{weights_file} does not match the model described by {CONFIG_FILE}: {'; '.join(problems)}. The files come "
            "from different saves or another comtip version: re-save the model with CoMTIP.save()."
        )
        raise ValueError(msg)
    expected = meta.get("weights_sha256")
    if expected is not None and state_dict_checksum(tensors) != expected:
        msg = (
            f"{weights_file} does not match the checksum recorded in {CONFIG_FILE}: the weights are corrupted or "
            "were modified; re-save the model or download it again."
        )
        raise ValueError(msg)
    model.load_state_dict(tensors, strict=True)
    model.name = str(meta.get("name", model.name))
    training = meta.get("training") or {}
    model.training_summary = dict(training.get("summary") or {})
    model.history = list(training.get("history") or [])
    model.reference = _read_reference(folder, meta, list(genes))
    model.eval()
    if device is not None:
        model.to(device)
    log.info("loaded %s from %s", model.name, folder)
    return model


HUB_FILES = [*MODEL_FILES, "README.md"]


def _model_card(model: CoMTIP) -> str:
    s = model.training_summary
    lines = [
        "---",
        "library_name: comtip",
        "tags: [spatial-transcriptomics, histology, comtip]",
        "---",
        f"# {model.name}",
        "",
        "A [comtip](https://github.com/scverse/comtip) CoMTIP model (contrastive masked text-image pretraining for",
        'spatial transcriptomics). Load it with `ct.tl.load_model("<this repo id>")`.',
        "",
        f"- image encoder: `{model.config.image_encoder}`, {model.config.image_size} px, embedding d = {model.embed_dim}",
        f"- gene panel: {model.n_genes} genes, K = {model.n_value_levels} value levels",
        f"- trained on: {s.get('sections', 'unknown')} (validation {s.get('validation_sections', [])}), "
        f"{s.get('epochs', 0)} epochs, tiles {s.get('tile_size_um', '?')} µm at {s.get('tile_size_px', '?')} px",
        f"- weights sha256: `{model.weights_checksum()}`",
    ]
    return "\n".join(lines) + "\n"


def push_to_hub(
    model: CoMTIP,
    repo_id: str,
    *,
    private: bool = True,
    token: str | None = None,
    commit_message: str = "Upload comtip model",
) -> str:
    """Upload a model to the Hugging Face Hub (safetensors + JSON + a model card); see :meth:`comtip.CoMTIP.push_to_hub`."""
    try:
        from huggingface_hub import HfApi
    except ImportError as e:  # pragma: no cover - a dependency of sentence-transformers
        msg = "Pushing to the Hub needs huggingface_hub: pip install huggingface_hub"
        raise ImportError(msg) from e
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="comtip_hub_") as tmp:
        folder = Path(tmp) / "model"
        save_model(model, folder)
        (folder / "README.md").write_text(_model_card(model), encoding="utf-8")
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    return str(getattr(info, "commit_url", info))


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_pretrained(path_or_name: str | PathLike, *, revision: str | None = None) -> Path:
    """The local folder of a model: ``path_or_name`` itself when it exists, else a Hub id's downloaded snapshot."""
    path = Path(path_or_name).expanduser()
    if path.exists():
        return path
    name = str(path_or_name)
    if _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        log.warning("downloading model %s from the Hugging Face Hub", name)
        return download_from_hub(name, revision=revision)
    msg = f"No model folder at {str(path)!r}, and {name!r} is not a Hugging Face Hub id ('user/name')."
    raise FileNotFoundError(msg)


def download_from_hub(repo_id: str, *, revision: str | None = None, token: str | None = None) -> Path:
    """Download the files of a comtip model from the Hugging Face Hub (only safetensors, JSON and the card)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover
        msg = "Loading from the Hub needs huggingface_hub: pip install huggingface_hub"
        raise ImportError(msg) from e
    try:
        path = snapshot_download(repo_id, revision=revision, token=token, allow_patterns=HUB_FILES)
    except Exception as e:
        msg = (
            f"Could not download the model {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {e}). Check the "
            "id and your connection, or pass the path of a model folder saved with model.save()."
        )
        raise OSError(msg) from e
    return Path(path)
