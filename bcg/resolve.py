"""Finding the transformer stack (the module bcg captures) and its layer list inside a ``*ForCausalLM``."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import nn

from . import hf
from .errors import BcgResolveWarning


@dataclass(frozen=True)
class Stack:
    """The inner decoder stack, where it sits in the model, its decoder layers and its attention (cache) layers."""

    module: nn.Module
    path: str
    layers: nn.ModuleList
    config: object  # the stack's own (text) config
    num_hidden_layers: int  # the config's: one per cache layer (a decoder layer may hold several: LongCat-Flash)


def _layer_list(module: nn.Module, num_layers: int | None, grouped: bool = False) -> nn.ModuleList | None:
    """The direct child ModuleList holding the decoder layers (length ``num_hidden_layers`` when known); ``grouped``:
    else the only one whose length divides it (each layer holding several attention layers, as LongCat-Flash's two)."""
    lists = [child for child in module.children() if isinstance(child, nn.ModuleList) and len(child) > 0]
    exact = [lst for lst in lists if num_layers is not None and len(lst) == num_layers]
    if len(exact) == 1:
        return exact[0]
    dividing = [lst for lst in lists if num_layers is not None and num_layers % len(lst) == 0]
    if grouped and not exact and len(dividing) == 1:
        return dividing[0]
    return None


def _path_of(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name or "<model>"
    return "<unknown>"


def find_stack(model: nn.Module) -> Stack | None:
    """Find the decoder stack via ``get_decoder()``; fall back to a module scan (with a warning), or None."""
    num_layers = hf.num_hidden_layers(model)
    candidate = hf.decoder_of(model)
    if candidate is not None and candidate is not model and isinstance(candidate, nn.Module):
        layers = _layer_list(candidate, num_layers, grouped=True)
        if layers is not None:
            return Stack(candidate, _path_of(model, candidate), layers, candidate.config, num_layers)

    # Fallback: the shallowest module owning a ModuleList of num_hidden_layers layers.
    for name, module in model.named_modules():
        if module is model or not hasattr(module, "config"):
            continue
        layers = _layer_list(module, num_layers)
        if layers is not None:
            warnings.warn(
                f"bcg: get_decoder() did not lead to the layer stack of {type(model).__name__}; "
                f"using '{name}' ({type(module).__name__}, {len(layers)} layers) found by scanning the modules",
                BcgResolveWarning,
                stacklevel=3,
            )
            return Stack(module, name, layers, module.config, num_layers)
    return None
