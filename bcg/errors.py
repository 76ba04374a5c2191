"""bcg's warning and error classes: filter them with ``warnings.filterwarnings(..., category=BcgWarning)``."""


class BcgWarning(UserWarning):
    """Base class of every warning bcg emits."""


class BcgFallbackWarning(BcgWarning):
    """The model (or part of it) runs eagerly: unsupported architecture, device placement or backend."""


class BcgCaptureWarning(BcgWarning):
    """Capturing a graph failed; the affected calls run eagerly."""


class BcgResolveWarning(BcgWarning):
    """The layer stack was found by a fallback path; bcg names what it chose."""


class BcgInvalidatedWarning(BcgWarning):
    """The model's weights moved since capture; the graphs were dropped and will be captured again."""


class BcgVersionWarning(BcgWarning):
    """The installed transformers lies outside the range bcg was verified on: bcg verifies its replays itself."""


class BcgAddressError(RuntimeError):
    """A tensor a graph reads changed address since capture (raised in ``debug`` mode)."""
