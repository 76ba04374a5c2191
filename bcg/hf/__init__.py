"""Every transformers internal bcg touches, in one package, by concern: models and stacks (``models``), caches
(``caches``), masks (``masks``) and attention functions (``attention``). No other bcg module imports transformers.

transformers moves its internals monthly (5.24 renamed the stack's, the layers' and the attention modules'
``past_key_values`` argument to ``cache``; 5.25 moved the hybrids' convolution state into a new function), so names are
read from the installed version's own signatures wherever they can be and state is found by walking it.
``VERIFIED_TRANSFORMERS`` is the range bcg was verified on; outside it, bcg verifies its replays against eager itself
(verify.py). The rest of bcg reads these adapters through this package (``hf.name``).
"""

from .models import (  # noqa: F401
    ATTENTION_LAYER_TYPES,
    CACHE_ARGUMENTS,
    LLAMA_RMS_NORM_FORWARD,
    LLAMA_ROTARY,
    LLAMA_ROTATE_HALF,
    MISMASKED_LAYER_TYPES,
    REQUIRED_STACK_ARGUMENTS,
    STATEFUL_LAYER_TYPES,
    STATELESS_LAYER_TYPES,
    VERIFIED_TRANSFORMERS,
    allow_auto_compile,
    attention_layers,
    attention_mask_key,
    builds_alibi,
    cache_argument,
    code_names,
    experts_implementation,
    experts_running,
    has_switchable_experts,
    decoder_of,
    forward_parameters,
    installed_transformers,
    is_pretrained_model,
    kv_sharing,
    layers_needing_breaks,
    missing_stack_arguments,
    mixer_mask_key,
    num_hidden_layers,
    outside_verified_range,
    plain_function,
    prevent_auto_compile,
    runs_attention,
    set_experts_implementation,
    stack_arguments,
    use_capturable_experts,
    uses_attention_interface,
)
from .caches import (  # noqa: F401
    MixerStateName,
    SUPPORTED_CACHES,
    cache_of,
    cache_state,
    copy_cache,
    dynamic_layer_tensors,
    full_dynamic_layers,
    host_lengths,
    makes_full_static_caches,
    mixer_state,
    new_cache,
    output_with_cache,
    past_length,
    rebind_dynamic_layer,
    rebind_mixer_state,
    rebind_static_layer,
    set_host_lengths,
    settled_mixer_states,
    sliding_lengths_as_tensors,
    stack_cache_class,
    static_cache_like,
    static_layer_tensors,
    static_layers,
    unsupported_cache_reason,
    update_cache,
)
from .masks import (  # noqa: F401
    builds_full_masks_only,
    create_masks,
    mask_windows,
    masks_build_in_graphs,
)
from .attention import (  # noqa: F401
    attention_configs,
    attention_function,
    attention_implementation,
    attention_implementation_of,
    masked_gqa_in_sdpa,
    register_attention,
)
