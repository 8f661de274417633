"""The errors a user can fix: each ``str(err)`` is one line naming the problem and the fix. Imports nothing,
so every module can raise them without importing the request type (no import circles)."""

from __future__ import annotations


class BrushworkError(Exception):
    """A problem the user can fix. ``str(err)`` is one line that names the problem and the fix."""


class InvalidRequest(BrushworkError):
    """The request itself is wrong (bad size, unknown sampler, strength out of range, ...)."""


class ModelError(BrushworkError):
    """The model cannot be found, read, trusted or recognised."""


class Cancelled(BrushworkError):
    """The run was cancelled (interrupt) before it finished."""
