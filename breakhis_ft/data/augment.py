"""Training-only histology augmentation: flips, 90-degree rotations and H&E stain jitter.

Every draw comes from a generator seeded by (seed, epoch, index), so an image's augmentation is
the same whenever it is asked for again (any worker, any resume) and differs between epochs.
Stain jitter follows Tellez et al. (2018): colour deconvolution into haematoxylin, eosin and DAB
optical densities (Ruifrok & Johnston), each scaled by U(1 - s, 1 + s) and shifted by U(-s, s),
then recomposed.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from breakhis_ft.config import AugmentConfig

# Ruifrok & Johnston stain matrix (rows: haematoxylin, eosin, DAB optical densities per RGB).
RGB_FROM_HED = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float32
)
RGB_FROM_HED /= np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED).astype(np.float32)
_TRANSPOSES = {
    (True, False): Image.Transpose.FLIP_LEFT_RIGHT,
    (False, True): Image.Transpose.FLIP_TOP_BOTTOM,
    (True, True): Image.Transpose.ROTATE_180,
}
_ROTATIONS = {
    1: Image.Transpose.ROTATE_90,
    2: Image.Transpose.ROTATE_180,
    3: Image.Transpose.ROTATE_270,
}


def is_identity(cfg: AugmentConfig | None) -> bool:
    """True when the config changes no pixel (no flips, no rotations, no stain jitter)."""
    return cfg is None or not (cfg.flips or cfg.rot90 or cfg.stain_jitter > 0)


def stain_jitter(rgb: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """HED colour-space jitter of a uint8 HxWx3 image; strength 0 returns it unchanged."""
    if strength <= 0:
        return rgb
    od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0)  # optical density, >= 0
    hed = od.reshape(-1, 3) @ HED_FROM_RGB
    alpha = rng.uniform(1 - strength, 1 + strength, 3).astype(np.float32)
    beta = rng.uniform(-strength, strength, 3).astype(np.float32)
    od = (hed * alpha + beta) @ RGB_FROM_HED
    out = 256.0 * np.exp(-od) - 1.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(rgb.shape)


class Augmenter:
    """Apply an AugmentConfig to PIL images, deterministically given (seed, epoch, index)."""

    def __init__(self, cfg: AugmentConfig) -> None:
        if cfg.stain_jitter < 0 or cfg.stain_jitter >= 1:
            raise ValueError(
                f"data.augment.stain_jitter={cfg.stain_jitter}: must be in [0, 1) "
                "(0.05 is light, 0.2 strong)"
            )
        self.cfg = cfg

    def __call__(self, image: Image.Image, epoch: int, index: int) -> Image.Image:
        """The augmented copy of `image` for this epoch and dataset index."""
        rng = np.random.default_rng([int(self.cfg.seed), int(epoch), int(index)])
        # draw everything up front so each option's randomness does not depend on the others
        flips, k, jitter_rng = rng.random(2) < 0.5, int(rng.integers(4)), rng.spawn(1)[0]
        if self.cfg.flips and (key := (bool(flips[0]), bool(flips[1]))) in _TRANSPOSES:
            image = image.transpose(_TRANSPOSES[key])
        if self.cfg.rot90 and k:
            image = image.transpose(_ROTATIONS[k])
        if self.cfg.stain_jitter > 0:
            rgb = np.asarray(image.convert("RGB"))
            image = Image.fromarray(stain_jitter(rgb, self.cfg.stain_jitter, jitter_rng))
        return image
