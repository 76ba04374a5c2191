"""Public entry points: ``wrap_model`` patches the stack's forward, ``unwrap_model`` restores the model exactly."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from . import hf, patching
from .backends import Backend, make_backend
from .buckets import DEFAULT_MAX_NUM_TOKENS, resolve_capture_sizes, validate_max_num_tokens
from .eligibility import model_unsupported_reason
from .errors import BcgFallbackWarning, BcgVersionWarning, BcgWarning
from .fusion import Fusions, find_fusions, unavailable_reason
from .mixers import ModuleBreaks, find_module_breaks
from .resolve import Stack, find_stack
from .runner import StackRunner
from .stats import Stats

logger = logging.getLogger("bcg")

_HANDLE_ATTRIBUTE = "_bcg_handle"
_DEBUG_MODES = (False, True, "addresses", "numerics")
_ATTENTION_KERNELS = ("fast", "eager")
MODES = ("fast", "exact")


@dataclass
class _Restore:
    """What wrapping changed on the model, to put back on unwrap."""

    stack: torch.nn.Module | None = None
    instance_forward: Any = None  # an instance-level forward that existed before (e.g. an accelerate hook)
    experts_implementation: Any = None
    fusions: Fusions | None = None  # whose merged projections get storage of their own again


@dataclass(frozen=True)
class SpeedChoices:
    """What ``mode`` (and the two overrides) resolved to for one wrapped model."""

    mode: str
    attention_kernels: str
    fused_kernels: bool
    fused_asked: bool  # the caller asked for fused kernels by name: finding nothing to fuse is worth a warning
    static_cache: bool  # decode steps on dynamic caches replay full graphs on static stand-ins

    @property
    def fast_decode(self) -> bool:
        """Decode steps replay graphs of their own with the fast choices; unpadded prompts and log-likelihoods stay
        eager's."""
        return self.attention_kernels == "fast" or self.fused_kernels

    @property
    def varlen_prompts(self) -> bool:
        """Padded prompts attend per request on their real tokens (varlen.py) rather than through the padded layout."""
        return self.attention_kernels == "fast"


class BcgHandle:
    """What ``wrap_model`` returns: ``stats()`` reports replays, rejects by reason, captures and memory."""

    def __init__(self, model: torch.nn.Module, runner: StackRunner | None, backend: str,
                 inactive_reason: str | None, restore: _Restore, choices: SpeedChoices) -> None:
        self.model = model
        self.runner = runner
        self.backend = backend
        self.inactive_reason = inactive_reason
        self.choices = choices
        self._restore = restore

    def stats(self) -> dict:
        """Replays, rejects by reason, captured sizes, capture seconds and graph and static-cache memory so far."""
        if self.runner is None:
            stats = Stats(self.backend).as_dict(ready=False, disabled_reason=self.inactive_reason)
            static_bytes = 0
        else:
            stats = self.runner.stats.as_dict(ready=self.runner.ready, disabled_reason=self.runner.disabled_reason)
            static_bytes = self.runner.full_graphs.held_bytes()
        verifier = self.runner.verifier if self.runner is not None else None
        verifier = verifier if verifier is not None and not verifier.every_call else None
        return {"mode": self.choices.mode, "attention_kernels": self.choices.attention_kernels,
                "static_cache": self.choices.static_cache, **stats, "static_cache_bytes": static_bytes,
                "transformers": {"installed": hf.installed_transformers(), "verified": list(hf.VERIFIED_TRANSFORMERS)},
                "verify": {"on": verifier is not None, **(verifier.as_dict() if verifier else {})}}

    def __reduce__(self) -> tuple:
        # A copy or pickle of a wrapped model is an unwrapped model (see patching.py): the handle becomes None.
        return patching.dropped, ()

    def __repr__(self) -> str:
        s = self.stats()
        return (f"BcgHandle(backend={s['backend']!r}, mode={s['mode']!r}, ready={s['ready']}, replays={s['replays']}, "
                f"captured={s['captured']})")


def _check_model(model: Any) -> None:
    if not hf.is_pretrained_model(model):
        raise TypeError(
            f"bcg.wrap_model expects a transformers *ForCausalLM model, got {type(model).__name__}; "
            "load one with AutoModelForCausalLM.from_pretrained(...)"
        )
    if getattr(model.config, "is_encoder_decoder", False) or not model.can_generate():
        raise TypeError(
            f"{type(model).__name__} is not a decoder-only causal LM; bcg wraps *ForCausalLM models "
            "(AutoModelForCausalLM)"
        )


def _pick_backend(backend: str | None, device: torch.device) -> str:
    if backend not in (None, "cuda", "eager"):
        raise ValueError(f"backend must be 'cuda', 'eager' or None, got {backend!r}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(
            f"model is on {device.type}: bcg needs a CUDA device; use backend='eager' to debug on CPU"
        )
    if backend is None:
        if device.type == "cuda":
            return "cuda"
        warnings.warn(
            f"bcg: model is on {device.type}, not a CUDA device; using backend='eager' (same runner, no graphs, "
            "no speed-up). Move the model to a GPU for real graphs.",
            BcgFallbackWarning,
            stacklevel=3,
        )
        return "eager"
    return backend


def _use_capturable_experts(model: Any, restore: _Restore) -> None:
    """MoE experts must run a capturable implementation: the default eager loop syncs on ``nonzero``."""
    try:
        restore.experts_implementation = hf.use_capturable_experts(model)
    except (ValueError, ImportError, KeyError) as error:
        logger.info("bcg: could not switch experts to grouped_mm (%s); capture may fail and fall back", error)


def speed_choices(mode: str, attention_kernels: str | None, fused_kernels: bool | None,
                  device: torch.device | None, static_cache: bool | None = None) -> SpeedChoices:
    """``mode``'s attention kernels, fusion and static stand-ins, each overridable; ``fast`` fuses only where fused
    kernels can run (``device`` None: as if they could, e.g. to know what a run elsewhere would choose)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if attention_kernels is None:
        attention_kernels = "fast" if mode == "fast" else "eager"
    elif attention_kernels not in _ATTENTION_KERNELS:
        raise ValueError(f"attention_kernels must be one of {_ATTENTION_KERNELS} or None (from mode), "
                         f"got {attention_kernels!r}")
    why_not_fused = unavailable_reason(device) if device is not None else None
    asked = fused_kernels is True
    if fused_kernels is None:
        fused_kernels = mode == "fast" and why_not_fused is None
        if mode == "fast" and why_not_fused is not None:
            logger.info("bcg: mode='fast' without fused kernels: %s", why_not_fused)
    elif not isinstance(fused_kernels, bool):
        raise ValueError(f"fused_kernels must be True, False or None (from mode), got {fused_kernels!r}")
    elif fused_kernels and why_not_fused is not None:
        raise ValueError(f"fused_kernels=True: {why_not_fused}; wrap without fused_kernels instead")
    if static_cache is None:
        static_cache = mode == "fast"
    elif not isinstance(static_cache, bool):
        raise ValueError(f"static_cache must be True, False or None (from mode), got {static_cache!r}")
    return SpeedChoices(mode, attention_kernels, fused_kernels, asked, static_cache)


def _fusions(model: Any, stack: torch.nn.Module, asked: bool) -> Fusions:
    """What to fuse in ``stack``, with its projections merged (``model``'s weights change storage: before the runner
    records their addresses)."""
    fusions = find_fusions(stack)
    fusions.merge_projections(model)
    if fusions.unmatched:  # transformers rewrote the code, or the model's differs: say so rather than run slower
        warnings.warn(f"bcg: {', '.join(fusions.unmatched)} differ from Llama's code and are not fused "
                      "(stats()['fused_kernels'])", BcgWarning, stacklevel=3)
    elif not fusions and asked:
        warnings.warn("bcg: fused_kernels=True but this model has no RMSNorm, rotary, SwiGLU or decoder layer code "
                      "to fuse", BcgWarning, stacklevel=3)
    logger.info("bcg: fused kernels for %s", fusions.describe())
    return fusions


def wrap_model(
    model: Any,
    *,
    capture_sizes: list[int] | None = None,
    max_num_tokens: int = DEFAULT_MAX_NUM_TOKENS,
    backend: str | None = None,
    lazy: bool = True,
    debug: bool | str = False,
    mode: str = "fast",
    static_cache: bool | None = None,
    attention_kernels: str | None = None,
    fused_kernels: bool | None = None,
    verify: bool | None = None,
) -> BcgHandle:
    """Capture ``model``'s layer stack in breakable CUDA graphs keyed by token count and replay it on every call.

    Args:
        capture_sizes: token counts (batch x sequence) to capture; default: a ladder up to ``max_num_tokens``.
        max_num_tokens: calls with more tokens (a padded call: real tokens) run eagerly.
        backend: ``"cuda"`` (real graphs), ``"eager"`` (same runner, no graphs: CPU and debugging);
            default ``"cuda"`` when the model is on a GPU.
        lazy: capture each size on first use (default) or all of them now, largest first.
        debug: ``True`` / ``"addresses"`` raises naming every tensor that moved since capture;
            ``"numerics"`` runs every call on the graphs (a copy of its cache) and on eager, records the largest
            relative difference in ``stats()["numerics"]`` and returns eager's answer.
        mode: ``"fast"`` (default): decode steps (one token per sequence) on full-attention caches replay as one
            graph each on static stand-ins (``static_cache``); where they take breaks (sliding-window and hybrid
            caches, ``static_cache=False``) they replay graphs of their own whose breaks keep SDPA off cuDNN (whose
            planning costs 1-2 ms of host time per layer when the KV length changes every step). Where triton is
            installed, decode graphs hold fused Triton kernels for Llama-style RMSNorm and rotary code (one launch
            instead of 8-10, Qwen3's q/k norms inside the rotary kernel), SwiGLU's SiLU and product, the residual
            add before the post-attention norm and, in full decode graphs, the static cache's key and value write,
            and run q/k/v and gate/up as one GEMM each (their weights merged into one tensor per group now, the same
            parameters and values; unwrap_model separates them again). A
            padded prompt replays those graphs too and attends each request on its real tokens with a
            variable-length kernel (varlen.py); unpadded prompts and calls without
            a padding mask (log-likelihoods) run eager's kernels as in ``"exact"``: their outputs are exact mode's;
            generated bf16 text can fork from eager's by rounding (docs/benchmarks.md: MGSM). ``"exact"``: eager's
            kernels everywhere (MGSM on a real model: identical text and log-likelihoods; bf16 near-ties may still flip
            where a bucket's flat token run changes a matmul's shape).
        static_cache: decode steps on a dynamic cache (``generate()``'s default) replay as one graph, attention and
            cache update included (no breaks), on a static cache bcg keeps for the shape (positions rounded up to a
            power of two, at least 256) whose tensors the caller's cache then views; prompts run on the caller's cache
            as without it. Attention then spans the rounded positions (masked), so bf16 rounding differs from the
            dynamic cache's. None (default): from ``mode`` (on in ``"fast"``, off in ``"exact"``). Any call given a
            ``StaticCache`` gets one graph per step anyway (sliding layers until their window is full); dynamic
            sliding-window caches and hybrid caches keep their breaks. Indexed (sparse) attention's stand-in steps
            compute what a StaticCache does: among exactly tied index scores they may select other keys than the
            dynamic cache (docs/design.md). In the fast mode these graphs run grouped-query attention beside the mask
            (cuDNN, planned at capture). Costs memory: up to two stand-ins, each at most half the device's free memory
            when made.
        attention_kernels: override ``mode``'s attention choice alone: ``"fast"`` (no cuDNN in decode breaks, varlen
            attention for padded prompts) or ``"eager"`` (SDPA's own choice, padded prompts' mask); None: from ``mode``.
        fused_kernels: override ``mode``'s fusion alone: True (CUDA and triton required: error otherwise), False,
            or None (from ``mode``: on in ``"fast"`` where it can run).
        verify: check the first call of each kind (prompt, decode step, continuation; per path and cache class)
            against the eager model on copies, and run a kind that differs eagerly (verify.py). None (default): on
            only where the installed transformers is outside the range bcg was verified on (with a warning).
    """
    _check_model(model)
    existing = getattr(model, _HANDLE_ATTRIBUTE, None)
    if existing is not None:
        warnings.warn("bcg: model is already wrapped; returning the existing handle (unwrap_model first to change "
                      "options)", BcgWarning, stacklevel=2)
        return existing
    max_num_tokens = validate_max_num_tokens(max_num_tokens)
    sizes = resolve_capture_sizes(capture_sizes, max_num_tokens)
    if debug not in _DEBUG_MODES:
        raise ValueError(f"debug must be one of {_DEBUG_MODES}, got {debug!r}")
    if not isinstance(lazy, bool):
        raise ValueError(f"lazy must be True or False, got {lazy!r}")
    verify = _verify_replays(verify)
    device = next(model.parameters()).device
    choices = speed_choices(mode, attention_kernels, fused_kernels, device, static_cache)
    backend_name = _pick_backend(backend, device)

    restore = _Restore()
    stack = find_stack(model)
    breaks = ModuleBreaks()
    reason = "no layer stack found (no module holds a ModuleList of num_hidden_layers layers)" if stack is None else (
        model_unsupported_reason(model, stack.config, stack.module)
    )
    if reason is None:
        breaks, reason = find_module_breaks(stack, device)
    if reason is not None:
        warnings.warn(f"bcg: {type(model).__name__} stays eager: {reason}", BcgFallbackWarning, stacklevel=2)
        handle = BcgHandle(model, None, backend_name, reason, restore, choices)
    else:
        graph_backend = make_backend(backend_name, device, choices.attention_kernels)
        runner = _patch_stack(model, stack, breaks, restore, graph_backend, sizes, debug, choices, verify)
        handle = BcgHandle(model, runner, backend_name, None, restore, choices)
        logger.info("bcg: wrapped %s at '%s' (%d layers, %d module breaks), backend=%s, mode=%s, sizes=%s",
                    type(model).__name__, stack.path, len(stack.layers), len(breaks.modules), backend_name,
                    choices.mode,
                    sizes)
    setattr(model, _HANDLE_ATTRIBUTE, handle)
    if handle.runner is not None and not lazy:
        handle.runner.capture_all()
    return handle


def _verify_replays(verify: bool | None) -> bool:
    if verify not in (None, True, False):
        raise ValueError(f"verify must be True, False or None (on outside the verified transformers range), got "
                         f"{verify!r}")
    if not hf.outside_verified_range():
        return bool(verify)
    oldest, newest = hf.VERIFIED_TRANSFORMERS
    warnings.warn(f"bcg: transformers {hf.installed_transformers()} is outside the range bcg was verified on "
                  f"({oldest} to {newest}); "
                  + ("bcg checks the first call of each kind against eager and runs any that differ eagerly "
                     "(verify=False turns this off)" if verify is not False else
                     "verify=False: replays are not checked, and may be wrong"),
                  BcgVersionWarning, stacklevel=3)
    return verify is not False


def _patch_stack(model: Any, stack: Stack, breaks: ModuleBreaks, restore: _Restore, backend: Backend,
                 sizes: list[int], debug: bool | str, choices: SpeedChoices, verify: bool) -> StackRunner:
    """Build the runner and patch the stack's forward to it (and keep generate() from compiling it); what is changed
    goes into ``restore``."""
    if backend.name == "cuda":
        _use_capturable_experts(model, restore)
    fusions = _fusions(model, stack.module, choices.fused_asked) if choices.fused_kernels else None
    restore.fusions = fusions
    runner = StackRunner(model, stack, backend, sizes, debug=debug, fusions=fusions, fast_decode=choices.fast_decode,
                         breaks=breaks, static_cache=choices.static_cache, varlen_prompts=choices.varlen_prompts,
                         verify_replays=verify)
    restore.stack = stack.module
    restore.instance_forward = stack.module.__dict__.get("forward")
    patching.patch(stack.module, "forward", runner.forward)
    # generate() compiles the forward for static caches; a compiled graph wrapper must not be compiled again.
    if not hf.prevent_auto_compile(model):
        warnings.warn("bcg: this transformers has no hook to keep generate() from compiling the forward; a static "
                      "cache may make generate() trace the model with torch.compile instead of replaying",
                      BcgWarning, stacklevel=3)
    return runner


def unwrap_model(model: Any) -> Any:
    """Restore the stack's forward, the experts implementation and generate()'s compile choice; free the graphs; give
    merged projection weights storage of their own again."""
    handle: BcgHandle | None = getattr(model, _HANDLE_ATTRIBUTE, None)
    if handle is None:
        warnings.warn("bcg: unwrap_model called on a model that is not wrapped; nothing to do", BcgWarning,
                      stacklevel=2)
        return model
    restore = handle._restore
    if restore.stack is not None:
        if restore.instance_forward is None:
            del restore.stack.forward
        else:
            restore.stack.forward = restore.instance_forward
        hf.allow_auto_compile(model)
    if restore.experts_implementation is not None:
        hf.set_experts_implementation(model, restore.experts_implementation)
    if handle.runner is not None:
        handle.runner.close()
    if restore.fusions is not None:  # after the graphs are freed: each group's clones briefly add its size
        restore.fusions.unmerge_projections()
    delattr(model, _HANDLE_ATTRIBUTE)
    return model
