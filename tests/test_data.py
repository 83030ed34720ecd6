import numpy as np
import pytest
from PIL import Image

from conftest import bad_image_inputs

from model_collapse.data import load_images, pixel_vectors, read_cifar10_binary
from model_collapse.errors import UserError


def test_digits_builtin():
    s = load_images("digits")
    assert s.images.shape == (1797, 8, 8, 1) and s.images.dtype == np.uint8
    assert s.images.max() == 255 and s.labels is not None and set(s.labels) == set(range(10))


def test_npy_npz_and_folders_roundtrip(tmp_path, rng):
    imgs = rng.integers(0, 256, size=(6, 5, 5, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", imgs)
    np.savez(tmp_path / "b.npz", images=imgs, labels=np.arange(6))
    np.save(tmp_path / "f.npy", imgs.astype(np.float32) / 255)
    for name in ("a.npy", "b.npz", "f.npy"):
        np.testing.assert_array_equal(load_images(str(tmp_path / name)).images, imgs)
    assert load_images(str(tmp_path / "b.npz")).labels.tolist() == list(range(6))
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(folder / f"{i:02d}.png")
    np.testing.assert_array_equal(load_images(str(folder)).images, imgs)
    classes = tmp_path / "classes"
    for c in ("cat", "dog"):
        (classes / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(imgs[i]).save(classes / c / f"{i}.png")
    s = load_images(str(classes))
    assert s.labels.tolist() == [0, 0, 1, 1]


def test_greyscale_npy_gets_channel_axis(tmp_path, rng):
    np.save(tmp_path / "g.npy", rng.integers(0, 256, size=(4, 8, 8), dtype=np.uint8))
    assert load_images(str(tmp_path / "g.npy")).images.shape == (4, 8, 8, 1)


def test_pixel_vectors_scale_to_unit_interval():
    v = pixel_vectors(np.array([[[[0], [255]]]], dtype=np.uint8))
    np.testing.assert_array_equal(v, [[0.0, 1.0]])


def test_cifar10_binary_reader(tmp_path, rng):
    n = 7
    labels = rng.integers(0, 10, n).astype(np.uint8)
    pixels = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    records = np.concatenate([labels[:, None], pixels.reshape(n, -1)], axis=1)
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for i in range(1, 6):
        records.tofile(folder / f"data_batch_{i}.bin")
    s = read_cifar10_binary([folder / "data_batch_1.bin"])
    np.testing.assert_array_equal(s.images, pixels.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(s.labels, labels)
    full = load_images("cifar10", root=str(tmp_path))
    assert full.images.shape == (35, 32, 32, 3)


def test_bad_inputs_raise_one_line_user_errors(tmp_path, rng):
    for what, (path, msg) in bad_image_inputs(tmp_path).items():
        with pytest.raises(UserError, match=msg) as e:
            load_images(path)
        assert "\n" not in str(e.value), what


def test_cifar10_without_files_says_where(tmp_path):
    with pytest.raises(UserError, match="cifar-10-batches-bin"):
        load_images("cifar10", root=str(tmp_path))
