"""Image classification data sets read from local files, and the Fashion-MNIST fetcher.

Nothing is downloaded while loading: every loader reads files that are already on disk and,
when they are missing or damaged, raises one error that lists every place srigl looked and
says how to get the data.

Data sets are registered by name (``list_datasets()``):

* ``"fashion-mnist"`` (default) and ``"mnist"``: the four standard idx files, gzipped or not.
* ``"digits"``: scikit-learn's bundled 8x8 digits, upsampled to 28x28 so every model that
  takes MNIST takes them too.
* ``"cifar10"``: the python pickle batches of ``cifar-10-python.tar.gz``.

Every data set yields either 1x28x28 or 3x32x32 float images, normalised with the data set's
mean and std, and int64 labels.

Where srigl looks, in order, for a data set called NAME:

1. ``data_dir`` (the ``--data-dir`` argument),
2. ``$SRIGL_DATA_DIR``,
3. ``/usr/share/datasets/fashion-mnist`` (where Debian's ``dataset-fashion-mnist`` package
   installs it; Fashion-MNIST only),
4. ``data/`` in the working directory and in the source checkout (what ``make data`` fills).

Under each root, the folders tried are the data set's ``DataFiles.folders``: ``ROOT/NAME`` and
torchvision's ``ROOT/<Name>/raw`` for the idx data sets, ``ROOT/cifar-10-batches-py`` and
``ROOT/cifar10/cifar-10-batches-py`` for CIFAR-10. ``python -m srigl.app.datasets where NAME`` prints
the list.

The fetcher, ``python -m srigl.app.datasets fetch fashion-mnist --data-dir data``, does nothing when
Fashion-MNIST is already somewhere on that path; otherwise it unpacks the Debian package
``dataset-fashion-mnist`` (``apt-get download`` + ``dpkg-deb -x``, no root needed) into
``DATA_DIR/fashion-mnist``.
"""

from __future__ import annotations

import argparse
import codecs
import gzip
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from srigl.errors import SriglError

__all__ = [
    "CorruptDatasetError",
    "DataFiles",
    "DatasetInfo",
    "DatasetNotFoundError",
    "ImageDataset",
    "Normalize",
    "RandomCropFlip",
    "SeededShuffleSampler",
    "UnknownDatasetError",
    "dataset_info",
    "fetch",
    "find_dataset_dir",
    "list_datasets",
    "load_dataset",
    "main",
    "make_loaders",
    "read_idx",
    "register_dataset",
    "search_dirs",
]

DATA_DIR_ENV = "SRIGL_DATA_DIR"
# Where the Debian package dataset-fashion-mnist puts the four gzipped idx files.
DEBIAN_FASHION_MNIST_FILES = "usr/share/datasets/fashion-mnist"
DEBIAN_FASHION_MNIST_DIR = Path("/") / DEBIAN_FASHION_MNIST_FILES
DEBIAN_FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class DatasetNotFoundError(SriglError, FileNotFoundError):
    """A data set's files are not in any searched directory. The message lists them all."""


class CorruptDatasetError(SriglError, ValueError):
    """A data set's file exists but does not parse as the expected format."""


class UnknownDatasetError(SriglError, ValueError):
    """A data set name is not in the registry. The message lists the valid names."""


# ---------------------------------------------------------------------------------------------
# Data set descriptions and the registry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a report need to know about a data set, without loading it.

    Attributes:
        name: Registry name, e.g. ``"fashion-mnist"``.
        in_channels: Image channels (1 or 3).
        image_size: Height and width of the square images (28 or 32).
        num_classes: Number of label values, labels are ``0 .. num_classes - 1``.
        mean: Per-channel mean of the training images in [0, 1] units, used to normalise.
        std: Per-channel standard deviation of the training images in [0, 1] units.
        class_names: Human-readable name of each label.
    """

    name: str
    in_channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(in_channels, image_size, image_size)`` of one image."""
        return (self.in_channels, self.image_size, self.image_size)


@dataclass(frozen=True)
class DataFiles:
    """Where a data set's files are looked for, and which must be there.

    Attributes:
        folders: Folders tried under each search root, in order (``"mnist"``, ``"MNIST/raw"``).
        stems: Files that must all be in one folder.
        allow_gz: Whether ``STEM.gz`` (tried first) may stand in for ``STEM``.
        system_dirs: Absolute folders tried after the user's roots and before the project's
            ``data/`` folders.
        how_to_get: Tells the user how to get the files; ``{target}`` becomes their data folder.
    """

    folders: tuple[str, ...]
    stems: tuple[str, ...]
    allow_gz: bool = False
    system_dirs: tuple[Path, ...] = ()
    how_to_get: str = ""


# The loader of a registered data set: {stem: path} of its files -> (train images, train
# labels, test images, test labels), images (N, C, H, W) uint8 or float in [0, 1], labels (N,)
# int64.
RawLoader = Callable[[dict[str, Path]], tuple[Tensor, Tensor, Tensor, Tensor]]


@dataclass(frozen=True)
class _Entry:
    info: DatasetInfo
    files: DataFiles | None  # None: nothing on disk (digits comes with scikit-learn)
    load: RawLoader
    augment_by_default: bool


_DATASETS: dict[str, _Entry] = {}


def register_dataset(
    info: DatasetInfo, files: DataFiles | None = None, augment_by_default: bool = False
) -> Callable[[RawLoader], RawLoader]:
    """Decorator that registers a raw loader under ``info.name``.

    The loader receives ``{stem: path}`` for the files in ``files``, found on the search path
    by ``load_dataset``, and returns ``(train_images, train_labels, test_images, test_labels)``.

    Args:
        info: Description of the data set; its ``name`` is the registry key.
        files: The files the loader reads and where to look for them; ``None`` if it reads none.
        augment_by_default: Whether ``load_dataset(..., augment=None)`` applies the train-time
            augmentation to this data set.

    Returns:
        The decorator, which returns the loader unchanged.

    Raises:
        ValueError: If the name is already registered.
    """

    def decorator(load: RawLoader) -> RawLoader:
        if info.name in _DATASETS:
            raise ValueError(f"data set {info.name!r} is already registered")
        _DATASETS[info.name] = _Entry(info, files, load, augment_by_default)
        return load

    return decorator


def list_datasets() -> list[str]:
    """Names of all registered data sets, sorted."""
    return sorted(_DATASETS)


def _entry(name: str) -> _Entry:
    try:
        return _DATASETS[name]
    except KeyError:
        raise UnknownDatasetError(
            f"unknown data set {name!r}; choose one of: {', '.join(list_datasets())}"
        ) from None


def dataset_info(name: str) -> DatasetInfo:
    """The ``DatasetInfo`` of a registered data set, without touching any file.

    Raises:
        UnknownDatasetError: If ``name`` is not registered; the message lists valid names.
    """
    return _entry(name).info


# ---------------------------------------------------------------------------------------------
# Where to look
# ---------------------------------------------------------------------------------------------


def _checkout_data_dir() -> Path | None:
    # src/srigl/app/datasets/__init__.py -> the checkout root, when running from a source
    # checkout (editable install); an installed wheel has no project data/ folder.
    root = Path(__file__).resolve().parents[4]
    if (root / "pyproject.toml").is_file() and (root / "src" / "srigl").is_dir():
        return root / "data"
    return None


def _search_roots(data_dir: Path | str | None) -> tuple[list[Path], list[Path]]:
    """(the user's roots: data_dir and $SRIGL_DATA_DIR; the project's data/ folders)."""
    env_dir = os.environ.get(DATA_DIR_ENV)
    user = [Path(r) for r in (data_dir, env_dir) if r]
    project = [r for r in (Path("data"), _checkout_data_dir()) if r is not None]
    return _dedupe(user), _dedupe(project)


def _dedupe(paths: Sequence[Path]) -> list[Path]:
    seen: set[Path] = set()
    unique = []
    for path in paths:
        key = path.expanduser().resolve()
        if key not in seen:
            seen.add(key)
            unique.append(key)
    return unique


def search_dirs(name: str, data_dir: Path | str | None = None) -> list[Path]:
    """Every directory, in order, where srigl looks for the files of data set ``name``.

    Args:
        name: A registered data set name (``"digits"`` has no files and gives ``[]``).
        data_dir: The user's ``--data-dir``; searched first.

    Returns:
        Absolute directories, first match wins. They need not exist.

    Raises:
        UnknownDatasetError: If ``name`` is not registered.
    """
    files = _entry(name).files
    if files is None:
        return []
    user_roots, project_roots = _search_roots(data_dir)
    return _dedupe(
        [root / folder for root in user_roots for folder in files.folders]
        + list(files.system_dirs)
        + [root / folder for root in project_roots for folder in files.folders]
    )


def _find_files(name: str, data_dir: Path | str | None) -> dict[str, Path]:
    """``{stem: path}`` from the first searched directory holding every file of ``name``."""
    files = _entry(name).files
    if files is None:
        return {}
    looked = []
    for directory in search_dirs(name, data_dir):
        found: dict[str, Path] = {}
        for stem in files.stems:
            candidates = [directory / f"{stem}.gz", directory / stem] if files.allow_gz else [directory / stem]
            path = next((c for c in candidates if c.is_file()), None)
            if path is not None:
                found[stem] = path
        if len(found) == len(files.stems):
            return found
        if not directory.is_dir():
            looked.append(f"{directory} (no such directory)")
        else:
            missing = [s for s in files.stems if s not in found]
            looked.append(f"{directory} (missing {', '.join(missing)})")
    places = "\n".join(f"  {line}" for line in looked)
    target = Path(data_dir or os.environ.get(DATA_DIR_ENV) or "data")
    raise DatasetNotFoundError(
        f"{name} not found; srigl looked in {len(looked)} places:\n{places}\n"
        + files.how_to_get.format(target=target)
    )


def find_dataset_dir(name: str, data_dir: Path | str | None = None) -> Path:
    """The directory that ``load_dataset(name, data_dir)`` would read from.

    Raises:
        DatasetNotFoundError: If no searched directory holds all of the data set's files; the
            message lists every place searched and how to get the files.
        UnknownDatasetError: If ``name`` is not registered.
        ValueError: If the data set has no files (digits).
    """
    paths = _find_files(name, data_dir)
    if not paths:
        raise ValueError(f"data set {name!r} has no files on disk")
    return next(iter(paths.values())).parent


# ---------------------------------------------------------------------------------------------
# The idx format (MNIST, Fashion-MNIST)
# ---------------------------------------------------------------------------------------------

# idx type byte -> element dtype; multi-byte types are big-endian on disk.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_maybe_gzipped(path: Path) -> bytes:
    raw = path.read_bytes()
    # Decide by content rather than by suffix: mirrors ship both compressed files with no .gz
    # and uncompressed files that kept it.
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as error:
        raise CorruptDatasetError(
            f"{path}: gzip stream is damaged or truncated ({len(raw)} compressed bytes): {error}"
        ) from error


def read_idx(path: Path | str) -> np.ndarray:
    """Parse one idx file (gzipped or not) into a numpy array.

    The idx header is a 4-byte magic number ``0x0000TTNN`` (TT: element type, NN: number of
    dimensions) followed by NN big-endian uint32 sizes; the elements follow, big-endian,
    row-major.

    Args:
        path: The file.

    Returns:
        An array of the header's shape in the native byte order (uint8 for MNIST files).

    Raises:
        CorruptDatasetError: On a bad magic number, a truncated header, or a payload whose
            length differs from what the header promises. The message names the file and
            the numbers that disagree.
    """
    path = Path(path)
    raw = _read_maybe_gzipped(path)
    if len(raw) < 4:
        raise CorruptDatasetError(f"{path}: {len(raw)} bytes, shorter than the 4-byte idx magic number")
    (magic,) = struct.unpack(">I", raw[:4])
    type_code, ndim = (magic >> 8) & 0xFF, magic & 0xFF
    if magic >> 16 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise CorruptDatasetError(
            f"{path}: magic number 0x{magic:08x} is not an idx header "
            "(expected 0x0000TTNN with type TT in {08,09,0b,0c,0d,0e} and NN >= 1 dimensions)"
        )
    header_bytes = 4 + 4 * ndim
    if len(raw) < header_bytes:
        raise CorruptDatasetError(
            f"{path}: truncated header, {len(raw)} bytes but {ndim} dimensions need {header_bytes}"
        )
    shape = struct.unpack(f">{ndim}I", raw[4:header_bytes])
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header_bytes
    if actual != expected:
        raise CorruptDatasetError(
            f"{path}: header promises shape {tuple(shape)} = {expected} data bytes, "
            f"but the file holds {actual} (truncated or not an idx file)"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header_bytes).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


_IDX_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _idx_split(images_path: Path, labels_path: Path, num_classes: int) -> tuple[Tensor, Tensor]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise CorruptDatasetError(
            f"{images_path}: expected uint8 images of shape (N, 28, 28), "
            f"got {images.dtype} of shape {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise CorruptDatasetError(
            f"{labels_path}: expected uint8 labels of shape (N,), got {labels.dtype} of shape {labels.shape}"
        )
    if len(labels) != len(images):
        raise CorruptDatasetError(
            f"{labels_path} holds {len(labels)} labels but {images_path} holds {len(images)} images"
        )
    if labels.size and labels.max() >= num_classes:
        raise CorruptDatasetError(f"{labels_path}: label {int(labels.max())} outside 0..{num_classes - 1}")
    # (N, 28, 28) -> (N, 1, 28, 28)
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _load_idx_splits(paths: dict[str, Path], num_classes: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    train_images, train_labels = _idx_split(paths[_IDX_STEMS[0]], paths[_IDX_STEMS[1]], num_classes)
    test_images, test_labels = _idx_split(paths[_IDX_STEMS[2]], paths[_IDX_STEMS[3]], num_classes)
    return train_images, train_labels, test_images, test_labels


FASHION_MNIST = DatasetInfo(
    name="fashion-mnist",
    in_channels=1,
    image_size=28,
    num_classes=10,
    # Pixel mean and std over the 60000 training images.
    mean=(0.2860,),
    std=(0.3530,),
    class_names=(
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ),
)

MNIST = DatasetInfo(
    name="mnist",
    in_channels=1,
    image_size=28,
    num_classes=10,
    mean=(0.1307,),
    std=(0.3081,),
    class_names=tuple(str(d) for d in range(10)),
)


FASHION_MNIST_FILES = DataFiles(
    folders=("fashion-mnist", "FashionMNIST/raw"),  # srigl's fetcher, torchvision
    stems=_IDX_STEMS,
    allow_gz=True,
    system_dirs=(DEBIAN_FASHION_MNIST_DIR,),
    how_to_get=(
        "Get it with `make data` or `python -m srigl.app.datasets fetch fashion-mnist --data-dir {target}` "
        f"(unpacks the Debian package {DEBIAN_FASHION_MNIST_PACKAGE}), or put the four idx files "
        "from https://github.com/zalandoresearch/fashion-mnist in {target}/fashion-mnist."
    ),
)

MNIST_FILES = DataFiles(
    folders=("mnist", "MNIST/raw"),
    stems=_IDX_STEMS,
    allow_gz=True,
    how_to_get=(
        "Put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz "
        "and t10k-labels-idx1-ubyte.gz (gzipped or not, from any MNIST mirror) in {target}/mnist, "
        "or point --data-dir at a folder holding torchvision's MNIST/raw."
    ),
)


@register_dataset(FASHION_MNIST, FASHION_MNIST_FILES)
def _load_fashion_mnist(paths: dict[str, Path]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _load_idx_splits(paths, FASHION_MNIST.num_classes)


@register_dataset(MNIST, MNIST_FILES)
def _load_mnist(paths: dict[str, Path]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _load_idx_splits(paths, MNIST.num_classes)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 python pickle batches
# ---------------------------------------------------------------------------------------------

_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and numpy arrays; refuses every other global.

    The CIFAR batches are pickles, and a pickle can run arbitrary code on load. A batch only
    ever needs numpy's array reconstructor, so nothing else is let through.
    """

    # The functions numpy's own pickles reference, taken from this numpy so that batches
    # written under numpy 1 (numpy.core) and numpy 2 (numpy._core) both load.
    _ALLOWED = {
        "_reconstruct": np.ndarray.__reduce__(np.zeros(1))[0],
        "scalar": np.float64(0).__reduce__()[0],
        "ndarray": np.ndarray,
        "dtype": np.dtype,
    }

    def find_class(self, module: str, name: str) -> object:
        if module.split(".")[0] == "numpy" and name in self._ALLOWED:
            return self._ALLOWED[name]
        if (module, name) == ("_codecs", "encode"):
            # Protocol-2 pickles written by Python 3 spell every bytes object as a call to
            # codecs.encode, which only turns a str into bytes.
            return codecs.encode
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    try:
        with path.open("rb") as file:
            # encoding="bytes": the batches were pickled by Python 2, whose str keys and
            # numpy buffers must come back as bytes, as the CIFAR page prescribes.
            batch = _ArrayOnlyUnpickler(file, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise CorruptDatasetError(f"{path}: not a readable CIFAR python batch: {error!r}") from error
    if not isinstance(batch, dict):
        raise CorruptDatasetError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise CorruptDatasetError(f"{path}: batch has keys {sorted(map(str, batch))}, needs b'data' and b'labels'")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise CorruptDatasetError(
            f"{path}: expected uint8 data of shape (N, 3072), got {data.dtype} of shape {data.shape}"
        )
    if labels.shape != (len(data),):
        raise CorruptDatasetError(f"{path}: {labels.size} labels for {len(data)} images")
    if labels.size and (labels.min() < 0 or labels.max() >= 10):
        raise CorruptDatasetError(f"{path}: labels span {labels.min()}..{labels.max()}, expected 0..9")
    # Each row is the red plane, then green, then blue, each 32x32 row-major:
    # (N, 3072) -> (N, 3, 32, 32)
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels.astype(np.int64))


CIFAR10 = DatasetInfo(
    name="cifar10",
    in_channels=3,
    image_size=32,
    num_classes=10,
    # Per-channel pixel mean and std over the 50000 training images. (The often-quoted
    # (0.2023, 0.1994, 0.2010) is a mean of per-image stds, not the pixel std.)
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
    class_names=(
        "airplane", "automobile", "bird", "cat", "deer",
        "dog", "frog", "horse", "ship", "truck",
    ),
)


CIFAR10_FILES = DataFiles(
    folders=("cifar-10-batches-py", "cifar10/cifar-10-batches-py"),
    stems=(*_CIFAR_TRAIN, "test_batch"),
    how_to_get=(
        f"Download cifar-10-python.tar.gz from {CIFAR10_URL} and extract it into {{target}} "
        "(`tar -xzf cifar-10-python.tar.gz -C {target}` creates {target}/cifar-10-batches-py)."
    ),
)


@register_dataset(CIFAR10, CIFAR10_FILES, augment_by_default=True)
def _load_cifar10(paths: dict[str, Path]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    train = [_cifar_batch(paths[stem]) for stem in _CIFAR_TRAIN]
    test_images, test_labels = _cifar_batch(paths["test_batch"])
    train_images = torch.cat([images for images, _ in train])
    train_labels = torch.cat([labels for _, labels in train])
    return train_images, train_labels, test_images, test_labels


# ---------------------------------------------------------------------------------------------
# scikit-learn digits
# ---------------------------------------------------------------------------------------------

DIGITS = DatasetInfo(
    name="digits",
    in_channels=1,
    image_size=28,
    num_classes=10,
    # Pixel mean and std of the 1437 training images after upsampling to 28x28.
    mean=(0.3056,),
    std=(0.3247,),
    class_names=tuple(str(d) for d in range(10)),
)
DIGITS_TEST_SIZE = 360
_DIGITS_SPLIT_SEED = 0


@register_dataset(DIGITS)
def _load_digits(paths: dict[str, Path]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    del paths  # bundled with scikit-learn
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("the digits data set needs scikit-learn: pip install 'srigl[app]'") from error
    bunch = load_digits()
    # Pixel values are counts 0..16. (N, 64) -> (N, 1, 8, 8)
    images = torch.from_numpy(bunch.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    # Bilinear upsampling to 28x28 so that every model built for MNIST takes digits as is.
    images = F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    # The bundle is ordered by writer; a fixed permutation (independent of the training seed)
    # gives a test split that is the same in every run.
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(_DIGITS_SPLIT_SEED))
    test, train = order[:DIGITS_TEST_SIZE], order[DIGITS_TEST_SIZE:]
    return images[train], labels[train], images[test], labels[test]


# ---------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Normalize:
    """``(image - mean) / std`` per channel, on ``(C, H, W)`` or ``(N, C, H, W)`` tensors."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: Tensor) -> Tensor:
        # (C,) -> (C, 1, 1), broadcast over H, W and any leading batch dimension.
        mean = torch.tensor(self.mean, dtype=images.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype).view(-1, 1, 1)
        return (images - mean) / std


@dataclass(frozen=True)
class RandomCropFlip:
    """Random crop with zero padding and random horizontal flip, the standard CIFAR augmentation.

    Works on one image ``(C, H, W)`` or a batch ``(N, C, H, W)`` (each image gets its own crop and
    flip), keeps the input size, and draws all randomness from ``generator`` so a seeded
    generator gives the same result every time. Apply it to images in [0, 1] before
    normalisation, so the padding is black as in the usual recipe.

    Attributes:
        padding: Pixels of zero padding on each side before cropping back to the input size.
        flip_probability: Chance that an image is mirrored left-right.
    """

    padding: int = 4
    flip_probability: float = 0.5

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment ``images``.

        Args:
            images: ``(C, H, W)`` or ``(N, C, H, W)``.
            generator: Source of randomness; the global RNG when ``None``.

        Returns:
            A tensor of the same shape and dtype.
        """
        if images.ndim not in (3, 4):
            raise ValueError(f"expected (C, H, W) or (N, C, H, W) images, got shape {tuple(images.shape)}")
        batch = images if images.ndim == 4 else images.unsqueeze(0)  # (N, C, H, W)
        n, c, h, w = batch.shape
        p = self.padding
        padded = F.pad(batch, (p, p, p, p))  # (N, C, H + 2p, W + 2p)
        top = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        left = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        flip = torch.rand(n, generator=generator) < self.flip_probability
        if images.ndim == 3:
            # One image (the per-item path of a data loader): slicing is ~10x cheaper than
            # the batched gather below, and draws the same numbers, so the result is the
            # same as augmenting a batch of one.
            y, x = int(top), int(left)
            crop = padded[0, :, y : y + h, x : x + w]  # (C, H, W)
            return crop.flip(-1) if bool(flip) else crop
        rows = top[:, None] + torch.arange(h)  # (N, H)
        cols = left[:, None] + torch.arange(w)  # (N, W)
        # Mirroring the crop is reading its columns right to left.
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        return padded[
            torch.arange(n).view(n, 1, 1, 1),
            torch.arange(c).view(1, c, 1, 1),
            rows.view(n, 1, h, 1),
            cols.view(n, 1, 1, w),
        ]  # (N, C, H, W)


# ---------------------------------------------------------------------------------------------
# Datasets, sampling and loaders
# ---------------------------------------------------------------------------------------------


class ImageDataset(Dataset):
    """Images and labels held in memory; items are normalised float images and int64 labels.

    Images are stored as given (uint8 in 0..255, or float in [0, 1]) and converted per item,
    which keeps CIFAR-10's training set at 150 MB instead of 600 MB.

    An item index is either an ``int`` or an ``(int, seed)`` pair. With a pair, the
    augmentation of that item draws from ``torch.Generator().manual_seed(seed)``, so the
    result depends only on the index and seed (not on worker processes or on what was loaded
    before); ``SeededShuffleSampler`` yields such pairs.

    Attributes:
        images: ``(N, C, H, W)`` uint8 or float tensor.
        labels: ``(N,)`` int64 tensor.
        info: The data set's description.
        transform: Augmentation applied to a ``(C, H, W)`` image in [0, 1] with a generator,
            before normalisation; ``None`` for none.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        info: DatasetInfo,
        transform: Callable[[Tensor, torch.Generator | None], Tensor] | None = None,
    ) -> None:
        expected = (info.in_channels, info.image_size, info.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"{info.name}: expected images (N, {', '.join(map(str, expected))}), got {tuple(images.shape)}")
        if labels.shape != (len(images),):
            raise ValueError(f"{info.name}: {tuple(labels.shape)} labels for {len(images)} images")
        self.images = images
        self.labels = labels.long()
        self.info = info
        self.transform = transform
        self.normalize = Normalize(info.mean, info.std)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[Tensor, Tensor]:
        seed = None
        if isinstance(index, tuple):
            index, seed = index
        image = self.images[index]
        image = image.float().div_(255.0) if image.dtype == torch.uint8 else image.float()
        if self.transform is not None:
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            image = self.transform(image, generator)
        return self.normalize(image), self.labels[index]

    def head(self, n: int) -> ImageDataset:
        """The first ``min(n, len(self))`` items, same transform (a deterministic subset).

        Raises:
            ValueError: If ``n < 1``.
        """
        if n < 1:
            raise ValueError(f"a subset needs at least 1 item, got {n}")
        return ImageDataset(self.images[:n], self.labels[:n], self.info, self.transform)


class SeededShuffleSampler(Sampler):
    """Shuffles item indices each epoch and pairs each with a seed for its augmentation.

    All of an epoch's randomness (order and per-item augmentation seeds) is drawn from
    ``generator`` when iteration starts. Saving ``generator.get_state()`` before an epoch and
    restoring it with ``set_state`` replays that epoch exactly, whatever ``num_workers`` is.

    Attributes:
        num_samples: Number of items in the data set.
        generator: The one source of randomness for the data order and augmentation.
    """

    def __init__(self, num_samples: int, generator: torch.Generator) -> None:
        self.num_samples = num_samples
        self.generator = generator

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.num_samples, generator=self.generator)
        seeds = torch.randint(0, 2**62, (self.num_samples,), generator=self.generator)
        return iter(zip(order.tolist(), seeds.tolist()))


def load_dataset(
    name: str = "fashion-mnist",
    data_dir: Path | str | None = None,
    augment: bool | None = None,
) -> tuple[ImageDataset, ImageDataset, DatasetInfo]:
    """Load a registered data set's train and test splits from local files.

    Args:
        name: Registered name, see ``list_datasets()``.
        data_dir: Directory searched first (then ``$SRIGL_DATA_DIR``, Debian's location, ``data/``).
        augment: Apply ``RandomCropFlip`` to training items; ``None`` uses the data set's
            default (on for CIFAR-10 only).

    Returns:
        ``(train, test, info)``; the test set is never augmented.

    Raises:
        UnknownDatasetError: Unknown ``name``; the message lists valid names.
        DatasetNotFoundError: Files missing; the message lists every place searched and how to
            get them.
        CorruptDatasetError: A file exists but does not parse; the message names it.
    """
    entry = _entry(name)
    train_images, train_labels, test_images, test_labels = entry.load(_find_files(name, data_dir))
    augment = entry.augment_by_default if augment is None else augment
    transform = RandomCropFlip(padding=4) if augment else None
    train = ImageDataset(train_images, train_labels, entry.info, transform)
    test = ImageDataset(test_images, test_labels, entry.info)
    return train, test, entry.info


def make_loaders(
    name: str = "fashion-mnist",
    data_dir: Path | str | None = None,
    batch_size: int = 128,
    seed: int = 0,
    num_workers: int = 0,
    limit_train: int | None = None,
    limit_test: int | None = None,
    augment: bool | None = None,
) -> tuple[DataLoader, DataLoader, DatasetInfo]:
    """Train and test loaders whose order and augmentation depend only on ``seed``.

    The training loader's sampler is a ``SeededShuffleSampler``; its generator,
    ``train_loader.sampler.generator``, is the only source of randomness, so a checkpoint can
    save its state between epochs and restore it to replay the data exactly.

    Args:
        name: Registered data set name.
        data_dir: Directory searched first for the files.
        batch_size: Items per batch, for both loaders; the last batch may be smaller.
        seed: Seed of the training loader's generator.
        num_workers: Loader worker processes; results do not depend on it.
        limit_train: Keep only the first ``limit_train`` training items (all if larger).
        limit_test: Keep only the first ``limit_test`` test items (all if larger).
        augment: See ``load_dataset``.

    Returns:
        ``(train_loader, test_loader, info)``. Batches are ``(images, labels)`` with images
        ``(B, C, H, W)`` float32 and labels ``(B,)`` int64.

    Raises:
        ValueError: If ``batch_size`` or a limit is below 1.
        UnknownDatasetError, DatasetNotFoundError, CorruptDatasetError: See ``load_dataset``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    train, test, info = load_dataset(name, data_dir, augment=augment)
    if limit_train is not None:
        train = train.head(limit_train)
    if limit_test is not None:
        test = test.head(limit_test)
    sampler = SeededShuffleSampler(len(train), torch.Generator().manual_seed(seed))
    train_loader = DataLoader(train, batch_size=batch_size, sampler=sampler, num_workers=num_workers)
    test_loader = DataLoader(test, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    return train_loader, test_loader, info


# ---------------------------------------------------------------------------------------------
# Data order: a pure function of (seed, epoch), sharded over ranks
# ---------------------------------------------------------------------------------------------


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of epoch ``epoch``'s data order: a pure function of ``(seed, epoch)``."""
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63)


def epoch_order(num_items: int, seed: int, epoch: int) -> list[tuple[int, int]]:
    """The epoch's ``(item index, augmentation seed)`` pairs, as :class:`SeededShuffleSampler` draws them."""
    return list(SeededShuffleSampler(num_items, torch.Generator().manual_seed(epoch_seed(seed, epoch))))


def shard(order: list, rank: int, world: int) -> list:
    """This rank's part of ``order``: padded by wrapping to a multiple of ``world``, then strided.

    The same split as ``torch.utils.data.DistributedSampler`` (which would draw its own order);
    here the order comes from :func:`epoch_order` so augmentation seeds stay deterministic.
    """
    if world == 1:
        return order
    padded = order + order[: (-len(order)) % world]
    return padded[rank::world]


def batches(dataset, order: list[tuple[int, int]], batch_size: int, num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` batches of ``dataset`` in ``order``.

    An in-memory ``ImageDataset`` without augmentation is gathered a whole batch at a time
    (about 10x faster than item by item, with the same values); anything else goes through a
    ``DataLoader`` whose sampler is ``order``.
    """
    if isinstance(dataset, ImageDataset) and dataset.transform is None:
        normalize = Normalize(dataset.info.mean, dataset.info.std)
        indices = torch.tensor([i for i, _ in order], dtype=torch.long)
        for start in range(0, len(indices), batch_size):
            idx = indices[start : start + batch_size]
            images = dataset.images[idx]  # (B, C, H, W)
            images = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
            yield normalize(images), dataset.labels[idx]
        return
    yield from DataLoader(dataset, batch_size=batch_size, sampler=order, num_workers=num_workers)


# ---------------------------------------------------------------------------------------------
# Fetcher
# ---------------------------------------------------------------------------------------------


def _run(command: Sequence[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(list(command), cwd=cwd, env=env, capture_output=True, text=True, check=False)


def _apt_download(package: str, workdir: Path, log: Callable[[str], None], otherwise: str) -> Path:
    """``apt-get download package`` into ``workdir``; refresh the package lists once if root.

    ``otherwise`` tells the user how to get the data by hand, for the error messages.
    """
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise DatasetNotFoundError(
            f"cannot fetch {package}: apt-get or dpkg-deb is missing (not a Debian-like system). {otherwise}"
        )
    log(f"running: apt-get download {package}")
    result = _run(["apt-get", "download", package], workdir)
    if result.returncode != 0:
        # A fresh container has no package lists: apt-get cannot locate the package at all.
        if os.geteuid() == 0:
            log("apt-get download failed; running: apt-get update")
            update = _run(["apt-get", "update"], workdir)
            if update.returncode != 0:
                raise DatasetNotFoundError(
                    f"apt-get update failed (exit {update.returncode}):\n{update.stderr.strip()}\n{otherwise}"
                )
            result = _run(["apt-get", "download", package], workdir)
        if result.returncode != 0:
            hint = "" if os.geteuid() == 0 else "If the package lists are missing, run `sudo apt-get update` and retry. "
            raise DatasetNotFoundError(
                f"apt-get download {package} failed (exit {result.returncode}):\n{result.stderr.strip()}\n"
                f"{hint}{otherwise}"
            )
    debs = sorted(workdir.glob(f"{package}_*.deb"))
    if not debs:
        raise DatasetNotFoundError(f"apt-get download {package} succeeded but left no .deb in {workdir}")
    return debs[-1]


def _fetch_fashion_mnist(target: Path, log: Callable[[str], None]) -> None:
    with tempfile.TemporaryDirectory(prefix="srigl-fetch-") as tmp:
        workdir = Path(tmp)
        otherwise = (
            "Or put the four idx files from https://github.com/zalandoresearch/fashion-mnist "
            f"in {target}."
        )
        deb = _apt_download(DEBIAN_FASHION_MNIST_PACKAGE, workdir, log, otherwise)
        log(f"downloaded {deb.name} ({deb.stat().st_size / 1e6:.1f} MB); unpacking with dpkg-deb -x")
        unpacked = workdir / "root"
        result = _run(["dpkg-deb", "-x", str(deb), str(unpacked)], workdir)
        if result.returncode != 0:
            raise CorruptDatasetError(f"dpkg-deb -x {deb.name} failed (exit {result.returncode}):\n{result.stderr.strip()}")
        source = unpacked / DEBIAN_FASHION_MNIST_FILES
        files = [source / f"{stem}.gz" for stem in _IDX_STEMS]
        missing = [str(f.relative_to(unpacked)) for f in files if not f.is_file()]
        if missing:
            raise CorruptDatasetError(f"{deb.name} does not contain {', '.join(missing)}")
        # Copy into a staging folder next to the target and check the files there, so that
        # an interrupted or damaged fetch never leaves files that would count as "present".
        target.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target))
        try:
            for file in files:
                shutil.copyfile(file, staging / file.name)
            for images, labels in ((0, 1), (2, 3)):
                _idx_split(staging / files[images].name, staging / files[labels].name, FASHION_MNIST.num_classes)
            for file in files:
                os.replace(staging / file.name, target / file.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def fetch(name: str, data_dir: Path | str = "data", log: Callable[[str], None] = print) -> Path | None:
    """Make data set ``name`` available locally, doing nothing if it already is.

    Only Fashion-MNIST is fetched automatically (from the Debian package
    ``dataset-fashion-mnist`` into ``data_dir/fashion-mnist``, without root unless the package
    lists need refreshing); digits ships with scikit-learn; MNIST and CIFAR-10 must be put in
    place by hand, and this says how.

    Args:
        name: Registered data set name.
        data_dir: Where to put fetched files (``DATA_DIR/NAME``); searched first.
        log: Receives one line per action taken.

    Returns:
        The directory holding the data set's files, or ``None`` for digits.

    Raises:
        DatasetNotFoundError: If the data cannot be obtained; the message says how to get it.
        CorruptDatasetError: If the fetched files do not parse.
        UnknownDatasetError: Unknown ``name``.
    """
    _entry(name)
    if name == "digits":
        log("digits ships with scikit-learn; nothing to fetch")
        return None
    try:
        found = find_dataset_dir(name, data_dir)
    except DatasetNotFoundError:
        if name != "fashion-mnist":
            raise
    else:
        log(f"{name} already present in {found}; nothing to do")
        return found
    target = Path(data_dir).expanduser().resolve() / name
    _fetch_fashion_mnist(target, log)
    log(f"fashion-mnist ready in {target}")
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m srigl.app.datasets {fetch,where} NAME [--data-dir DIR]``.

    Returns:
        The process exit status: 0 on success, 1 if the data is missing or damaged.
    """
    parser = argparse.ArgumentParser(prog="python -m srigl.app.datasets", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_parser = commands.add_parser("fetch", help="obtain a data set (Fashion-MNIST from Debian's package)")
    where_parser = commands.add_parser("where", help="show where srigl looks for a data set and what it finds")
    for sub in (fetch_parser, where_parser):
        sub.add_argument("name", choices=list_datasets())
        sub.add_argument("--data-dir", default="data", help="data directory (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            fetch(args.name, args.data_dir)
        else:
            for directory in search_dirs(args.name, args.data_dir):
                print(directory)
            if args.name != "digits":
                print(f"found: {find_dataset_dir(args.name, args.data_dir)}")
    except (DatasetNotFoundError, CorruptDatasetError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
