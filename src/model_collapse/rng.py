"""Seeds derived from coordinates, never from history.

Every random choice in a run takes its seed from the root seed and where it happens (arm, iteration, phase,
index), so a resumed run draws exactly what an uninterrupted one would, and sample i is the same for any batch
size or number of processes.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(root: int, *coords: object) -> int:
    """A 63-bit seed from the root seed and any coordinates (strings and integers), stable across platforms."""
    text = repr((int(root),) + tuple(str(c) for c in coords)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def numpy_rng(root: int, *coords: object) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(derive_seed(root, *coords)))


def torch_generator(root: int, *coords: object, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(root, *coords))
    return g
