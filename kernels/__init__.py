"""Pallas kernels for tietransform, imported as `tietransform.kernels`. See
[`tietransform.kernels.ffn`][] for the fused shared-FFN kernel."""

from .ffn import (
    SUPPORTED_DTYPES as SUPPORTED_DTYPES,
    Support as Support,
    ffn as ffn,
    ffn_reference as ffn_reference,
    ffn_support as ffn_support,
    gated_ffn as gated_ffn,
    gated_ffn_reference as gated_ffn_reference,
)
