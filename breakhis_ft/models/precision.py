"""The precision of a run, resolved once: weights' dtype and accelerate's mixed-precision mode.

The fp16 refusal for Gemma 3 is a compose-time check (`validate.py`); here only what needs the
device is decided: whether it computes in bfloat16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from breakhis_ft.errors import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}  # accelerate's names


@dataclass(frozen=True)
class Precision:
    """What `precision.name` means on this device."""

    name: str  # bf16 | fp16 | fp32
    dtype: torch.dtype  # of the frozen weights (adapters and heads stay float32)
    mixed_precision: str  # accelerate's: bf16 | fp16 | no

    @classmethod
    def of(cls, name: str) -> Precision:
        """The precision named `name`, without a device check (for meta builds and exports)."""
        return cls(str(name), DTYPES[str(name)], MIXED_PRECISION[str(name)])


def resolve_precision(name: str, on_gpu: bool) -> Precision:
    """`precision.name` on the device the run uses; refuses bf16 on a GPU without it."""
    if str(name) == "bf16" and on_gpu and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            "config error: precision: this GPU has no bfloat16 support; use precision=fp32 "
            "(fp16 overflows to NaN on Gemma 3), or a GPU with bf16 (Ampere or newer)"
        )
    return Precision.of(name)
