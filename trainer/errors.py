"""The trainer's error types: each is a ``common.errors.UserError`` (one line, exit status 2, no traceback)."""

from __future__ import annotations

from common.errors import UserError


class ConfigError(UserError, ValueError):
    """A run configuration or DeepSpeed JSON that cannot be used; the message names the key or file."""


class DistError(UserError):
    """The environment does not describe a usable process group."""


class CheckpointError(UserError):
    """A run directory or checkpoint is missing something or is inconsistent (the message names the file)."""


class FinetuneError(UserError):
    """Bad fine-tuning data or settings (the message names the file / row / column / key)."""
