"""The CoMTIP model: torch modules only, no AnnData.

- ``_network.py``: :class:`CoMTIPNetwork`, the network as a pure ``nn.Module`` (towers, heads, temperatures, read-out);
  ``_objectives.py``: how a batch becomes its training losses.
- ``_comtip.py``: :class:`CoMTIP`, the user's model = the module + gene names, history, reference bank, files
  (``_io.py``: safetensors save/load, the Hub).
- Parts: ``_image.py`` (image tower + MFM) on ``_backbones.py`` (timm backbones, offline weights), ``_gene.py``
  (Gene-Text Encoder + value embeddings), ``_paat.py`` (Pair-aware Adversarial Training), ``_losses.py``
  (InfoNCE, prompt loss, heads), ``_config.py`` (the config dataclass), ``_inference.py`` (batched encoding).
"""

from ._comtip import CoMTIP
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
from ._inference import embed_images
from ._io import CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE, state_dict_checksum
from ._losses import info_nce, prompt_loss, two_hot_targets
from ._network import CoMTIPNetwork
from ._objectives import DepthHead
from ._paat import pair_swap

__all__ = [
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "LOSS_WEIGHTS",
    "WEIGHTS_FILE",
    "CoMTIP",
    "CoMTIPConfig",
    "CoMTIPNetwork",
    "DepthHead",
    "GeneEncoderOutput",
    "GeneTextEncoder",
    "ImageTower",
    "MaskFeatureGenerator",
    "create_backbone",
    "dihedral_transforms",
    "embed_images",
    "info_nce",
    "load_efficientnet_lite0_package_weights",
    "pair_swap",
    "prompt_loss",
    "random_token_mask",
    "sentence_dropout",
    "state_dict_checksum",
    "two_hot_targets",
]
