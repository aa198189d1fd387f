"""The CoMTIP model: pure torch modules, no AnnData.

Image tower + Masked Feature Modeling, Gene-Text Encoder + value embeddings, Pair-aware Adversarial Training,
InfoNCE and the value-level prompt loss, the config dataclass, and safetensors save/load.
"""

from ._comtip import CoMTIP, DepthHead
from ._config import LOSS_WEIGHTS, CoMTIPConfig
from ._gene import GeneEncoderOutput, GeneTextEncoder, sentence_dropout
from ._image import (
    ImageTower,
    MaskFeatureGenerator,
    create_backbone,
    dihedral_transforms,
    load_efficientnet_lite0_package_weights,
    random_token_mask,
)
from ._io import CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE, state_dict_checksum
from ._losses import info_nce, prompt_loss, two_hot_targets
from ._paat import pair_swap

__all__ = [
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "LOSS_WEIGHTS",
    "WEIGHTS_FILE",
    "CoMTIP",
    "CoMTIPConfig",
    "DepthHead",
    "GeneEncoderOutput",
    "GeneTextEncoder",
    "ImageTower",
    "MaskFeatureGenerator",
    "create_backbone",
    "dihedral_transforms",
    "info_nce",
    "load_efficientnet_lite0_package_weights",
    "pair_swap",
    "prompt_loss",
    "random_token_mask",
    "sentence_dropout",
    "state_dict_checksum",
    "two_hot_targets",
]
