"""File formats of the image data sets: idx (MNIST, Fashion-MNIST) and CIFAR-10's python pickle
batches, read with an unpickler that lets nothing but numpy arrays through.

Every reader checks what it parses and raises :class:`CorruptDatasetError` naming the file and the
numbers that disagree.
"""

from __future__ import annotations

import codecs
import gzip
import math
import pickle
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

from srigl.errors import SriglError


class CorruptDatasetError(SriglError, ValueError):
    """A data set's file exists but does not parse as the expected format."""


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
# Decompressed data is read in pieces of this size, so that memory follows what the stream holds
# (never more than the header promises, plus one piece) rather than what a header or a stream claims.
_READ_CHUNK = 1 << 24


def _read_up_to(stream: BinaryIO, n: int) -> bytearray:
    """At most ``n`` bytes from ``stream``, fewer if it ends first (read piecewise, see _READ_CHUNK)."""
    data = bytearray()
    while len(data) < n:
        piece = stream.read(min(_READ_CHUNK, n - len(data)))
        if not piece:
            break
        data += piece
    return data


def read_idx(path: Path | str) -> np.ndarray:
    """Parse one idx file (gzipped or not) into a numpy array.

    The idx header is a 4-byte magic number ``0x0000TTNN`` (TT: element type, NN: number of
    dimensions) followed by NN big-endian uint32 sizes; the elements follow, big-endian,
    row-major. A gzipped file is decompressed as a stream: the header first, then at most the
    bytes it promises and one more, so a small ``.gz`` that inflates to gigabytes is refused after
    reading one byte past the promise instead of being inflated whole.

    Args:
        path: The file.

    Returns:
        An array of the header's shape in the native byte order (uint8 for MNIST files).

    Raises:
        CorruptDatasetError: On a bad magic number, a truncated header, a damaged gzip stream, or
            a payload whose length differs from what the header promises. The message names the
            file and the numbers that disagree.
    """
    path = Path(path)
    with path.open("rb") as file:
        # Decide by content rather than by suffix: mirrors ship both compressed files with no .gz
        # and uncompressed files that kept it.
        compressed = file.read(2) == _GZIP_MAGIC
        file.seek(0)
        stream: BinaryIO = gzip.GzipFile(fileobj=file, mode="rb") if compressed else file
        try:
            return _parse_idx(path, stream, compressed)
        except (EOFError, OSError, zlib.error) as error:
            if not compressed:
                raise
            raise CorruptDatasetError(
                f"{path}: gzip stream is damaged or truncated ({path.stat().st_size} compressed bytes): {error}"
            ) from error


def _parse_idx(path: Path, stream: BinaryIO, compressed: bool) -> np.ndarray:
    raw = _read_up_to(stream, 4)
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
    raw += _read_up_to(stream, header_bytes - 4)
    if len(raw) < header_bytes:
        raise CorruptDatasetError(
            f"{path}: truncated header, {len(raw)} bytes but {ndim} dimensions need {header_bytes}"
        )
    shape = struct.unpack(f">{ndim}I", raw[4:header_bytes])
    dtype = _IDX_DTYPES[type_code]
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow for any header
    payload = _read_up_to(stream, expected + 1)  # one byte more than promised: is there more?
    if len(payload) != expected:
        more = len(payload) > expected
        holds = f"more than {expected} (reading stopped there)" if more else str(len(payload))
        raise CorruptDatasetError(
            f"{path}: header promises shape {tuple(shape)} = {expected} data bytes, "
            f"but the file holds {holds}{' once decompressed' if compressed else ''} "
            f"({'not an idx file' if more else 'truncated or not an idx file'})"
        )
    array = np.frombuffer(payload, dtype=dtype).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


IDX_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def idx_split(images_path: Path, labels_path: Path, num_classes: int) -> tuple[Tensor, Tensor]:
    """One split's images ``(N, 1, 28, 28)`` uint8 and labels ``(N,)`` int64 from its two idx files."""
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


def load_idx_splits(paths: dict[str, Path], num_classes: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train and test images and labels from the four files of :data:`IDX_STEMS` (``{stem: path}``)."""
    train_images, train_labels = idx_split(paths[IDX_STEMS[0]], paths[IDX_STEMS[1]], num_classes)
    test_images, test_labels = idx_split(paths[IDX_STEMS[2]], paths[IDX_STEMS[3]], num_classes)
    return train_images, train_labels, test_images, test_labels


# ---------------------------------------------------------------------------------------------
# CIFAR-10 python pickle batches
# ---------------------------------------------------------------------------------------------

CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


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


def cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    """One CIFAR-10 batch file: images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64."""
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
