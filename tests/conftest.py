import os

import numpy as np
import pytest

# keep the suite's torch work on the cores CI has, and quiet
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def brute_knn(x, y=None, k=1):
    """Straightforward exact kNN: float64 distances from differences, ties to the lowest index."""
    x = np.asarray(x, np.float64)
    same = y is None
    y = x if same else np.asarray(y, np.float64)
    d = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    if same:
        np.fill_diagonal(d, np.inf)
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.sqrt(np.take_along_axis(d, idx, 1)), idx
