import os

import numpy as np
import pytest
from PIL import Image

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


def bad_image_inputs(tmp_path):
    """Every kind of bad image input, as {name: (path, regex the one-line error must match)}."""
    (tmp_path / "empty").mkdir()
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(mixed / "a.png")
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(mixed / "b.png")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(corrupt / "a.png")
    (corrupt / "b.png").write_bytes(b"\x89PNG broken")
    np.save(tmp_path / "rank.npy", np.zeros((4, 4), np.uint8))
    np.save(tmp_path / "dtype.npy", np.zeros((4, 4, 4), np.int64))
    for name, value in (("nan", np.nan), ("inf", np.inf)):
        a = np.zeros((4, 4, 4), np.float32)
        a[1, 2, 3] = value
        np.save(tmp_path / f"{name}.npy", a)
    np.save(tmp_path / "range.npy", np.full((4, 4, 4), 3.0, np.float32))
    (tmp_path / "garbage.npy").write_bytes(b"\x93NUMPY garbage")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "nokey.npz", pixels=np.zeros((2, 4, 4), np.uint8))
    (tmp_path / "zero-bytes.npy").write_bytes(b"")
    np.save(tmp_path / "no-images.npy", np.zeros((0, 4, 4), np.uint8))
    return {
        "missing": (str(tmp_path / "nope.npy"), "no such file"),
        "empty folder": (str(tmp_path / "empty"), "no images"),
        "mixed sizes": (str(mixed), "mixed image sizes"),
        "corrupt": (str(corrupt), "cannot read image"),
        "rank": (str(tmp_path / "rank.npy"), "shape"),
        "dtype": (str(tmp_path / "dtype.npy"), "dtype"),
        "nan": (str(tmp_path / "nan.npy"), "NaN or inf"),
        "inf": (str(tmp_path / "inf.npy"), "NaN or inf"),
        "range": (str(tmp_path / "range.npy"), r"\[0, 1\]"),
        "garbage": (str(tmp_path / "garbage.npy"), "cannot read"),
        "pickled": (str(tmp_path / "obj.npy"), "cannot read"),
        "no images key": (str(tmp_path / "nokey.npz"), "no 'images'"),
        "empty file": (str(tmp_path / "zero-bytes.npy"), "cannot read"),
        "zero images": (str(tmp_path / "no-images.npy"), "contains no images"),
    }
