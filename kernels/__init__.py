"""Pallas kernels for tietransform, imported as `tietransform.kernels`. See
[`tietransform.kernels.ffn`][] for the fused shared-FFN kernel."""

from .ffn import (
    CONFIGS as CONFIGS,
    SUPPORTED_DTYPES as SUPPORTED_DTYPES,
    Support as Support,
    TuningConfig as TuningConfig,
    default_config as default_config,
    ffn as ffn,
    ffn_reference as ffn_reference,
    ffn_support as ffn_support,
    gated_ffn as gated_ffn,
    gated_ffn_reference as gated_ffn_reference,
)
