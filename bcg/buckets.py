"""Capture sizes: the ladder of token counts graphs are captured for, and picking a bucket."""

from __future__ import annotations

import bisect
import numbers
from collections.abc import Iterable

# Past ~4k tokens a prefill is GPU-bound and replaying gains nothing (results/prefill_qwen3-0.6b_grid.md:
# 5.9k-6.1k tokens ran at 0.85-0.95x eager): such calls run eagerly by default.
DEFAULT_MAX_NUM_TOKENS = 4096

# Dense where decode and small prefills live, then ~1.25-1.5x steps so padding stays under 50%; above 2k (GPU-bound
# prefills, where every padded row costs its full share) steps of 1.14-1.25x.
_LADDER = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512, 640, 768, 1024,
           1280, 1536, 2048, 2560, 3072, 3584, 4096, 4608, 5120, 6144, 7168, 8192, 10240, 12288, 16384)


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
