"""The names a config may use, in one light module (no torch): paradigms, selectors, samplers, feature spaces,
UNet presets. Each heavy module maps these names to its builders and checks at import that it covers them, so
validating a config needs no network library, and a name is never listed twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from model_collapse.errors import UserError

PARADIGMS = ("replace", "accumulate", "fresh")
SELECTORS = ("random", "greedy", "threshold", "gated", "herding", "capped")
SAMPLERS = ("ddpm", "ddim", "dpm", "euler", "euler-ancestral", "unipc")
DINOV2 = ("dinov2-small", "dinov2-base", "dinov2-large", "dinov2-giant")
SPACES = ("pixel", "domain", "inception") + DINOV2


@dataclass(frozen=True)
class UNetSpec:
    channels: tuple[int, ...]
    layers_per_block: int
    norm_groups: int
    attention_levels: tuple[int, ...] = ()  # 1-based levels with self-attention


def paper_unet(c: int, norm_groups: int = 32) -> UNetSpec:
    """The paper's UNet: channels (c, c, 2c, 2c, 4c, 4c), attention at level 5, 2 layers per block."""
    return UNetSpec((c, c, 2 * c, 2 * c, 4 * c, 4 * c), 2, norm_groups, (5,))


MODEL_PRESETS: dict[str, UNetSpec] = {
    # CPU demo on 8x8 digits: 0.27M parameters, about 20 training steps/s at batch 64 on one core
    "tiny": UNetSpec((16, 32, 32), 1, 8),
    "small": UNetSpec((32, 64, 64), 1, 8),
    "unet32": paper_unet(32),
    # 48 is not a multiple of 32 norm groups; 16 divides 48, 96 and 192
    "unet48": paper_unet(48, norm_groups=16),
    "unet64": paper_unet(64),
    "unet128": paper_unet(128),
}


def check_name(kind: str, name: str, valid) -> None:
    """A one-line error naming the valid choices when `name` is not one of them."""
    if name not in valid:
        raise UserError(f"unknown {kind} {name!r}; {kind}s: {', '.join(valid)}")


def resolve_device(device: str | None) -> str:
    """The torch device a run uses: the configured one, else cuda when available, else cpu."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
