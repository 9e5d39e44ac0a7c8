"""The fused shared-FFN kernel: forward plus a backward that recomputes the hidden activation."""

from ._api import (
    Implementation as Implementation,
    KernelFamily as KernelFamily,
    Support as Support,
    ffn as ffn,
    ffn_support as ffn_support,
    gated_ffn as gated_ffn,
)
from ._config import (
    CONFIGS as CONFIGS,
    ConfigName as ConfigName,
    TuningConfig as TuningConfig,
    default_config as default_config,
)
from ._reference import ffn_reference as ffn_reference, gated_ffn_reference as gated_ffn_reference
from ._validate import SUPPORTED_DTYPES as SUPPORTED_DTYPES
