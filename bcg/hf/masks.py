"""transformers' mask utilities: the per-layer-type masks a call needs, built the way the model builds them."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from packaging.version import Version
from transformers.masking_utils import (
    LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING,
    create_masks_for_generate,
)

from .models import (
    ATTENTION_LAYER_TYPES,
    installed_transformers,
    STATELESS_LAYER_TYPES,
    attention_mask_key,
    cache_argument,
    code_names,
    forward_parameters,
)

_MASK_CACHE_ARGUMENT = cache_argument(create_masks_for_generate)
# transformers 5.17's create_chunked_causal_mask does not take the block_sequence_ids that create_masks_for_generate
# passes to every layer type's function (Llama 4 failed there): such versions get the per-type calls made here, as do
# configs with MLP-only layer types (for which create_masks_for_generate hands back the raw 2D mask).
_MASK_FUNCTIONS_TAKE_ALL = all(
    "block_sequence_ids" in forward_parameters(LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING[t]) for t in ATTENTION_LAYER_TYPES
)


def builds_full_masks_only(config: Any, stack_forward: Callable) -> bool:
    """The stack builds plain causal masks although its config names a sliding window (Moshi): transformers' generic
    builder would apply the window, so bcg must build what the stack's own code calls."""
    if getattr(config, "layer_types", None) or getattr(config, "sliding_window", None) is None:
        return False
    names = code_names(inspect.unwrap(stack_forward).__code__)
    return "create_causal_mask" in names and "create_sliding_window_causal_mask" not in names


def mask_windows(config: Any, full_only: bool = False) -> dict[str, int | None]:
    """The sliding window (None: plain causal) of the mask ``create_masks`` builds under each attention mask key; a
    key whose mask is something else (chunked, bidirectional, a mixer's) is left out."""
    text = config.get_text_config()
    window = getattr(text, "sliding_window", None)
    if full_only:
        return {"full_attention": None}
    layer_types = getattr(text, "layer_types", None)
    if not layer_types:  # one mask for every layer: sliding when the config names a window (create_masks_for_generate)
        chunked = window is None and getattr(text, "attention_chunk_size", None) is not None
        return {} if chunked else {"full_attention": window}
    keys = {attention_mask_key(t) for t in layer_types}
    return {key: w for key, w in (("full_attention", None), ("sliding_attention", window)) if key in keys}


def create_masks(config: Any, attention_mask: Any, cache: Any, position_ids: torch.Tensor, batch: int, seq: int,
                 dtype: torch.dtype, device: torch.device, full_only: bool = False) -> torch.Tensor | dict | None:
    """transformers' own per-layer-type masks for a call, as the model would build them (``config`` carries the
    model's original attention implementation; ``full_only``: see ``builds_full_masks_only``)."""
    kwargs = dict(config=config, inputs_embeds=torch.empty((batch, seq, 0), dtype=dtype, device=device),
                  attention_mask=attention_mask, position_ids=position_ids, **{_MASK_CACHE_ARGUMENT: cache})
    if full_only:
        function = LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING["full_attention"]
        return {"full_attention": function(**{k: v for k, v in kwargs.items() if k in forward_parameters(function)})}
    all_types = set(getattr(config.get_text_config(), "layer_types", None) or ())
    layer_types = all_types - set(STATELESS_LAYER_TYPES)  # MLP-only layers (Nemotron-H) take no mask
    if not layer_types or not layer_types <= set(LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING):
        return create_masks_for_generate(**kwargs)
    if _MASK_FUNCTIONS_TAKE_ALL and layer_types == all_types and not any(map(_misfiled, layer_types)):
        return create_masks_for_generate(**kwargs)
    kwargs["config"] = config.get_text_config()
    functions = {key: function for layer_type in layer_types for key, function in _mask_functions(layer_type).items()}
    return {t: f(**{k: v for k, v in kwargs.items() if k in forward_parameters(f)}) for t, f in functions.items()}


@functools.cache  # asked on every mask build; the table is fixed per transformers version
def _misfiled(layer_type: str) -> bool:
    """Whether the table's entry for a hybrid layer type makes one of its masks with another function than the table
    gives that mask's key (5.17 to 5.24: "hybrid_sliding" attention's mask is a full causal one): transformers'
    create_masks_for_generate would build it so, and the masks are made per key here instead."""
    entry = LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING[layer_type]
    return isinstance(entry, dict) and _mask_functions(layer_type) != entry


def _mask_functions(layer_type: str) -> dict[str, Callable]:
    """The mask functions a layer type needs, by mask key. A hybrid layer's entry names its attention's and its mixer's
    keys; each key's mask is made by the table's function for that key, as the stacks make them (5.17's table gives
    "hybrid_sliding" attention ``create_causal_mask`` under "sliding_attention", where Inkling's stack makes that key's
    mask with ``create_sliding_window_causal_mask``, the window its attention applies)."""
    function = LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING[layer_type]
    if not isinstance(function, dict):
        return {layer_type: function}
    return {key: LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING.get(key, inner) for key, inner in function.items()}


# Implementations whose mask functions are plain tensor code on a static cache's decode step (no host read, no skip:
# transformers keeps the mask for compileable caches), so a full decode graph can build the masks inside itself.
# Eager's copied a host scalar to the GPU before 5.21 (`torch.tensor(0.0, device=...)`), which no graph can hold: there
# its masks are built before each replay and copied in.
_EAGER_MASK_IN_GRAPHS = Version(installed_transformers()) >= Version("5.21")
_MASKS_BUILT_IN_GRAPHS = frozenset({"sdpa", "eager"} if _EAGER_MASK_IN_GRAPHS else {"sdpa"})


def masks_build_in_graphs(implementation: str | None) -> bool:
    """Whether the attention implementation's masks can be built inside a full decode graph."""
    return implementation in _MASKS_BUILT_IN_GRAPHS
