"""The one exception type for bad user input, reported as one line with exit code 2."""

from __future__ import annotations

__all__ = ["ConfigError", "NonFiniteError"]


class ConfigError(ValueError):
    """Bad input found before training starts.

    Args:
        field: the config key at fault, e.g. ``"data.label_noise"``.
        message: what is wrong and what is expected.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class NonFiniteError(RuntimeError):
    """Raised after ``trainer.max_skipped`` consecutive non-finite updates (after a checkpoint)."""
