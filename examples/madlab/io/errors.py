"""The example's one error base: everything it reports as ``error: ...`` (exit code 2) derives from it.

Each module keeps its own subclass (``DataError``, ``ConfigError``, ``BackboneError``,
``CheckpointError``, ``MetricsError``) so tests and callers can tell them apart, while the
command line catches :class:`MadlabError` (and ``lora_vit.LoRAError``) alone.
"""

from __future__ import annotations

__all__ = ["MadlabError"]


class MadlabError(ValueError):
    """An input, file or setting the example cannot use; the message names it and what was expected."""
