"""The project's errors: a leaf module every stage may import (it imports nothing of ours).

Each message names the file, key or option at fault and what would fix it. The entrypoint
(`breakhis-ft`) ends on one of these with its message and the exit status EXIT_CODES gives it,
not a traceback (that goes to the run's log file).
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


class StainFitError(BadDataError):
    """A stain reference no normaliser can be fitted to (no training images, no stain in them);
    the message names `data.stain_reference` and what to give instead."""


class SplitLeakError(ValueError):
    """A patient group found in more than one split."""


class FeatureCacheError(ValueError):
    """`model.cache_vision_features=true` for a model whose vision tower trains, which only its
    built adapter shows (a custom list of target modules); the message says what to choose."""


class DeviceError(RuntimeError):
    """The config asks for what this machine cannot do; the message names the key and the fix."""


class CheckpointError(RuntimeError):
    """No checkpoint of a run folder can be resumed from; the message names the damaged files."""


# The exit status of `breakhis-ft` when a run ends on one of these (first match; subclasses
# first). 2 is also a refused command line or folder; 130 / 143 a run stopped by Ctrl-C /
# SIGTERM; 1 anything else (a bug: its traceback is printed).
EXIT_CODES: tuple[tuple[type[Exception], int], ...] = (
    (ConfigError, 2),  # a config value or combination (also Hydra's composition errors)
    (FeatureCacheError, 2),  # model.cache_vision_features=true for a model that cannot
    (BadDataError, 3),  # the data: bad or missing files, a stain reference (StainFitError)
    (SplitLeakError, 3),  # a patient group in two splits
    (ModelLoadError, 4),  # a model that cannot be loaded (access, path, format)
    (CheckpointError, 4),  # resume=: no checkpoint that verifies
    (DeviceError, 5),  # what this machine cannot do (bf16 on an old GPU, ...)
    (NonFiniteError, 6),  # training diverged: stopped, the last good checkpoint kept
)


def exit_code(error: BaseException) -> int | None:
    """The exit status for a known error (EXIT_CODES); None for any other."""
    for kind, code in EXIT_CODES:
        if isinstance(error, kind):
            return code
    return None
