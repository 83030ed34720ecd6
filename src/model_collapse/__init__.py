"""model-collapse: self-consuming diffusion loops, their collapse metrics, and entropy-based selection.

The Python API, imported on first use (so that `import model_collapse.config` stays free of torch):

    from model_collapse import load_images, pixel_vectors, select, kl_entropy, generalization_score
"""

__version__ = "0.1.0"

API = {
    "load_images": "model_collapse.data",
    "pixel_vectors": "model_collapse.data",
    "select": "model_collapse.selection",
    "kl_entropy": "model_collapse.metrics",
    "generalization_score": "model_collapse.metrics",
    "frechet_distance": "model_collapse.metrics",
    "knn": "model_collapse.neighbours",
    "resolve_config": "model_collapse.config",
    "run_loop": "model_collapse.loop",
}
__all__ = sorted(API)


def __getattr__(name: str):
    if name not in API:
        raise AttributeError(f"module 'model_collapse' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(API[name]), name)
