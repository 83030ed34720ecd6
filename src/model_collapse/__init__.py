"""model-collapse: self-consuming diffusion loops, their collapse metrics, and entropy-based selection."""

__version__ = "0.1.0"
