"""The library's single exception type."""

__all__ = ["LoRAError"]


class LoRAError(ValueError):
    """Raised for every invalid argument, target, state dict or adapter file.

    It subclasses :class:`ValueError`, so code that already catches ``ValueError`` keeps
    working. Messages name the offending value and what was expected instead.
    """
