"""Image sets: built-in data sets, .npy / .npz arrays, image folders.

Inside the package images are uint8 arrays in NHWC layout (N, H, W, C) with C = 1 or 3, and labels (when
present) an int64 vector. Every loader validates what it reads and raises `UserError` with a one-line message
naming the problem; nothing is unpickled (`np.load(..., allow_pickle=False)`; CIFAR-10 from its binary
distribution, which is plain bytes).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from model_collapse.errors import UserError
from model_collapse.linalg import abs_max, first_nonfinite_row

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass(frozen=True)
class ImageSet:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray | None = None  # int64 (N,)
    name: str = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]


@dataclass(frozen=True)
class FeatureSet:
    """Vectors a user already has (CLIP, DINOv2, ... embeddings): float (N, D), used as given, in no space of ours.
    From a .npy the array stays memory-mapped: it is read in tiles, never loaded whole."""

    vectors: np.ndarray  # float (N, D), possibly a read-only memmap
    labels: np.ndarray | None = None
    name: str = ""

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def check_vectors(x: np.ndarray, where: str) -> np.ndarray:
    """A feature array as given, or a one-line error: 2-D, floating point, at least one row and column, finite
    (checked a tile of rows at a time, so a memory-mapped array is never read whole)."""
    if x.ndim != 2:
        raise UserError(f"{where}: a feature array must be 2-D (N, D), got shape {x.shape}")
    if x.dtype.kind != "f":
        raise UserError(f"{where}: a feature array must hold floats, got {x.dtype}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise UserError(f"{where}: an empty feature array, shape {x.shape}")
    row = first_nonfinite_row(x)
    if row is not None:
        raise UserError(f"{where}: row {row} contains NaN or inf")
    top = abs_max(x)
    if top > VECTOR_RANGE[1] or 0 < top < VECTOR_RANGE[0]:  # squared distances would overflow or underflow
        raise UserError(f"{where}: values up to {top:.3g} in magnitude; distances need them within "
                        f"[{VECTOR_RANGE[0]:g}, {VECTOR_RANGE[1]:g}] (rescale the features)")
    return x


VECTOR_RANGE = (1e-150, 1e150)  # the largest |value| of a feature array: its squared distances stay normal floats


# ---------------------------------------------------------------------------------------------- validation


def as_uint8_images(array: np.ndarray, what: str) -> np.ndarray:
    """Validate an image array and return it as uint8 NHWC.

    Accepts uint8 (N, H, W) or (N, H, W, C) with C in {1, 3}, and floating arrays with values in [0, 1]
    (rounded to uint8). Anything else is a `UserError` naming the problem.
    """
    if not isinstance(array, np.ndarray):
        raise UserError(f"{what}: expected an array, got {type(array).__name__}")
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4:
        raise UserError(f"{what}: expected images of shape (N, H, W) or (N, H, W, C), got shape {array.shape}")
    n, h, w, c = array.shape
    if n == 0:
        raise UserError(f"{what}: contains no images")
    if c not in (1, 3):
        raise UserError(f"{what}: expected 1 or 3 channels in the last axis, got {c} (shape {array.shape})")
    if h < 1 or w < 1:
        raise UserError(f"{what}: empty image size {h}x{w}")
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            bad = int((~np.isfinite(array)).any(axis=(1, 2, 3)).sum())
            raise UserError(f"{what}: {bad} image(s) contain NaN or inf")
        lo, hi = float(array.min()), float(array.max())
        if lo < 0.0 or hi > 1.0:
            raise UserError(f"{what}: float images must lie in [0, 1], found values in [{lo:g}, {hi:g}]")
        return np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)
    raise UserError(f"{what}: unsupported dtype {array.dtype}; expected uint8 images or floats in [0, 1]")


def as_labels(labels: np.ndarray | None, n: int, what: str) -> np.ndarray | None:
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise UserError(f"{what}: labels must have shape ({n},), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{what}: labels must be integers, got dtype {labels.dtype}")
    if n and labels.min() < 0:
        raise UserError(f"{what}: labels must be >= 0")
    return labels.astype(np.int64)


# ---------------------------------------------------------------------------------------------- files


def _claimed_bytes(f) -> int:
    """The bytes of array data a .npy header (at f's position) promises."""
    version = np.lib.format.read_magic(f)
    shape, _, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                       else np.lib.format.read_array_header_2_0(f))
    if any(n < 0 for n in shape):
        raise ValueError(f"a negative dimension in the header's shape {shape}")
    return int(np.prod(shape, dtype=object)) * dtype.itemsize


def _check_sizes(path: Path) -> None:
    """Refuse, before anything is allocated, an array whose header promises more data than its file holds (a .npy
    claiming terabytes) or a .npz member that would unpack beyond the machine's memory (a decompression bomb)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 2**40
    try:
        if path.suffix.lower() == ".npy":
            with open(path, "rb") as f:
                claimed = _claimed_bytes(f)
                if claimed > path.stat().st_size - f.tell():
                    raise UserError(f"{path}: its header promises {claimed:,} bytes of data, more than the file holds")
            return
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.file_size > memory:
                    raise UserError(f"{path}: member {info.filename} would unpack to {info.file_size:,} bytes, more "
                                    f"than this machine's memory")
                if info.filename.endswith(".npy"):
                    with z.open(info) as f:
                        claimed = _claimed_bytes(f)
                    if claimed > info.file_size:
                        raise UserError(f"{path}: member {info.filename} promises {claimed:,} bytes of data, more "
                                        f"than it holds")
    except UserError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        kind = ".npy array" if path.suffix.lower() == ".npy" else ".npz archive"
        raise UserError(f"{path}: cannot read as a {kind} ({short_error(e)})") from None


def _load_npy(path: Path, features: bool = False) -> "ImageSet | FeatureSet":
    """Images; with `features`, a 2-D array is a feature array instead, kept memory-mapped."""
    _check_sizes(path)
    try:
        array = np.load(path, mmap_mode="r" if features else None, allow_pickle=False)
    except (ValueError, OSError, EOFError, MemoryError) as e:
        raise UserError(f"{path}: cannot read as a .npy array ({short_error(e)})") from None
    if features and array.ndim == 2:
        if array.dtype.kind != "f":
            raise UserError(f"{path}: a 2-D array of {array.dtype}: a feature array must hold floats, and images "
                            f"must have shape (N, H, W[, C])")
        return FeatureSet(check_vectors(array, str(path)), None, path.stem)
    images = np.array(array) if features else array  # images are read whole, into writable memory
    return ImageSet(as_uint8_images(images, str(path)), None, path.stem)


def _load_npz(path: Path, features: bool = False) -> "ImageSet | FeatureSet":
    """Images and labels; with `features`, an archive holding `features` is a feature array instead."""
    _check_sizes(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            labels = z["labels"] if "labels" in z.files else None
            if features and "features" in z.files:
                x = check_vectors(z["features"], f"{path}: features")
                return FeatureSet(x, as_labels(labels, len(x), str(path)), path.stem)
            if "images" not in z.files:
                raise UserError(f"{path}: no 'images' array inside (found: {', '.join(z.files) or 'nothing'})")
            images = z["images"]
    except UserError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError, MemoryError) as e:
        raise UserError(f"{path}: cannot read as a .npz archive ({short_error(e)})") from None
    images = as_uint8_images(images, str(path))
    return ImageSet(images, as_labels(labels, len(images), str(path)), path.stem)


MAX_IMAGE_SIDE = 4096  # as config's image_size: larger images are not what a diffusion study here trains on


def _read_image_file(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    import warnings

    try:
        with warnings.catch_warnings():  # PIL's bomb warning is a multi-line message; the size is checked below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            if im.size[0] * im.size[1] > MAX_IMAGE_SIDE**2:
                raise UserError(f"{path}: an image of {im.size[0]}x{im.size[1]} pixels, more than "
                                f"{MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}; resize it first")
            im.load()
            if im.mode.startswith("I"):  # 16-bit greyscale (PNG): to 8 bits by rounding, not by clipping at 255
                wide = np.asarray(im, dtype=np.int64)
                if wide.min() < 0 or wide.max() > 65535:
                    raise UserError(f"{path}: integer image values outside 0..65535; convert it to 8 bits first")
                return ((wide * 255 + 32767) // 65535).astype(np.uint8)
            # greyscale stays one channel; everything else (palette, RGBA, CMYK, ...) becomes RGB
            im = im.convert("L" if im.mode in ("1", "L", "LA", "F") else "RGB")
            return np.asarray(im, dtype=np.uint8)
    except Image.DecompressionBombError as e:
        raise UserError(f"{path}: refused as a decompression bomb ({short_error(e)})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, MemoryError) as e:
        raise UserError(f"{path}: cannot read image ({short_error(e)})") from None


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _load_folder(folder: Path) -> ImageSet:
    """A folder of images, or a folder of class subfolders (labels = subfolder's rank in sorted order)."""
    files = _image_files(folder)
    labels: list[int] | None = None
    if not files:
        classes = sorted(p for p in folder.iterdir() if p.is_dir() and _image_files(p))
        if not classes:
            raise UserError(f"{folder}: folder contains no images ({', '.join(IMAGE_SUFFIXES)})")
        labels = []
        for i, sub in enumerate(classes):
            sub_files = _image_files(sub)
            files += sub_files
            labels += [i] * len(sub_files)
    arrays = [_read_image_file(p) for p in files]
    grey = all(a.ndim == 2 for a in arrays)
    arrays = [a[..., None] if a.ndim == 2 else a for a in arrays]
    if not grey:
        arrays = [np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a for a in arrays]
    sizes = sorted({a.shape[:2] for a in arrays})
    if len(sizes) > 1:
        first = next(p for p, a in zip(files, arrays) if a.shape[:2] != arrays[0].shape[:2])
        raise UserError(
            f"{folder}: mixed image sizes {', '.join(f'{h}x{w}' for h, w in sizes[:4])} "
            f"(e.g. {files[0].name} is {arrays[0].shape[0]}x{arrays[0].shape[1]}, "
            f"{first.name} differs); resize them to one size first"
        )
    images = np.stack(arrays).astype(np.uint8)
    lab = np.asarray(labels, dtype=np.int64) if labels is not None else None
    return ImageSet(images, lab, folder.name)


# ---------------------------------------------------------------------------------------------- built-in sets


def _digits(root: str | None) -> ImageSet:
    """scikit-learn's 1,797 8x8 handwritten digits (values 0..16, shipped with the package), scaled to uint8."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return ImageSet(images, d.target.astype(np.int64), "digits")


CIFAR10_RECORD = 1 + 3 * 32 * 32
CIFAR10_TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]
CIFAR10_TEST_FILES = ["test_batch.bin"]
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"


def read_cifar10_binary(files: list[Path]) -> ImageSet:
    """CIFAR-10's binary distribution: per record one label byte, then 3,072 pixel bytes, channel-major."""
    chunks = []
    for f in files:
        raw = np.fromfile(f, dtype=np.uint8)
        if raw.size == 0 or raw.size % CIFAR10_RECORD:
            raise UserError(f"{f}: not a CIFAR-10 binary batch ({raw.size} bytes is not a multiple of 3073)")
        chunks.append(raw.reshape(-1, CIFAR10_RECORD))
    records = np.concatenate(chunks)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise UserError(f"{files[0]}: label byte {labels.max()} out of range 0..9; not CIFAR-10 binary data")
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return ImageSet(np.ascontiguousarray(images), labels, "cifar10")


def _cifar10_files(root: str | None, names: list[str], download: bool) -> list[Path]:
    if root is None:
        raise UserError("cifar10 needs a local folder: set data_root (--set data_root=PATH)")
    base = Path(root)
    folder = base / "cifar-10-batches-bin" if (base / "cifar-10-batches-bin").is_dir() else base
    files = [folder / n for n in names]
    if all(f.is_file() for f in files):
        return files
    if download:
        try:
            from torchvision.datasets.utils import download_and_extract_archive

            download_and_extract_archive(CIFAR10_URL, str(base))
        except Exception as e:  # network errors come in many types
            raise UserError(
                f"cifar10: not found under {folder} and the download failed ({short_error(e)}); "
                f"place cifar-10-batches-bin there"
            ) from None
        return _cifar10_files(root, names, download=False)
    missing = next(f for f in files if not f.is_file())
    raise UserError(
        f"cifar10: {missing} not found; put CIFAR-10's binary version (cifar-10-batches-bin) under {base}, "
        f"or set data_download=true where a network exists"
    )


def _cifar10(root: str | None, download: bool = False) -> ImageSet:
    return read_cifar10_binary(_cifar10_files(root, CIFAR10_TRAIN_FILES, download))


def _cifar10_test(root: str | None, download: bool = False) -> ImageSet:
    s = read_cifar10_binary(_cifar10_files(root, CIFAR10_TEST_FILES, download))
    return ImageSet(s.images, s.labels, "cifar10-test")


DATASETS: dict[str, Callable[..., ImageSet]] = {
    "digits": _digits,
    "cifar10": _cifar10,
    "cifar10-test": _cifar10_test,
}


def load_images(spec: str, root: str | None = None, download: bool = False, image_size: int | None = None,
                features: bool = False) -> "ImageSet | FeatureSet":
    """Load a built-in data set by name, or a .npy / .npz file, or an image folder, as a validated ImageSet.

    `image_size` resizes every image to a square side (Lanczos) after loading; None keeps the size. With
    `features`, a feature array is accepted too and returned as a FeatureSet: a .npy of 2-D floats (kept
    memory-mapped) or an .npz holding `features` (and optionally `labels`).
    """
    if spec in DATASETS:
        fn = DATASETS[spec]
        s = fn(root, download) if spec.startswith("cifar10") else fn(root)
    else:
        path = Path(os.path.expanduser(spec))
        if not path.exists():
            names = ", ".join(DATASETS)
            raise UserError(f"{spec}: no such file or folder, and not a built-in data set ({names})")
        if not path.is_dir() and not path.is_file():  # a FIFO, socket or device: reading could block forever
            raise UserError(f"{spec}: not a regular file or folder")
        if path.is_dir():
            s = _load_folder(path)
        elif path.suffix.lower() == ".npy":
            s = _load_npy(path, features)
        elif path.suffix.lower() == ".npz":
            s = _load_npz(path, features)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            s = ImageSet(as_uint8_images(_read_image_file(path)[None], str(path)), None, path.stem)
        else:
            raise UserError(f"{spec}: unsupported file type {path.suffix!r}; use .npy, .npz or an image folder")
    if isinstance(s, FeatureSet):
        return s
    if image_size is not None and s.images.shape[1:3] != (image_size, image_size):
        s = ImageSet(resize_images(s.images, image_size), s.labels, s.name)
    return s


def resize_images(images: np.ndarray, side: int) -> np.ndarray:
    from PIL import Image

    out = []
    for im in images:
        pil = Image.fromarray(im[..., 0] if im.shape[2] == 1 else im)
        arr = np.asarray(pil.resize((side, side), Image.LANCZOS), dtype=np.uint8)
        out.append(arr[..., None] if arr.ndim == 2 else arr)
    return np.stack(out)


def pixel_vectors(images: np.ndarray) -> np.ndarray:
    """Pixel space: flattened images scaled to [0, 1], float32 (N, H*W*C)."""
    return images.reshape(len(images), -1).astype(np.float32) / np.float32(255.0)


def short_error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:160]
