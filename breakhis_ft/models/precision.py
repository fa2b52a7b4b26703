"""The precision a name means: the weights' dtype and accelerate's mixed-precision mode.

The fp16 refusal for Gemma 3 is a compose-time check (`validate.py`); whether the device computes in
bfloat16 is checked as a run is set up (`run/setup.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}  # accelerate's names


@dataclass(frozen=True)
class Precision:
    """What `precision.name` means."""

    name: str  # bf16 | fp16 | fp32
    dtype: torch.dtype  # of the frozen weights (adapters and heads stay float32)
    mixed_precision: str  # accelerate's: bf16 | fp16 | no

    @classmethod
    def of(cls, name: str) -> Precision:
        """The precision named `name` (the device is checked by the run's setup)."""
        return cls(str(name), DTYPES[str(name)], MIXED_PRECISION[str(name)])
