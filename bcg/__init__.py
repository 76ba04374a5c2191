"""bcg: breakable CUDA graphs for Hugging Face causal LMs.

``bcg.wrap_model(model)`` captures the model's inner layer stack in CUDA graph segments keyed by token count,
with eager breaks around attention and the KV-cache update, and replays them on every later call.
"""

from .errors import (
    BcgAddressError,
    BcgCaptureWarning,
    BcgFallbackWarning,
    BcgInvalidatedWarning,
    BcgResolveWarning,
    BcgVersionWarning,
    BcgWarning,
)
from .wrap import BcgHandle, unwrap_model, wrap_model

__version__ = "0.1.0"
__all__ = [
    "wrap_model",
    "unwrap_model",
    "BcgHandle",
    "BcgWarning",
    "BcgFallbackWarning",
    "BcgCaptureWarning",
    "BcgResolveWarning",
    "BcgInvalidatedWarning",
    "BcgVersionWarning",
    "BcgAddressError",
]
