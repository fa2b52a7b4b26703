"""The project's errors: a leaf module every stage may import (it imports nothing of ours).

Each message names the file, key or option at fault and what would fix it.
"""

from __future__ import annotations


class BadDataError(ValueError):
    """Input data that cannot be used; the message names the files and what is wrong."""


class ConfigError(ValueError):
    """A config value or combination that cannot work; the message names the key and the fix."""


class ModelLoadError(OSError):
    """A checkpoint that could not be loaded; the message says how to get access or a local copy."""


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient: the run stops at that step, the last good checkpoint kept."""
