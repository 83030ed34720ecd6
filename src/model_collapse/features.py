"""Feature spaces: a validated registry mapping a name to an extractor, shared by every metric and selector.

An extractor maps uint8 NHWC images to float32 vectors (N, d). `pixel` is the flattened image scaled to [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from model_collapse.data import pixel_vectors
from model_collapse.errors import UserError


@dataclass(frozen=True)
class SpaceContext:
    """What an extractor may need beyond the images: where to find weights, the run's real data and seed."""

    feature_dir: str | None = None
    run_dir: str | None = None
    real_images: np.ndarray | None = None
    real_labels: np.ndarray | None = None
    seed: int = 0
    domain_steps: int = 600
    device: str | None = None


SPACES: dict[str, Callable[[np.ndarray, SpaceContext], np.ndarray]] = {
    "pixel": lambda images, ctx: pixel_vectors(images),
}


def check_space(name: str) -> None:
    if name not in SPACES:
        raise UserError(f"unknown space {name!r}; spaces: {', '.join(SPACES)}")


def extract(name: str, images: np.ndarray, ctx: SpaceContext | None = None) -> np.ndarray:
    """Feature vectors of images in the named space."""
    check_space(name)
    return SPACES[name](images, ctx or SpaceContext())
