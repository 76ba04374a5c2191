"""Capture sizes: the ladder of token counts graphs are captured for, and picking a bucket."""

from __future__ import annotations

import bisect
import numbers
from collections.abc import Iterable

# Packed prompts (real tokens only) replay faster than eager up to 8k tokens, and an unpadded 6k-token call is no
# slower (H200, results/prefill/: superseded/prefill_qwen3-0.6b_varlen_b13290e.md, 4424 real tokens 1.19x;
# prefill_qwen3-0.6b_6144_unpadded.md, 1.02x): larger calls run eagerly by default.
DEFAULT_MAX_NUM_TOKENS = 8192

# Dense where decode and small prefills live; from 1024 tokens eight sizes per doubling (at most 12.5% padding), as a
# prefill there is GPU-bound and every padded row costs its full share (Qwen3-8B shape, 1134 tokens: time follows
# the bucket's rows: 1280 -> 1152 rows, 44.73 -> 40.28 ms, results/prefill/superseded/prefill_qwen3-8b_varlen_b13290e.md
# and prefill_qwen3-8b_varlen.md).
_SMALL = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512, 640, 768, 896)
_LADDER = _SMALL + tuple(octave + step * octave // 8 for octave in (1024, 2048, 4096, 8192) for step in range(8))


def default_capture_sizes(max_num_tokens: int) -> list[int]:
    """The default ladder up to ``max_num_tokens`` (always including it)."""
    sizes = [n for n in _LADDER if n < max_num_tokens]
    return sizes + [max_num_tokens]


def _is_positive_int(value: object) -> bool:
    """Any integral type (int, NumPy or torch integers), not bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def validate_max_num_tokens(max_num_tokens: object) -> int:
    if not _is_positive_int(max_num_tokens):
        raise ValueError(f"max_num_tokens must be a positive int, got {max_num_tokens!r}; e.g. max_num_tokens=4096")
    return int(max_num_tokens)  # type: ignore[arg-type]


def resolve_capture_sizes(capture_sizes: Iterable[int] | None, max_num_tokens: int) -> list[int]:
    """Validated, sorted, de-duplicated sizes; the default ladder when ``capture_sizes`` is None."""
    if capture_sizes is None:
        return default_capture_sizes(max_num_tokens)
    if isinstance(capture_sizes, (str, bytes)) or not isinstance(capture_sizes, Iterable):
        raise ValueError(f"capture_sizes must be a list of positive ints, got {capture_sizes!r}; e.g. [1, 8, 64, 512]")
    sizes = list(capture_sizes)
    bad = [s for s in sizes if not _is_positive_int(s)]
    if not sizes or bad:
        raise ValueError(
            f"capture_sizes must be a non-empty list of positive ints, got {sizes!r}"
            f"{' (bad: ' + repr(bad) + ')' if bad else ''}; e.g. capture_sizes=[1, 8, 64, 512]"
        )
    too_big = [s for s in sizes if s > max_num_tokens]
    if too_big:
        raise ValueError(
            f"capture_sizes {too_big} exceed max_num_tokens={max_num_tokens}; raise max_num_tokens or drop those sizes"
        )
    return sorted({int(s) for s in sizes})


def pick_bucket(sizes: list[int], num_tokens: int) -> int | None:
    """Smallest captured size >= ``num_tokens``, or None when it is larger than every size."""
    i = bisect.bisect_left(sizes, num_tokens)
    return sizes[i] if i < len(sizes) else None
